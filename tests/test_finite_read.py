"""The finiteness checks of a read (fimfast.finite.all_finite, gram_finite): exact on every
layout and dtype, with and without the extension's check on the bits."""

import pytest
import torch

from fimfast import finite


def _layouts(bad: float):
    base = torch.rand(6, 5, dtype=torch.float64)
    out = {}
    for name, t in {
        "contiguous": base.clone(),
        "transposed": base.clone().t(),
        "float32": base.float(),
        "bfloat16": base.bfloat16(),
        "float16": base.half(),
    }.items():
        out[name] = t
        u = t.clone()
        u[2, 3] = bad
        out[name + "_bad"] = u
    return out


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_exact(monkeypatch, host, bad):
    if not host:
        monkeypatch.setattr(finite, "_HOST", ())
        monkeypatch.setattr(finite, "_host", lambda: ())
    for name, t in _layouts(bad).items():
        assert finite.all_finite([torch.ones(3), t]) is (not name.endswith("_bad")), name
    sp = torch.tensor([[0.0, 1.0], [bad, 0.0]]).to_sparse()
    assert finite.all_finite([sp]) is False
    assert finite.all_finite([]) is True


def test_all_finite_sum_overflow_is_not_a_refusal(monkeypatch):
    monkeypatch.setattr(finite, "_HOST", ())
    monkeypatch.setattr(finite, "_host", lambda: ())
    big = torch.full((8,), 3e38)  # finite entries whose float32 sum overflows
    assert finite.all_finite([big]) is True
    big[5] = float("inf")
    assert finite.all_finite([big]) is False


def test_gram_finite_reads_the_diagonal_and_defers_near_the_top():
    a = torch.randn(40, 7)
    g = a.T @ a
    assert finite.gram_finite(g) is True
    a[3, 2] = float("inf")
    assert finite.gram_finite(a.T @ a) is False
    a[3, 2] = float("nan")
    assert finite.gram_finite(a.T @ a) is False
    # a diagonal near the top of the range: the off-diagonal entries may overflow, read them all
    h = torch.full((2, 2), 2e38)
    assert finite.gram_finite(h) is None
    assert finite.gram_finite(torch.ones(3)) is None
    assert finite.gram_finite(torch.ones(2, 3)) is None


def test_grams_finite_is_one_rule_for_one_matrix_and_many():
    """gram_finite and the structured sums' check (fimfast/structured/accumulate.py) share
    grams_finite: one gather of every diagonal, the smallest dtype's headroom."""
    a = torch.randn(30, 4)
    g32, g64 = a.T @ a, (a.T @ a).double()
    assert finite.grams_finite([g32, g64]) is True
    assert finite.grams_finite([]) is True and finite.grams_finite([torch.ones(0, 0)]) is True
    assert finite.grams_finite([g32, torch.ones(2, 3)]) is None
    near = torch.full((2, 2), 1e36)  # settled for float64, not for float32
    assert finite.grams_finite([near.double()]) is True
    assert finite.grams_finite([near, g64]) is None
    bad = g32.clone()
    bad[1, 1] = float("nan")
    assert finite.grams_finite([g64, bad]) is False
    for t in (g32, near, bad, torch.ones(3)):
        assert finite.gram_finite(t) is finite.grams_finite([t])
