"""The columns of a per-sample step taken a span at a time (:meth:`Columns.span`) and the squares
of the logits layer's closed form (:meth:`Columns.squares`)."""

from __future__ import annotations

import pytest
import torch

from fimfast.persample import columns as colmod
from fimfast.persample.columns import Columns
from fimfast.types import FIMType, Options


def _z(R: int, C: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, C, generator=g, dtype=torch.float64).mul_(4.0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("shape", [(5, 2), (7, 3), (128, 10), (3, 40)])
def test_span_is_take_bit_for_bit(dtype, likelihood, shape):
    """Every span of EXACT's columns equals the columns :meth:`Columns.take` forms, bit for bit,
    whether they are formed at once (few) or a span at a time (many)."""
    z = _z(*shape, dtype)
    opts = Options(likelihood=likelihood)
    ref = Columns(z, None, FIMType.EXACT, opts, 0, 0)
    whole = Columns(z, None, FIMType.EXACT, opts, 0, 0)
    num = ref.num
    for k0 in range(num):
        for k1 in range(k0 + 1, num + 1):
            want = ref.take(torch.arange(k0, k1))
            got = whole.span(k0, k1)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want), (k0, k1)


def test_span_beyond_the_whole_bound(monkeypatch):
    """Columns beyond :data:`WHOLE_ELEMS` are formed a span at a time, the same values."""
    z = _z(16, 9, torch.float32, 1)
    small = Columns(z, None, FIMType.EXACT, Options(), 0, 0).span(2, 6)
    monkeypatch.setattr(colmod, "WHOLE_ELEMS", 0)
    cols = Columns(z, None, FIMType.EXACT, Options(), 0, 0)
    got = cols.span(2, 6)
    assert "_whole" not in cols.__dict__  # formed for the span only
    assert torch.equal(got, small)


def test_reduced_factor_spans_give_the_core():
    """The spans of the reduced categorical factor add up to ``diag(p) - p p^T`` (float64)."""
    z = _z(6, 7, torch.float64, 2) * 3
    cols = Columns(z, None, FIMType.EXACT, Options(), 0, 0)
    B = torch.cat([cols.span(0, 2), cols.span(2, 5), cols.span(5, 6)])
    p = torch.softmax(z, -1)
    core = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    assert float((torch.einsum("krc,krd->rcd", B, B) - core).abs().max()) <= 1e-14


@pytest.mark.parametrize("fim_type", [FIMType.EMPIRICAL, FIMType.MONTE_CARLO])
def test_span_of_score_columns_is_their_block(fim_type):
    z = _z(8, 5, torch.float32, 3)
    labels = torch.arange(8) % 5
    cols = Columns(z, labels, fim_type, Options(num_probes=3), 7, 11)
    assert cols.span(0, cols.num) is cols.block
    if cols.num > 1:
        assert cols.num == 3
        assert torch.equal(cols.span(1, 3), cols.block.index_select(0, torch.tensor([1, 2])))


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_squares_are_the_core_diagonal(likelihood):
    """``S = sum_k u_k^2`` per row: ``diag I(z)`` for EXACT, from float32 logits, in float32
    and float64, against the float64 columns."""
    z = _z(9, 6, torch.float32, 4)
    opts = Options(likelihood=likelihood)
    cols = Columns(z, None, FIMType.EXACT, opts, 0, 0)
    ref = Columns(z.double(), None, FIMType.EXACT, opts, 0, 0)
    want = ref.take(torch.arange(ref.num)).square().sum(0)
    for dt in (torch.float32, torch.float64):
        S = cols.squares(dt)
        assert S.dtype == dt and S is cols.squares(dt)  # formed once per dtype
        torch.testing.assert_close(S.double(), want, rtol=2e-6, atol=1e-7)
        assert bool((S >= 0).all())
    if likelihood == "categorical":  # p (1 - p) itself, in the logits' compute dtype (1 - p
        # of the leading class from the other classes' exponentials: exact on confident rows)
        from fimfast.ops.softmax_rest import softmax_rest

        soft = softmax_rest(z)
        assert torch.equal(cols.squares(torch.float32), soft.p * soft.one_minus())
