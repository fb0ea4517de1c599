"""The finiteness a state knows of its values (fimfast.known_finite): a read checks only what no
kernel vouched for, and every path that writes a NaN/Inf still has it refused.

The overflows are planted with finite logits: inputs of 1e20 into a linear layer of weights near
1e-21 (its gradient squares overflow float32), and, for a lookup table, rows near 1e-30 scaled by
1e25 on the way (the rows' gradients square past float32's range)."""

import copy
import pickle

import pytest
import torch
from torch import nn

import fimfast
from fimfast import _ext, finite, known_finite
from fimfast import state as statelib

TYPES = ["hutchinson", "empirical", "monte_carlo", "exact"]
HAVE = _ext.host_function("form_lanes") is not None
needs_ext = pytest.mark.skipif(not HAVE, reason="the extension has no form_lanes")


def _linear(dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)
    return m


def _clean(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)


def _overflowing(model, dtype=torch.float32):
    """A batch whose logits are finite while the squares of the first layer's gradients are not:
    inputs of ``big`` and that layer's weights scaled by ``1 / big`` (float64: 1e160)."""
    big = 1e20 if dtype == torch.float32 else 1e160
    with torch.no_grad():
        model[0].weight.mul_(1.0 / big)
    x, y = _clean(dtype)
    return x * big, y


class _Table(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=sparse)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.emb.weight.mul_(1e-30)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1) * 1e25)


def _calls(monkeypatch):
    """The tensors each read hands to the finiteness check (a list per check)."""
    seen = []
    real = statelib.all_finite

    def spy(ts):
        ts = list(ts)
        seen.append(len(ts))
        return real(ts)

    monkeypatch.setattr(statelib, "all_finite", spy)
    return seen


def _cycle(model, batch, t, **kw):
    fimfast.zero_diag_fim(model, t)
    fimfast.diag_fim_step(model, batch, t, fim_opts={"seed": 0}, **kw)
    return fimfast.get_diag_fim(model, t)


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("how", ["cycle", "accumulate", "mean", "ema", "float64", "torch"])
def test_every_commit_path_still_refuses_an_overflow(monkeypatch, t, how):
    if how == "torch":  # the Python paths: no reporting kernel, no extension fold
        monkeypatch.setattr(known_finite, "_HOST", [None, None])
    dtype = torch.float64 if how == "float64" else torch.float32
    model = _linear(dtype)
    clean = _clean(dtype)
    bad = _overflowing(model, dtype)
    kw = {"reduction": "mean"} if how == "mean" else {"ema": 0.9} if how == "ema" else {}
    if how == "accumulate":  # a state that holds a sum already: fold_squares / fold_lanes
        est = fimfast.DiagFisher(model, t, seed=0)
        est.step(clean)
        assert all(torch.isfinite(v).all() for v in est.result().values())
        est.step(bad)
        with pytest.raises(ValueError, match=r"estimate of \['0.weight'\] has non-finite"):
            est.result()
        return
    for _ in range(2):  # the second cycle runs the prepared programs
        _cycle(model, clean, t, **kw)
        fimfast.zero_diag_fim(model, t)
        fimfast.diag_fim_step(model, bad, t, fim_opts={"seed": 0}, **kw)
        with pytest.raises(ValueError, match=r"estimate of \['0.weight'\] has non-finite"):
            fimfast.get_diag_fim(model, t)


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("sparse", [True, False])
def test_a_lookup_table_whose_squares_overflow_is_refused(t, sparse):
    torch.manual_seed(0)
    model = _Table(sparse)
    ids, y = torch.randint(0, 20, (6, 3)), torch.randint(0, 3, (6,))
    for _ in range(2):
        fimfast.zero_diag_fim(model, t)
        fimfast.diag_fim_step(model, (ids, y), t, fim_opts={"seed": 0})
        with pytest.raises(ValueError, match=r"estimate of \['emb.weight'\] has non-finite"):
            fimfast.get_diag_fim(model, t)
    est = fimfast.DiagFisher(model, t, seed=0)
    est.step((ids, y))
    est.step((ids, y))
    with pytest.raises(ValueError, match="non-finite"):
        est.result()


@needs_ext
@pytest.mark.parametrize("t", ["hutchinson", "empirical", "monte_carlo"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_seed_cycle_reads_no_value_its_kernels_vouched_for(monkeypatch, t, reduction):
    """The common path: the squares' kernels report, the read checks nothing (EXACT's general
    path reports nothing: checked); a second read of the same state checks nothing either."""
    model = _linear()
    batch = _clean()
    seen = _calls(monkeypatch)
    for _ in range(3):
        seen.clear()
        out = _cycle(model, batch, t, reduction=reduction)
    assert seen == [] and all(float(v.sum()) > 0 for v in out.values())
    exact = _cycle(model, batch, "exact")
    assert all(torch.isfinite(v).all() for v in exact.values())
    assert seen == [4]
    fimfast.get_diag_fim(model, "exact")  # checked once, then known
    assert seen == [4]


def test_an_average_is_always_checked(monkeypatch):
    """The bias correction divides by ``1 - beta^t <= 1``: a finite average may read infinite."""
    model = _linear()
    seen = _calls(monkeypatch)
    for _ in range(2):
        seen.clear()
        _cycle(model, _clean(), "empirical", ema=0.5)
        assert seen == [4]


def test_a_value_written_in_place_after_a_read_is_checked_again():
    model = _linear()
    est = fimfast.DiagFisher(model, "empirical", seed=0)
    est.step(_clean())
    est.result()
    est.state.values[2][1] = float("inf")  # bypasses every commit: its version moves
    with pytest.raises(ValueError, match=r"\['2.weight'\] has non-finite"):
        est.result()


def test_copies_and_pickles_know_nothing():
    model = _linear()
    est = fimfast.DiagFisher(model, "hutchinson", seed=0)
    est.step(_clean())
    est.result()
    assert est.state._finite is not None
    s = est.state
    for st in (copy.copy(s), copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert getattr(st, "_finite", None) is None
        assert known_finite.unknown(st.values, getattr(st, "_finite", None)) == list(range(4))


def test_a_loaded_state_is_checked_at_its_first_read():
    """float64 values finite where saved overflow the float32 state they are loaded into."""
    model = _linear()
    est = fimfast.DiagFisher(model, "empirical", seed=0)
    est.step(_clean())
    est.result()
    sd = est.state_dict()
    sd["state"]["values"]["0.bias"] = torch.full((5,), 1e300, dtype=torch.float64)
    est.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"\['0.bias'\] has non-finite"):
        est.result()


def test_a_failed_step_leaves_what_is_known():
    model = _linear()
    est = fimfast.DiagFisher(model, "empirical", seed=0)
    est.step(_clean())
    est.result()
    rec = list(est.state._finite)
    with pytest.raises(ValueError):
        est.step((torch.randn(8, 4), torch.full((8,), 7)))  # labels out of range
    assert est.state._finite == rec
    assert known_finite.unknown(est.state.values, est.state._finite) == []


@needs_ext
def test_form_lanes_bounds_and_values():
    """``form_lanes`` writes what torch forms and vouches only where its bound holds."""
    fn = _ext.host_function("form_lanes")
    g = torch.Generator().manual_seed(0)
    G, A = torch.randn(7, 3, generator=g), torch.randn(7, 5, generator=g)
    want_w, want_b = (G.square().t() @ A.square()), G.square().sum(0)

    def run(G, A, transposed=False):
        vals = [torch.empty(5, 3) if transposed else torch.empty(3, 5), torch.empty(3),
                torch.empty(2)]
        known = fn(vals, [G], [A], [0], [1], [transposed])
        return vals, known

    vals, known = run(G, A)
    assert known == [True, True, True]
    assert torch.equal(vals[0], want_w) and torch.equal(vals[1], want_b)
    assert torch.equal(vals[2], torch.zeros(2))
    vals, known = run(G, A, transposed=True)
    assert known == [True, True, True] and torch.equal(vals[0], A.square().t() @ G.square())
    # near the top of the range: not vouched for, though every entry is finite
    vals, known = run(G, A * 1e18)
    assert known == [False, True, True] and torch.isfinite(vals[0]).all()
    # overflowing squares, NaN, zeros times infinity
    for a in (A * 1e20, A.clone().index_fill_(1, torch.tensor([2]), float("nan"))):
        vals, known = run(G, a)
        assert known[0] is False and not torch.isfinite(vals[0]).all()
    vals, known = run(torch.zeros(7, 3), A * 1e20)
    assert known[0] is False and vals[0].isnan().all()
    vals, known = run(G * 1e20, A)
    assert known[:2] == [False, False]
    # a G not contiguous: squared by ATen, nothing vouched for
    vals, known = run(G.t().contiguous().t(), A)
    assert known[:2] == [False, False] and torch.equal(vals[0], want_w)
    assert fn([torch.empty(3, 5)], [G], [A], [0], [1], [False]) is None  # slot 1 missing


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_square_finite_matches_torch_and_reports(dtype):
    fn = _ext.host_function("square_finite")
    big = torch.finfo(dtype).max ** 0.5 * 2
    for scale in (1.0, 0.25, 3.0):
        a = torch.randn(70000, dtype=dtype)  # parallel chunks above torch's grain
        b = torch.randn(9, dtype=dtype)
        b[4] = big
        want = [a * a * scale if scale != 1 else a * a, b * b * scale if scale != 1 else b * b]
        got = [a.clone(), b.clone()]
        assert fn(got, scale) == [True, False]
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    c = torch.randn(5, dtype=dtype)
    c[1] = float("nan")
    assert fn([c], 1.0) == [False]
    assert fn([torch.randn(3, dtype=dtype).t()[None].expand(2, 3)], 1.0) is None
    assert fn([torch.randn(3, requires_grad=True)], 1.0) is None


def test_the_check_of_a_read_is_still_exact(monkeypatch):
    """A read that checks goes through all_finite on the bits (the extension's or torch's)."""
    monkeypatch.setattr(finite, "_HOST", ())
    monkeypatch.setattr(finite, "_host", lambda: ())
    model = _linear()
    bad = _overflowing(model)
    monkeypatch.setattr(known_finite, "_HOST", [None, None])
    fimfast.zero_diag_fim(model, "empirical")
    fimfast.diag_fim_step(model, bad, "empirical")
    with pytest.raises(ValueError, match="non-finite"):
        fimfast.get_diag_fim(model, "empirical")
