"""The ``backend`` option reaches every op a step calls: with ``backend="torch"`` no kernel of the
extension runs, the channel norms' terms, the recurrent kernels and the factor sums included
(they took the automatic choice before); the estimates equal the automatic backend's to rounding
(fimfast/ops/registry.py ``step_backend``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast
from fimfast.ops import registry

pytestmark = pytest.mark.skipif(not registry.backend_status("cpp", torch.device("cpu"))[0],
                                reason="needs the C++ extension (the automatic backend's kernels)")


class _Net(nn.Module):
    """Conv1d, GroupNorm, GRU, LayerNorm and Linear: norm terms, recurrent kernels, products."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.gn(self.conv(x)))
        out, _ = self.gru(h.transpose(1, 2))
        return self.head(self.ln(out[:, -1]))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 7, generator=g), torch.randint(0, 3, (6,), generator=g)


class _Calls:
    """Every ``cpp`` implementation of the registry replaced by a counter of its calls."""

    def __init__(self, monkeypatch):
        self.count: dict[str, int] = {}
        for op, impls in registry._IMPLS.items():
            target = impls.get("cpp")
            if target is None:
                continue
            real = registry._load(target)

            def spy(*a, _op=op, _real=real, **k):
                self.count[_op] = self.count.get(_op, 0) + 1
                return _real(*a, **k)

            monkeypatch.setitem(registry._LOADED, target, spy)
        monkeypatch.setattr(registry, "_AUTO_CHOICE", {})
        monkeypatch.setattr(registry, "_AUTO_BOUND", {})


@pytest.mark.parametrize("t", ["exact", "empirical", "monte_carlo", "hutchinson"])
def test_torch_backend_runs_no_extension_op(t, monkeypatch):
    torch.manual_seed(0)
    model = _Net()
    batch = _data()
    calls = _Calls(monkeypatch)
    auto = fimfast.DiagFisher(model, t, seed=1)
    auto.step(batch)
    assert calls.count, "the automatic backend ran no cpp op: the check would be vacuous"
    calls.count.clear()
    ref = fimfast.DiagFisher(model, t, seed=1, backend="torch")
    ref.step(batch)
    assert calls.count == {}, f"backend='torch' ran the extension's {sorted(calls.count)}"
    a, r = auto.result(), ref.result()
    for k in a.keys():
        assert float(r[k].abs().sum()) > 0
        torch.testing.assert_close(a[k], r[k], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("rep", ["kfac", "ekfac"])
def test_torch_backend_structured(rep, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 260), nn.Tanh(), nn.Linear(260, 4))  # > 192 columns
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 300, generator=g), torch.randint(0, 4, (16,), generator=g))]
    calls = _Calls(monkeypatch)
    auto = fimfast.fisher(model, data, "exact", rep)
    assert calls.count.get("gram_upper_"), "the factor sums took no cpp op: vacuous"
    calls.count.clear()
    ref = fimfast.fisher(model, data, "exact", rep, backend="torch")
    assert calls.count == {}, f"backend='torch' ran the extension's {sorted(calls.count)}"
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    torch.testing.assert_close(auto.mv(v), ref.mv(v), rtol=1e-4, atol=1e-6)
    assert float(auto.mv(v).abs().sum()) > 0


def test_step_backend_is_scoped(monkeypatch):
    """Outside a step, and after a step that raised, ops take the automatic choice again."""
    model, batch = _Net(), _data()
    est = fimfast.DiagFisher(model, "exact", backend="torch")
    est.step(batch)
    assert getattr(registry._STEP, "backend", None) is None
    with pytest.raises(ValueError):
        est.step((batch[0], torch.full((6,), 7)))  # labels out of range
    assert getattr(registry._STEP, "backend", None) is None
    with registry.step_backend("torch"):
        assert registry.resolve("norm_terms", None, torch.device("cpu"))[0] == "torch"
        assert registry.resolve("norm_terms", "cpp", torch.device("cpu"))[0] == "cpp"
        with registry.step_backend(None):  # a nested estimator without the option
            assert registry.resolve("norm_terms", None, torch.device("cpu"))[0] != "torch" or \
                registry._env.backend() == "torch"
        assert registry.resolve("norm_terms", None, torch.device("cpu"))[0] == "torch"
    with registry.step_backend("triton"):  # an op without triton: the automatic choice
        assert registry.resolve("norm_terms", None, torch.device("cpu"))[0] in ("cpp", "torch")
