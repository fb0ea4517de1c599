"""fimfast.merge: Fisher-weighted averaging against hand values and a float64 oracle, streaming
from files, and Fisher files with metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fimfast
from fimfast.merge import fisher_merge, load_fisher, model_fingerprint, save_fisher


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_hand_values_and_the_all_zero_coordinate():
    m1, m2 = {"w": _t(1.0, 10.0)}, {"w": _t(5.0, 20.0)}
    f1, f2 = {"w": _t(1.0, 0.0)}, {"w": _t(3.0, 0.0)}
    out = fisher_merge([m1, m2], [f1, f2], eps=0.0 + 1e-12)
    # coordinate 0: (1*1 + 3*5) / 4 = 4; coordinate 1: no Fisher anywhere -> plain mean 15
    assert torch.allclose(out["w"], _t(4.0, 15.0), atol=1e-9)
    # weights 1:3 (normalised): (0.25*1*1 + 0.75*3*5) / (0.25 + 2.25) = 4.6; (0.25*10 + 0.75*20)
    out = fisher_merge([m1, m2], [f1, f2], weights=[1, 3], eps=1e-12)
    assert torch.allclose(out["w"], _t(4.6, 17.5), atol=1e-9)
    with pytest.raises(ValueError, match="use eps > 0"):
        fisher_merge([m1, m2], [f1, f2], eps=0)


def test_matches_a_float64_oracle():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,)}
    models = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    fishers = [{k: torch.rand(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    out = fisher_merge(models, fishers, weights=w, eps=1e-3)
    for k in shapes:
        num = sum(
            wi * (f[k].double() + 1e-3) * m[k].double() for wi, f, m in zip(w, fishers, models)
        )
        den = sum(wi * (f[k].double() + 1e-3) for wi, f in zip(w, fishers))
        assert out[k].dtype == torch.float32
        assert torch.allclose(out[k].double(), num / den, rtol=1e-6, atol=1e-7)


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def test_modules_files_and_in_place_output_agree(tmp_path):
    nets = [_net(s) for s in range(3)]
    for i, n in enumerate(nets):
        n[1].num_batches_tracked.fill_(7 + i)
        with torch.no_grad():
            n[1].running_mean.fill_(float(i))
    x = torch.randn(16, 4)
    for n in nets:
        n.eval()
    Fs = [fimfast.diag_fisher(n, [(x,)], "exact", reduction="mean") for n in nets]
    with pytest.warns(UserWarning, match="num_batches_tracked"):
        ref = fisher_merge(nets, Fs)
    paths_m, paths_f = [], []
    for i, (n, F) in enumerate(zip(nets, Fs)):
        save_file({k: v.contiguous() for k, v in n.state_dict().items()}, tmp_path / f"m{i}.st")
        F.save(str(tmp_path / f"f{i}.st"))
        paths_m.append(str(tmp_path / f"m{i}.st"))
        paths_f.append(str(tmp_path / f"f{i}.st"))
    with pytest.warns(UserWarning, match="num_batches_tracked"):
        from_files = fisher_merge(paths_m, paths_f, out=str(tmp_path / "merged.st"))
    assert from_files == str(tmp_path / "merged.st")
    target = _net(99)
    with pytest.warns(UserWarning, match="num_batches_tracked"):
        fisher_merge([n.state_dict() for n in nets], Fs, out=target)
    for k, v in ref.items():
        assert torch.equal(target.state_dict()[k], v)
    from safetensors.torch import load_file

    for k, v in load_file(str(tmp_path / "merged.st")).items():
        assert torch.equal(v, ref[k]), k
    # buffers with no Fisher: running_mean is the plain average (0, 1, 2) -> 1; the counter is
    # the first model's
    assert torch.allclose(ref["1.running_mean"], torch.ones(6))
    assert int(ref["1.num_batches_tracked"]) == 7
    # a Fisher-weighted coordinate lies between the models' values
    w = torch.stack([n[0].weight.detach() for n in nets])
    assert bool((ref["0.weight"] >= w.min(0).values - 1e-6).all())
    assert bool((ref["0.weight"] <= w.max(0).values + 1e-6).all())


def test_streaming_reads_one_tensor_of_each_file_at_a_time(tmp_path, monkeypatch):
    from safetensors import safe_open

    calls = []

    class Counting:
        def __init__(self, *a, **k):
            self._f = safe_open(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def metadata(self):
            return self._f.metadata()

        def get_tensor(self, name):
            calls.append(name)
            return self._f.get_tensor(name)

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    paths = []
    for i in range(4):
        p = tmp_path / f"m{i}.st"
        save_file({f"t{j}": torch.full((8,), float(i)) for j in range(5)}, str(p))
        paths.append(str(p))
    fis = [{f"t{j}": torch.ones(8) for j in range(5)} for _ in range(4)]
    out = fisher_merge(paths, fis)
    assert torch.allclose(out["t3"], torch.full((8,), 1.5))
    # tensors read in name order, every model's copy of one name before the next name
    assert calls == [f"t{j}" for j in range(5) for _ in range(4)]


def test_errors():
    m = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="one Fisher per model"):
        fisher_merge([m, m], [{"w": torch.ones(2)}])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        fisher_merge([m, m], [m, m], weights=[0, 0])
    with pytest.raises(ValueError, match="negative"):
        fisher_merge([m], [{"w": -torch.ones(2)}])
    with pytest.raises(ValueError, match=r"models\[1\]\['w'\] has shape"):
        fisher_merge([m, {"w": torch.ones(3)}], [{}, {}])
    with pytest.raises(ValueError, match="in fishers \\[0\\] only"):
        fisher_merge([m, m], [{"w": torch.ones(2)}, {}])
    with pytest.raises(FileNotFoundError, match="models\\[0\\]"):
        fisher_merge(["/nonexistent.safetensors"], [m])


def test_fisher_files_keep_their_metadata(tmp_path):
    net = _net(0).eval()
    x = torch.randn(24, 4)
    F = fimfast.diag_fisher(net, [(x[:12],), (x[12:],)], "exact", reduction="mean")
    meta = save_fisher(F, tmp_path / "f.st", model=net, revision="v1.2", dataset="toy[:24]")
    assert meta["estimator"] == "exact" and meta["reduction"] == "mean"
    assert meta["count"] == 24 and meta["batches"] == 2 and meta["dataset"] == "toy[:24]"
    header = fimfast.DiagFIM.read_metadata(str(tmp_path / "f.st"))
    assert header["model_sha256"] == model_fingerprint(net) and header["format"] == 1
    assert header["model_revision"] == "v1.2"
    json.dumps(header)
    G = load_fisher(tmp_path / "f.st", model=net)
    assert G.allclose(F, rtol=0, atol=0) and list(G) == list(F)
    other = _net(1)
    with pytest.raises(ValueError, match="fingerprint"):
        load_fisher(tmp_path / "f.st", model=other)
    assert load_fisher(tmp_path / "f.st", model=other, check=False).allclose(F)
    # a file written by DiagFIM.save alone still loads (format recorded, no fingerprint)
    F.save(str(tmp_path / "plain.st"))
    assert load_fisher(tmp_path / "plain.st", model=other).allclose(F)


def test_fingerprint_sees_every_bit():
    net = _net(0)
    a = model_fingerprint(net)
    assert a == model_fingerprint(dict(net.named_parameters()))
    with torch.no_grad():
        net[0].weight[0, 0] = torch.nextafter(net[0].weight[0, 0], torch.tensor(2.0))
    assert model_fingerprint(net) != a


def test_normalize_divides_each_fisher_by_its_mean():
    m1, m2 = {"w": _t(0.0, 0.0), "b": _t(0.0)}, {"w": _t(1.0, 1.0), "b": _t(1.0)}
    f1 = {"w": _t(1.0, 2.0), "b": _t(3.0)}  # mean 2
    f2 = {"w": _t(100.0, 100.0), "b": _t(400.0)}  # mean 200
    plain = fisher_merge([m1, m2], [f1, f2], eps=0)
    assert torch.allclose(plain["w"], _t(100 / 101, 100 / 102))
    out = fisher_merge([m1, m2], [f1, f2], eps=0, normalize=True)
    # normalised: f1 -> (0.5, 1 | 1.5), f2 -> (0.5, 0.5 | 2)
    assert torch.allclose(out["w"], _t(0.5 / 1.0, 0.5 / 1.5))
    assert torch.allclose(out["b"], _t(2 / 3.5))
    with pytest.raises(ValueError, match="all zero"):
        fisher_merge([m1, m2], [f1, {"w": torch.zeros(2), "b": torch.zeros(1)}], normalize=True)


def test_fisher_merge_example(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "fisher_merge.py"
    spec = importlib.util.spec_from_file_location("fisher_merge_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--out-dir", str(tmp_path)])
    assert (tmp_path / "fisher_low.safetensors").exists()
    assert fimfast.DiagFIM.read_metadata(str(tmp_path / "fisher_low.safetensors"))["dataset"]
    # measured: average 0.861, Fisher 0.803, normalised Fisher 0.895
    assert out["fisher_normalized"]["all"] > out["average"]["all"] + 0.01
    assert out["average"]["all"] > max(out["model_low"]["all"], out["model_high"]["all"])
