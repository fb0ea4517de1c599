"""fimfast.ops.recurrent_bptt: the ``cpp`` kernel (csrc/cpu/recurrent_bptt.cpp) against the torch
reference (fimfast/ops/recurrent.py) and against plain autograd through unrolled cells.

Both directions, every cell, one cotangent and a batch of them (the legacy vmap of
``autograd.grad(..., is_grads_batched=True)``, which the kernel's Batched rule runs as rows of one
recurrence), float64 to rounding and float32 against float64. End to end: tests/test_recurrent*.
"""

from __future__ import annotations

import pytest
import torch
from op_backends import require
from torch._vmap_internals import _vmap

from fimfast import ops

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
T, N, H = 5, 3, 4


def _case(mode: str, dtype=torch.float64, seed: int = 0):
    """Saved tensors and incoming gradients of ``mode`` with ``T`` steps (random, consistent
    enough for the recurrence: the kernels take them as given)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    G = GATES[mode] * H
    saved = {"LSTM": lambda: [r(T, N, G), r(N, H)], "GRU": lambda: [r(T, N, G), r(T, N, G),
                                                                    r(T, N, H)],
             }.get(mode, lambda: [r(T, N, H)])()
    whh = 0.5 * r(G, H)
    dys, dh = r(T, N, H), r(N, H)
    dc = r(N, H) if mode == "LSTM" else None
    return saved, whh, dys, dh, dc


def _lstm_autograd(a, c0, dys, dh, dc, reverse):
    """``(dG, dc0)`` by plain autograd through the LSTM cells from the gate pre-activations ``a``
    taken as given (as the kernels take them: no path from ``h_{t-1}`` back into ``a``)."""
    a, c = a.clone().requires_grad_(), c0.clone().requires_grad_()
    c_init, hs = c, [None] * T
    steps = list(range(T - 1, -1, -1) if reverse else range(T))
    for t in steps:
        i, f, g, o = a[t].chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        hs[t] = o.sigmoid() * c.tanh()
    return torch.autograd.grad([torch.stack(hs), hs[steps[-1]], c], [a, c_init], [dys, dh, dc])


def _close(a, b, tol):
    if a is None or b is None:
        return a is None and b is None
    return float((a - b).abs().max()) <= tol * (1 + float(b.abs().max()))


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_equals_the_reference_float64(mode, reverse):
    require("cpp")
    saved, whh, dys, dh, dc = _case(mode)
    ref = ops.recurrent_bptt(mode, saved, whh, dys, dh, dc, reverse, backend="torch")
    got = ops.recurrent_bptt(mode, saved, whh, dys, dh, dc, reverse, backend="cpp")
    assert [x is None for x in got] == [x is None for x in ref]
    for a, b in zip(got, ref, strict=True):
        assert _close(a, b, 1e-14)


@pytest.mark.parametrize("mode", list(GATES))
def test_cpp_float32_against_float64(mode):
    require("cpp")
    saved, whh, dys, dh, dc = _case(mode)
    ref = ops.recurrent_bptt(mode, saved, whh, dys, dh, dc, True, backend="torch")
    f = lambda t: None if t is None else t.float()  # noqa: E731
    got = ops.recurrent_bptt(mode, [s.float() for s in saved], whh.float(), dys.float(),
                             dh.float(), f(dc), True, backend="cpp")
    for a, b in zip(got, ref, strict=True):
        assert a is None or a.dtype == torch.float32
        assert _close(None if a is None else a.double(), b, 1e-5)


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("unbatched", ["none", "dh"])
def test_batched_columns_equal_one_call_per_column(mode, reverse, unbatched):
    """Under the legacy vmap (the engine's batched backward) the kernel's Batched rule gives, per
    column, the result of an unbatched call; a gradient without the batch is shared by all."""
    require("cpp")
    saved, whh, dys, dh, dc = _case(mode)
    B = 4
    g = torch.Generator().manual_seed(5)
    bdys = torch.randn(B, *dys.shape, generator=g, dtype=dys.dtype)
    bdh = torch.randn(B, *dh.shape, generator=g, dtype=dh.dtype)
    bdc = None if dc is None else torch.randn(B, *dc.shape, generator=g, dtype=dc.dtype)
    args = [bdys, bdh] + ([] if dc is None else [bdc])
    dims = [0, None if unbatched == "dh" else 0] + ([] if dc is None else [0])

    def one(*gs):
        out = ops.recurrent_bptt(mode, saved, whh, gs[0], dh if gs[1] is None else gs[1],
                                 gs[2] if len(gs) > 2 else None, reverse, backend="cpp")
        return tuple(x for x in out if x is not None)

    got = _vmap(lambda *xs: one(*_fill(xs, dims)), tuple(d for d in dims if d is not None),
                0)(*[a for a, d in zip(args, dims) if d is not None])
    for b in range(B):
        gs = [bdys[b], dh if unbatched == "dh" else bdh[b]] + ([] if dc is None else [bdc[b]])
        ref = ops.recurrent_bptt(mode, saved, whh, gs[0], gs[1], gs[2] if dc is not None else None,
                                 reverse, backend="torch")
        ref = [x for x in ref if x is not None]
        for a, r in zip(got, ref, strict=True):
            assert _close(a[b], r, 1e-14)


def _fill(xs, dims):
    it = iter(xs)
    return [next(it) if d is not None else None for d in dims]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_lstm_equals_autograd_through_the_cells(backend):
    """The LSTM's derivatives written out (the cell states recomputed from the gates) against
    autograd through the cells with the same gates, both directions (W_hh = 0: the kernels take
    the gate pre-activations as given, so no gradient flows from h_{t-1} into them)."""
    require(backend)
    for reverse in (False, True):
        saved, whh, dys, dh, dc = _case("LSTM")
        whh = torch.zeros_like(whh)
        got = ops.recurrent_bptt("LSTM", saved, whh, dys, dh, dc, reverse, backend=backend)
        dG, dc0 = _lstm_autograd(*saved, dys, dh, dc, reverse)
        assert _close(got[0], dG, 1e-13) and _close(got[3], dc0, 1e-13)


def test_other_dtypes_run_the_reference():
    require("cpp")
    saved, whh, dys, dh, _ = _case("GRU", torch.bfloat16)
    got = ops.recurrent_bptt("GRU", saved, whh, dys, dh, None, False, backend="cpp")
    ref = ops.recurrent_bptt("GRU", saved, whh, dys, dh, None, False, backend="torch")
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], ref[0])


def test_bad_arguments_name_the_argument():
    require("cpp")
    saved, whh, dys, dh, dc = _case("LSTM")
    with pytest.raises(ValueError, match="mode"):
        ops.recurrent_bptt("LSTMX", saved, whh, dys, dh, dc)
    with pytest.raises(ValueError, match="saved"):
        ops.recurrent_bptt("LSTM", saved[:1], whh, dys, dh, dc)
    with pytest.raises(ValueError, match="dc"):
        ops.recurrent_bptt("LSTM", saved, whh, dys, dh, None)
    F = torch.ops.fimfast.recurrent_bptt
    with pytest.raises(RuntimeError, match="whh"):
        F("LSTM", saved, whh[:, :3], dys, dh, dc, False)
    with pytest.raises(RuntimeError, match="dys"):
        F("LSTM", saved, whh, dys[..., :3], dh, dc, False)
    with pytest.raises(RuntimeError, match="dh"):
        F("LSTM", saved, whh, dys, dh[:2], dc, False)
    with pytest.raises(RuntimeError, match="saved"):
        F("LSTM", [saved[0][:, :2], saved[1]], whh, dys, dh, dc, False)
    with pytest.raises(RuntimeError, match="dtype"):
        F("LSTM", saved, whh, dys.float(), dh, dc, False)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_opcheck(mode):
    require("cpp")
    import fimfast.ops.cpp  # noqa: F401  (loads the extension and its fake implementations)

    saved, whh, dys, dh, dc = _case(mode, torch.float32)
    torch.library.opcheck(torch.ops.fimfast.recurrent_bptt,
                          (mode, saved, whh, dys, dh, dc, True))


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("reverse", [False, True])
def test_columns_zero_at_the_first_steps(mode, reverse):
    """Columns whose gradient is zero at the first steps of the backward (a tagger's column for
    one position; one zero throughout) start later: the same gradients as the reference, zeros
    before, batched with columns active from the start in between (the products then cover
    columns still zero)."""
    require("cpp")
    saved, whh, dys, dh, dc = _case(mode)
    B = 5
    bdys = torch.zeros(B, *dys.shape, dtype=dys.dtype)
    for b, tau in enumerate([1, 3, None, 0, 4]):
        if tau is not None:
            bdys[b, tau] = dys[tau]
    bdh = torch.zeros(B, *dh.shape, dtype=dh.dtype)
    bdh[3] = dh  # column 3 starts at the first step through dh
    bdc = None if dc is None else torch.zeros(B, *dc.shape, dtype=dc.dtype)

    def one(*gs):
        out = ops.recurrent_bptt(mode, saved, whh, gs[0], gs[1], gs[2] if len(gs) > 2 else None,
                                 reverse, backend="cpp")
        return tuple(x for x in out if x is not None)

    args = [bdys, bdh] + ([] if dc is None else [bdc])
    batched = _vmap(one, tuple(0 for _ in args), 0)(*args)
    for b in range(B):
        gs = [x[b] for x in args] + ([None] if dc is None else [])
        ref = [x for x in ops.recurrent_bptt(mode, saved, whh, *gs, reverse, backend="torch")
               if x is not None]
        single = one(*[x[b] for x in args])
        for got, s1, r in zip(batched, single, ref, strict=True):
            assert _close(got[b], r, 1e-14) and _close(s1, r, 1e-14)
    assert all(float(x[2].abs().max()) == 0 for x in batched)  # column 2: no gradient at all
