"""The benchmark suite in its quick mode: oracle, parity gate, methods, report (tiny sizes)."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from tolerances import DET_REL_F32, DET_REL_F64, STAT_SIGMAS
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import oracle as bench_oracle  # noqa: E402
from benchmarks import report, suite  # noqa: E402
from benchmarks.methods import Method, all_methods  # noqa: E402
from benchmarks.workloads import build  # noqa: E402


def _dense_jacobians(wl) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z (R, C), J (R, C, P))``: logits and full float64 Jacobians of every row (jacrev)."""
    model = copy.deepcopy(wl.model).double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = wl.inputs.double() if wl.inputs.is_floating_point() else wl.inputs
    C = wl.num_classes

    def logits(pr):
        return functional_call(model, pr, (x,)).reshape(-1, C)

    with sdpa_kernel(SDPBackend.MATH):
        z = logits(params)
        jac = jacrev(logits)(params)
    J = torch.cat([jac[n].reshape(z.shape[0], C, -1) for n in params], dim=-1)  # (R, C, P)
    return z, J


def _dense_oracle(wl, quantity: str) -> torch.Tensor:
    """Full float64 Jacobians of every row with jacrev, contracted with the core matrix.

    Independent of the suite's oracle (no chunking, no closed forms, no head factorisation).
    """
    z, J = _dense_jacobians(wl)
    C = wl.num_classes
    p = torch.softmax(z, -1)
    if quantity == "fim":
        M = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return torch.einsum("rcp,rcd,rdp->p", J, M, J)
    g = p - torch.nn.functional.one_hot(wl.flat_labels(), C).double()
    return (torch.einsum("rcp,rc->rp", J, g) ** 2).sum(0)


@pytest.mark.parametrize("key", ["a", "c", "d", "e", "g"],
                         ids=["mlp", "cnn", "linear-head-closed-form", "transformer",
                              "token-lm-head-factorised"])
def test_bench_oracle_matches_test_oracle(key):
    wl = build(key, "tiny", seed=0)
    ref = bench_oracle.compute(wl)
    for quantity in ("fim", "ef"):
        expect = _dense_oracle(wl, quantity)
        assert bench_oracle.rel_err(ref[quantity], expect) < DET_REL_F64, quantity


QUICK_METHODS = ["fimfast_exact_torch", "fimfast_empirical_torch", "fimfast_hutchinson_torch",
                 "fimfast_train_step_hutchinson_torch", "bp_diag_ggn_exact", "nng_fim_exact"]


@pytest.mark.parametrize("key", ["a", "d"], ids=["mlp", "linear-head"])
def test_quick_parity(key):
    res = suite.run_quick([key], QUICK_METHODS)[key]
    assert res["floor"]["status"] == "ok"
    for name in ("fimfast_exact_torch", "fimfast_empirical_torch"):
        assert res[name]["status"] == "ok", res[name]
        assert res[name]["err_1"] < DET_REL_F32 * 10, res[name]  # float32 through the network
    wl = build(key, "tiny", seed=0)
    _, var, fim = _hutchinson_law(wl)
    # one draw: E[err^2] = sum Var / |F|^2 (docs/math.md §8); Markov at alpha = 1e-2 bounds err^2 by
    # 100 E[err^2] (err_1 ~ 1 here, so this only catches gross errors; the mean of many draws is
    # tested in test_hutchinson_methods_follow_their_law)
    bound = float((100 * var.sum() / fim.square().sum()).sqrt())
    for name in ("fimfast_hutchinson_torch", "fimfast_train_step_hutchinson_torch"):
        assert res[name]["status"] == "ok", res[name]
        assert 0 < res[name]["err_1"] <= bound, (res[name], bound)
    for name in ("bp_diag_ggn_exact", "nng_fim_exact"):
        # a missing peer is reported as such, never a crash; an installed one must agree
        assert res[name]["status"] in ("ok", "missing"), res[name]
        if res[name]["status"] == "ok":
            assert res[name]["err_1"] < bench_oracle.PARITY_RTOL


def _hutchinson_law(wl) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(b, Var, E)`` of one HUTCHINSON draw per coordinate (docs/math.md §8): with the factor
    A = diag(sqrt p) - sqrt p p^T and b = (A_r J_r)_r stacked over rows, E = |b|^2 = diag F and
    Var = 2 (|b|^4 - sum_k b_k^4)."""
    z, J = _dense_jacobians(wl)
    p = torch.softmax(z, -1)
    sp = p.sqrt()
    A = torch.diag_embed(sp) - sp.unsqueeze(-1) * p.unsqueeze(-2)
    b = torch.einsum("rmc,rcp->rmp", A, J).reshape(-1, J.shape[-1])
    e = (b**2).sum(0)
    return b, 2 * (e**2 - (b**4).sum(0)), e


@pytest.mark.parametrize("name", ["fimfast_hutchinson_torch",
                                  "fimfast_train_step_hutchinson_torch"])
def test_hutchinson_methods_follow_their_law(name):
    """64 draws of the benchmark's Hutchinson methods on workload (a) against the closed forms.

    * the mean, per coordinate, within 5 standard errors sqrt(Var/64) of diag F (Bonferroni over
      670 coordinates under the normal approximation: alpha < 670 * 5.7e-7 = 4e-4; an all-zeros
      estimate is >= sqrt(64/2) = 5.7 standard errors off everywhere, since Var <= 2 F^2);
    * the variance on the trace: q = |D - F|^2 / sum Var has expectation 1; the mean of the 64
      q's is within STAT_SIGMAS standard errors of 1.
    """
    wl = build("a", "tiny", seed=0)
    _, var, fim = _hutchinson_law(wl)
    names = [n for n, _ in wl.model.named_parameters()]
    fn, cleanup = all_methods("cpu")[name].setup(wl, {})
    torch.manual_seed(7)
    draws = []
    for _ in range(64):
        got = fn()
        draws.append(torch.cat([got[n].detach().reshape(-1).double() for n in names]))
        cleanup()
    d = torch.stack(draws)
    dev = (d.mean(0) - fim).abs()
    const = var <= 1e-24 * float(var.max())  # dead units: no gradient, no noise
    assert bool((dev[const] <= 1e-6 * float(fim.max())).all())
    z = dev[~const] / (var[~const] / d.shape[0]).sqrt()
    assert float(z.max()) <= 5, f"max |z| {float(z.max()):.2f}"
    q = ((d - fim) ** 2).sum(1) / var.sum()
    zq = abs(float(q.mean()) - 1) / (float(q.std()) / d.shape[0] ** 0.5)
    assert zq <= STAT_SIGMAS, f"mean of |D - F|^2 / sum Var = {float(q.mean()):.3f}, z = {zq:.2f}"


def _squared_grads(wl, cfg):
    """The square of the batch gradient: not the Fisher (a wrong deterministic method)."""
    def call():
        wl.model.zero_grad()
        torch.nn.functional.cross_entropy(wl.logits(), wl.flat_labels(), reduction="sum"
                                          ).backward()
        return {n: p.grad ** 2 for n, p in wl.model.named_parameters()}
    return call, lambda: None


def test_quick_flags_a_wrong_deterministic_method(monkeypatch):
    wrong = Method("wrong", "wrong", "test", "exact", "fim", False, _squared_grads)
    methods = all_methods("cpu")
    monkeypatch.setattr(suite, "all_methods", lambda device: {**methods, "wrong": wrong})
    res = suite.run_quick(["a"], ["wrong"])["a"]
    assert res["wrong"]["status"] == "parity_fail"
    assert res["wrong"]["err_1"] > bench_oracle.PARITY_RTOL


def test_every_fimfast_type_is_a_method():
    import fimfast

    names = set(all_methods("cpu"))
    for t in fimfast.FIMType:
        assert f"fimfast_{t.value}_torch" in names


def test_cli_quick_exit_code(monkeypatch, capsys):
    """0 when the fimfast methods agree with the reference (printed with their error), 1 when a
    fimfast method fails parity."""
    from benchmarks.__main__ import main

    assert main(["--quick", "--workloads", "a", "--methods", "fimfast_exact_torch"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "fimfast_exact_torch" in ln)
    assert line.split()[2] == "ok" and float(line.split()[-1]) < DET_REL_F32 * 10
    wrong = Method("fimfast_wrong", "wrong", "fimfast", "exact", "fim", False, _squared_grads)
    methods = all_methods("cpu")
    monkeypatch.setattr(suite, "all_methods", lambda device: {**methods, "fimfast_wrong": wrong})
    assert main(["--quick", "--workloads", "a", "--methods", "fimfast_wrong"]) == 1
    assert "parity_fail" in capsys.readouterr().out


def _fake_results() -> dict:
    ok = {"status": "ok", "notes": [], "time_ms": 10.0, "ratio": 2.0, "peak_extra_mb": 5.0,
          "err_1": 1e-7, "ops_per_call": 60, "views_per_call": 20}
    return {
        "provenance": {"time": "t", "cpu": "cpu", "gpu": None, "logical_cpus": 2,
                       "torch_threads": 2, "versions": {"torch": "2"}, "fimfast_version": "0",
                       "fimfast_git_sha": "abc", "fimfast_backends": {"torch": {"available": True}},
                       "argv": ["python", "-m", "benchmarks"]},
        "methods": {
            "floor": {"label": "floor", "library": "torch", "family": "floor", "random": False,
                      "note": ""},
            "fimfast_exact_torch": {"label": "fimfast exact", "library": "fimfast",
                                    "family": "exact", "random": False, "note": ""},
            "bp_diag_ggn_exact": {"label": "BackPACK exact", "library": "backpack",
                                  "family": "exact", "random": False, "note": ""},
        },
        "workloads": {"a": {
            "title": "tiny", "num_params": 10, "rows": 2, "classes": 3,
            "reference": {"method": "brute force"},
            "methods": {
                "floor": {"status": "ok", "notes": [], "time_ms": 5.0, "ratio": 1.0},
                "fimfast_exact_torch": ok,
                "bp_diag_ggn_exact": {"status": "unsupported", "notes": [],
                                      "error": "NotImplementedError: no"},
            },
        }},
    }


def test_report_tables_and_chart(tmp_path):
    data = _fake_results()
    md = report.markdown(data)
    assert "| a | exact | 2.00x, 5 MB, err 1.0e-07 (fimfast exact) | none ran |" in md
    assert "**unsupported**: `NotImplementedError: no`" in md
    assert "| fimfast exact | 10 | 2 | 60 (40) | 5 |" in md  # ops (of which kernels)
    path = tmp_path / "chart.png"
    report.chart(data, str(path))
    assert path.stat().st_size > 1000


def test_opcount_sees_the_backward_and_views():
    """The counter sits below autograd: a backward's operators are counted, views apart."""
    from benchmarks.opcount import count_ops

    x = torch.randn(4, 3, requires_grad=True)
    fwd = count_ops(lambda: (x * 2).view(-1).sum())
    # mul, view, sum
    assert fwd["ops"] == 3 and fwd["views"] == 1, fwd
    both = count_ops(lambda: (x * 2).view(-1).sum().backward())
    assert both["ops"] > fwd["ops"] + 2, both  # at least the seed grad, expand and mul of the bwd
    assert dict(both["top"])["aten.mul"] == 2, both  # forward x * 2 and its backward g * 2


def test_quick_counts_ops_per_step():
    """Every method that ran reports the ATen operators of one warm call; the training step
    dispatches some, EXACT (C backward columns) more than HUTCHINSON (one probe)."""
    names = ["fimfast_exact_torch", "fimfast_empirical_torch", "fimfast_monte_carlo_torch",
             "fimfast_hutchinson_torch", "fimfast_train_step_hutchinson_torch"]
    res = suite.run_quick(["a"], names)["a"]
    ops = {n: r["ops_per_call"] for n, r in res.items()}
    assert set(ops) == {"floor", *names}
    # the training step: 3 layers forward and backward plus the loss; more than the forward alone
    assert 20 <= ops["floor"] < 200, ops
    assert ops["fimfast_exact_torch"] > ops["fimfast_hutchinson_torch"] > ops["floor"], ops
    assert ops["fimfast_train_step_hutchinson_torch"] > ops["floor"], ops
    for n, r in res.items():
        assert 0 <= r["views_per_call"] < r["ops_per_call"], (n, r)
        assert sum(c for _, c in r["top_ops"]) <= r["ops_per_call"]


def test_opcount_does_not_import_dynamo():
    """torch wraps a dispatch mode's handler in torch._disable_dynamo unless told not to; its first
    call imports torch._dynamo (seconds), which would land inside the first counted call of each
    probe process and trip the per-call limit."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, torch\nfrom benchmarks.opcount import count_ops\n"
            "assert count_ops(lambda: torch.ones(2) + 1)['ops'] == 2\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_bench_fixed_cost_runs_and_reports(tmp_path):
    """The fixed-cost benchmark runs end to end on a tiny workload and writes its report."""
    from benchmarks import bench_fixed_cost

    out = tmp_path / "fixed"
    assert bench_fixed_cost.main(
        ["--workloads", "a", "--size", "tiny", "--rounds", "1", "--steps", "2", "--out", str(out),
         "--types", "hutchinson,exact"]
    ) == 0
    rep = json.loads((tmp_path / "fixed.json").read_text())
    s = next(iter(rep["workloads"]["a"]["summary"].values()))
    assert s["ratio"]["floor"] == 1.0
    assert set(s["cycle_over_step"]) == {"hutchinson", "empirical", "exact"}
    assert set(s["cycle_over_step_range"]) == set(s["cycle_over_step"])
    assert all(v > 0 for v in s["ratio"].values())
    types = bench_fixed_cost.OP_TYPES
    assert set(s["ops"]) == {"train", *types, *(f"cycle:{t}" for t in types)}
    assert all(0 < o["kernels"] <= o["all"] for o in s["ops"].values())
    md = (tmp_path / "fixed.md").read_text()
    assert "HUTCHINSON gap" in md and "ATen operators per call" in md
    assert s["empirical_gap_us"] is not None and "bare:empirical" in s["ratio"]
    assert s["hutchinson_fused_gap_us"] is not None and "bare:fused" in s["ratio"]
    assert {"step:hutchinson", "step:empirical", "step:exact"} <= set(s["ratio"])
    assert "step:monte_carlo" not in s["ratio"]


def test_bench_fixed_cost_ten_line_empirical_is_the_empirical_fisher():
    """The ten-line EMPIRICAL floor computes what an EMPIRICAL step does (so the gap to it is
    bookkeeping), and is left out for a model it does not cover."""
    import fimfast
    from benchmarks import bench_fixed_cost
    from benchmarks.workloads import build

    wl = build("a", "tiny", 0)
    m, x, y = wl.model, wl.inputs, wl.labels
    params = [p for p in m.parameters() if p.requires_grad]
    step, acc = bench_fixed_cost._bare_empirical(m, x, y, params)
    step()
    step()
    est = fimfast.DiagFisher(m, "empirical", seed=0)
    est.step((x, y))
    est.step((x, y))
    for p, f in zip(params, est.result().values()):
        torch.testing.assert_close(acc[id(p)], f, rtol=1e-4, atol=1e-7)
    assert any(acc[id(p)].abs().max() > 0 for p in params)
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    xc = torch.randn(5, 1, 6)
    assert bench_fixed_cost._bare_empirical(conv, xc, y[:5] % 3, list(conv.parameters())) is None


def test_bench_conv_patches_runs_and_reports(tmp_path):
    """The convolution-patches benchmark on the CNN (c), one round: EMPIRICAL (one backward)
    and EXACT with patches by pieces hold less than with the patches kept (the CNN's patches,
    9.75 MB, are most of such a step)."""
    from benchmarks import bench_conv_patches

    out = tmp_path / "patches.json"
    bench_conv_patches.main(["--workloads", "c", "--rounds", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["c"]
    assert rows["floor_tensor_mb"] > 0
    for m in ("empirical", "exact@bound"):
        assert rows[f"{m}/chunked"]["tensor_mb"] < rows[f"{m}/kept"]["tensor_mb"] - 5
        assert rows[f"{m}/kept"]["ratio_median"] == 1.0
    assert rows["empirical/default"]["tensor_mb"] == rows["empirical/chunked"]["tensor_mb"]


def test_bench_persample_cost_runs_and_reports(tmp_path):
    """The per-sample cost benchmark, one round of the EmbeddingBag workload: a ratio per type
    to the training step, and its report."""
    from benchmarks import bench_persample_cost

    out = tmp_path / "cost"
    assert bench_persample_cost.main(
        ["--workloads", "bag", "--rounds", "1", "--steps", "2", "--out", str(out)]
    ) == 0
    rep = json.loads((tmp_path / "cost.json").read_text())
    (runs,) = rep["runs"]["bag"].values()
    assert runs[0]["floor_ms"] > 0 and runs[0]["empirical"] > 0
    assert "| bag | empirical |" in (tmp_path / "cost.md").read_text()


def test_bench_persample_cost_class_chunk_and_attention(tmp_path):
    """EXACT with a fixed class chunk (``exact:cc3``) on the attention workload of
    benchmarks/bench_recurrent.py."""
    from benchmarks import bench_persample_cost

    out = tmp_path / "cost"
    assert bench_persample_cost.main(
        ["--workloads", "mha_bias_kv", "--fim-types", "exact:cc3", "--rounds", "1", "--steps",
         "1", "--out", str(out)]
    ) == 0
    rep = json.loads((tmp_path / "cost.json").read_text())
    (runs,) = rep["runs"]["mha_bias_kv"].values()
    assert runs[0]["exact:cc3"] > 1.0


def test_bench_kfac_cache_runs_and_puts_the_bound_back():
    """benchmarks/bench_kfac_cache.py on (c): the three calls, their paired differences, and the
    row-product bound of the convolution factor as it was."""
    from benchmarks import bench_kfac_cache
    from fimfast.structured import convgram

    out = bench_kfac_cache.measure("c", 3)
    assert {"kfac", "kfac:cold", "kfac:strips", "train_ms"} <= set(out)
    assert set(out["paired_ms kfac:strips - kfac"]) == {"q1", "median", "q3"}
    assert convgram.PIXEL_ROW_MAX == 96
