"""The upper-triangle Gram sums through MKL's ``?syrk`` (fimfast/structured/syrk.py) against
``x^T x`` in float64 and against the block-row path they replace (fimfast/structured/sums.py)."""

from __future__ import annotations

import ctypes
import platform
import sys

import pytest
import torch
from torch import nn

import fimfast
from fimfast.structured import sums, syrk

HAVE = bool(syrk._entries())
needs_syrk = pytest.mark.skipif(not HAVE, reason="torch's CPU library carries no MKL ?syrk")


def test_available_where_torch_carries_mkl():
    """On x86-64 Linux builds of torch with MKL both entries are found and pass their check."""
    if not (torch.backends.mkl.is_available() and sys.platform == "linux"
            and platform.machine() == "x86_64"):
        pytest.skip("not an x86-64 Linux build of torch with MKL")
    assert set(syrk._entries()) == {torch.float32, torch.float64}


@needs_syrk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upper_sums_the_triangle_and_leaves_the_rest(dtype):
    """Two calls (``beta`` 0, then 1) on strided operands: the upper triangle is ``x^T x`` of
    both batches (against float64), every other entry of the buffer keeps its sentinel."""
    g = torch.Generator().manual_seed(0)
    buf = torch.full((300, 310), -3.0, dtype=dtype)
    c = buf[:, 5:305]
    want = torch.zeros(300, 300, dtype=torch.float64)
    for beta, rows in ((0.0, 17), (1.0, 130)):
        x = torch.randn(rows, 320, generator=g, dtype=dtype)[:, 10:310]
        assert syrk.upper_(c, x, beta)
        want += x.double().T @ x.double()
    up = torch.ones(300, 300, dtype=torch.bool).triu()
    tol = 1e-12 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(c[up].double(), want[up], rtol=tol, atol=tol)
    assert bool((c[~up] == -3.0).all()) and bool((buf[:, :5] == -3.0).all()) and \
        bool((buf[:, 305:] == -3.0).all())


@needs_syrk
def test_upper_declines_what_it_cannot_take():
    """Operands it does not handle are left to the caller (``False``, nothing written)."""
    x = torch.randn(6, 4)
    c = torch.full((4, 4), 5.0)
    assert not syrk.upper_(c, x.T.contiguous().T, 0.0)  # columns of unit stride
    assert not syrk.upper_(c.T, x, 0.0)
    assert not syrk.upper_(c, x.double(), 0.0)
    assert not syrk.upper_(c, x[:0], 0.0)
    assert not syrk.upper_(c, x.requires_grad_(), 0.0)
    assert not syrk.upper_(c.to(torch.bfloat16), x.detach().to(torch.bfloat16), 0.0)
    assert bool((c == 5.0).all())


@needs_syrk
def test_entry_checked_before_use(monkeypatch):
    """The check run before first use refuses an entry that sums the wrong triangle."""
    fn, ct = syrk._entries()[torch.float32]
    assert syrk._checked(fn, ct, torch.float32)
    monkeypatch.setattr(syrk, "_UPLO", ctypes.c_char(b"U"))
    assert not syrk._checked(fn, ct, torch.float32)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FIMFAST_DISABLE_SYRK", "1")
    monkeypatch.setattr(syrk, "_FN", None)
    assert syrk._entries() == {}
    assert not syrk.upper_(torch.zeros(3, 3), torch.ones(2, 3), 0.0)


@pytest.mark.parametrize("n", [193, 300])
def test_gram_sums_settle_and_mirror(monkeypatch, n):
    """``gram_into`` (two batches, bias column) through ``syrk`` and through block rows: the
    same sums, completed by ``full_gram`` into exactly symmetric matrices equal to the float64
    product; ``settle`` zeroes everything below the diagonal."""
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(rows, n, generator=g, dtype=torch.float64) for rows in (9, 140)]
    y = torch.cat([torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
                   for x in xs])
    out = []
    for fn in (syrk._entries(), {}):
        monkeypatch.setattr(syrk, "_FN", fn)
        s = sums.LayerSums()
        for x in xs:
            sums.gram_into(s, "A", x, True)
        full = sums.full_gram(s.A)
        assert torch.equal(full, full.T)
        torch.testing.assert_close(full, y.T @ y, rtol=1e-12, atol=1e-12)
        out.append(full)
        s.settle()
        assert not s.unset and torch.equal(s.A, s.A.triu())
    torch.testing.assert_close(out[0], out[1], rtol=1e-13, atol=1e-13)


def test_kfac_factors_with_and_without_syrk(monkeypatch):
    """KFAC of an MLP with factors above the blocked threshold: the same factors (float64) and
    the eigenpairs taken from the upper triangle rebuild them, either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(260, 200), nn.ReLU(), nn.Linear(200, 5)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 260, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (12,), generator=g)) for _ in range(2)]
    res = []
    for fn in (syrk._entries(), {}):
        monkeypatch.setattr(syrk, "_FN", fn)
        F = fimfast.fisher(model, data, "exact", "kfac")
        lam_a, ua, lam_g, ug = F.eig()[0]
        torch.testing.assert_close((ua * lam_a) @ ua.T, F.A[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((ug * lam_g) @ ug.T, F.G[0], rtol=1e-10, atol=1e-12)
        res.append(F)
    x = torch.cat([torch.cat([b[0], torch.ones(12, 1, dtype=torch.float64)], 1) for b in data])
    torch.testing.assert_close(res[0].A[0], x.T @ x / 24, rtol=1e-12, atol=1e-13)
    for a, b in zip(res[0].A + res[0].G, res[1].A + res[1].G):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("n", [1, 5, 128, 300, 513])
def test_mirror_diagonal_blocks(n):
    """Only the strict lower triangles of the diagonal blocks change, each to the transposed
    upper one (a matrix inside a wider buffer, blocks of 128 and a partial last one)."""
    g = torch.Generator().manual_seed(n)
    buf = torch.randn(n, n + 7, generator=g)
    m = buf[:, 3:3 + n]
    before = buf.clone()
    syrk.mirror_diagonal_blocks(m, 128)
    want = before[:, 3:3 + n].clone()
    for i in range(0, n, 128):
        d = want[i:i + 128, i:i + 128]
        d.copy_(d.triu() + d.triu(1).T)
    assert torch.equal(m, want)
    assert torch.equal(buf[:, :3], before[:, :3]) and torch.equal(buf[:, 3 + n:], before[:, 3 + n:])
