"""Row selection and validation (fimfast.batch.rows): the all-valid shortcut agrees with the
general path, and the finiteness check neither misses a NaN nor refuses finite logits."""

from __future__ import annotations

import pytest
import torch

from fimfast import batch as batchlib


def _rows(monkeypatch, general: bool, *args, **kw):
    if general:
        with monkeypatch.context() as m:
            m.setattr(batchlib, "_rows_all_valid", lambda *a: None)
            return batchlib.rows(*args, **kw)
    return batchlib.rows(*args, **kw)


def _same(a: batchlib.Rows, b: batchlib.Rows) -> None:
    assert a.all_valid == b.all_valid and a.num_samples == b.num_samples
    assert torch.equal(a.index, b.index) and torch.equal(a.sample, b.sample)
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert a.labels.dtype == b.labels.dtype and torch.equal(a.labels, b.labels)
    assert torch.equal(a.flat, b.flat)


g = torch.Generator().manual_seed(0)
CASES = [
    # (id, logits shape, labels builder, mask builder, ignore_index)
    ("2d", (5, 7), lambda: torch.randint(0, 7, (5,), generator=g), None, -100),
    ("2d-int32", (5, 7), lambda: torch.randint(0, 7, (5,), generator=g).int(), None, -100),
    ("2d-no-labels", (5, 7), None, None, -100),
    ("3d", (3, 4, 6), lambda: torch.randint(0, 6, (3, 4), generator=g), None, -100),
    ("3d-ignored", (3, 4, 6), lambda: torch.tensor([[0, 1, -100, 2]] * 3), None, -100),
    ("ignore-in-range", (4, 5), lambda: torch.tensor([0, 3, 2, 0]), None, 0),
    ("ignore-in-range-unused", (4, 5), lambda: torch.tensor([1, 3, 2, 4]), None, 0),
    ("3d-mask", (2, 3, 5), lambda: torch.randint(0, 5, (2, 3), generator=g),
     lambda: torch.tensor([[1, 1, 0], [1, 1, 1]]), -100),
    ("2d-mask-ignored", (3, 5), lambda: torch.randint(0, 5, (3,), generator=g),
     lambda: torch.tensor([[1, 0], [1, 1], [0, 1]]), -100),
]


@pytest.mark.parametrize("cid,shape,lab,mask,ign", CASES, ids=[c[0] for c in CASES])
def test_shortcut_matches_general_path(monkeypatch, cid, shape, lab, mask, ign):
    logits = torch.randn(*shape, generator=g, requires_grad=True)
    labels = None if lab is None else lab()
    m = None if mask is None else mask()
    args = (logits, labels, m, "categorical", ign, False)
    _same(_rows(monkeypatch, False, *args), _rows(monkeypatch, True, *args))


def test_shortcut_taken_only_when_every_row_counts(monkeypatch):
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    short = batchlib._rows_all_valid(logits, labels, None, "categorical", -100, False, (4,))
    assert short is not None and short.all_valid
    assert torch.equal(short.index, torch.arange(4)) and torch.equal(short.labels, labels)
    assert short.flat.data_ptr() == logits.data_ptr()  # a view, not a copy
    _same(short, _rows(monkeypatch, True, logits, labels, None, "categorical", -100, False))
    for labels, ign in ((torch.tensor([0, 1, -100, 3]), -100), (torch.tensor([0, 1, 2, 3]), 2),
                        (torch.tensor([0, 1, 2, 9]), -100)):
        assert batchlib._rows_all_valid(logits, labels, None, "categorical", ign, False,
                                        (4,)) is None
    assert batchlib._rows_all_valid(logits, None, None, "bernoulli", -100, False, (4,)) is None
    assert batchlib._rows_all_valid(torch.randn(2, 3, 5), None, torch.ones(2, 3), "categorical",
                                    -100, False, (2, 3)) is None


@pytest.mark.parametrize("where", [(0, 0), (3, 4)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entry_is_refused(where, bad):
    logits = torch.randn(4, 5)
    logits[where] = bad
    with pytest.raises(ValueError, match="1 non-finite value"):
        batchlib.rows(logits, torch.tensor([0, 1, 2, 3]), None, "categorical", -100, False)


def test_nan_on_an_ignored_row_is_allowed():
    logits = torch.randn(4, 5)
    logits[2, 1] = float("nan")
    r = batchlib.rows(logits, torch.tensor([0, 1, -100, 3]), None, "categorical", -100, False)
    assert r.count == 3 and not r.all_valid
    assert torch.equal(r.index, torch.tensor([0, 1, 3])) and torch.equal(r.sample, r.index)
    assert torch.equal(r.labels, torch.tensor([0, 1, 3]))
    assert torch.equal(r.flat, logits[[0, 1, 3]])


def test_nan_on_an_ignored_row_leaves_the_fisher_of_the_others():
    """A NaN input on an ignored sample changes nothing: the Fisher equals the one of the batch
    without that sample, and the float64 closed form of a single Linear layer
    (F_W = sum_n (p_n(1-p_n)) x a_n^2, F_b = sum_n p_n(1-p_n); docs/math.md §3)."""
    import fimfast

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, -100, 3, 2])
    xn = x.clone()
    xn[2, 1] = float("nan")
    keep = torch.tensor([0, 1, 3, 4])
    got = fimfast.fisher(model, [(xn, y)], "exact", representation="diag",
                         reduction="sum")
    ref = fimfast.fisher(model, [(x[keep], y[keep])], "exact", representation="diag",
                         reduction="sum")
    for n, _ in model.named_parameters():
        assert torch.isfinite(got[n]).all()
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=0)
    a = x[keep].double()
    with torch.no_grad():
        p = torch.softmax(model.double()(a), -1)
    coef = p * (1 - p)
    torch.testing.assert_close(got["weight"].double(), coef.T @ (a * a), rtol=1e-5, atol=0)
    torch.testing.assert_close(got["bias"].double(), coef.sum(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_large_finite_logits_are_not_refused(dtype):
    # row sums beyond float16's range (65504) and a total beyond float32's are still finite input
    big = 3.0e38 if dtype != torch.float16 else 6.0e4
    logits = torch.full((8, 4096), big, dtype=dtype)
    labels = torch.arange(8) * 500
    r = batchlib.rows(logits, labels, None, "categorical", -100, False)
    assert r.count == 8 and r.all_valid
    assert torch.equal(r.index, torch.arange(8)) and torch.equal(r.labels, labels)
    assert torch.equal(r.flat, logits)
