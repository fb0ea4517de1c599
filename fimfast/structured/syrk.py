"""``C <- beta C + x^T x`` on the upper triangle of ``C`` only, through the BLAS ``?syrk`` of the
MKL that torch's CPU library carries (``mkl_blas_ssyrk`` / ``mkl_blas_dsyrk``, the Fortran-style
entries, found with ``ctypes`` the way ``threadpoolctl`` finds ``mkl_set_num_threads``).

The Kronecker factors' Gram sums (:func:`fimfast.structured.sums.gram_into`) need only one
triangle of ``x^T x``; torch has no symmetric product, so without this module they are summed as
upper block rows of 128 columns, one ``addmm_`` each (16% more products than the triangle for 784
columns, 25% for 512, and about 10 us of Python per block). Measured on one CPU thread (float32,
128 rows, hot, median of 41 calls, ms): 784 columns ``syrk`` 0.54, block rows 0.63, one full
``mm`` 0.99; 512 columns 0.23 / 0.28 / 0.51; 256 columns 0.072 / 0.092 / 0.111.

Where torch carries no MKL (other platforms, other BLAS), where the entry behaves otherwise than
checked once on a small product (:func:`_checked`), or with ``FIMFAST_DISABLE_SYRK=1``,
:func:`upper_` does nothing and returns ``False``, and the caller sums block rows as before.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from fimfast import _env

_FN: dict | None = None  # dtype -> (entry, ctypes scalar type); resolved on first use
# Fortran calling convention: every argument by address. The integers are passed as 64-bit
# values: an LP64 build reads their low 32 bits, which on a little-endian machine are the value.
_UPLO, _TRANS = ctypes.c_char(b"L"), ctypes.c_char(b"N")


def _entries() -> dict:
    global _FN
    if _FN is None:
        _FN = {}
        if sys.byteorder == "little" and not _env.disable_syrk():
            _FN = _load()
    return _FN


def _load() -> dict:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path):
        return {}
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return {}
    out = {}
    for dt, name, ct in ((torch.float32, "mkl_blas_ssyrk", ctypes.c_float),
                         (torch.float64, "mkl_blas_dsyrk", ctypes.c_double)):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.restype = None
        if _checked(fn, ct, dt):
            out[dt] = (fn, ct)
    return out


def _call(fn, ct, c: torch.Tensor, x: torch.Tensor, beta: float) -> None:
    k, n = x.shape
    L = ctypes.c_int64
    fn(ctypes.byref(_UPLO), ctypes.byref(_TRANS), ctypes.byref(L(n)), ctypes.byref(L(k)),
       ctypes.byref(ct(1.0)), ctypes.c_void_p(x.data_ptr()), ctypes.byref(L(x.stride(0))),
       ctypes.byref(ct(beta)), ctypes.c_void_p(c.data_ptr()), ctypes.byref(L(c.stride(0))))


def _checked(fn, ct, dt: torch.dtype) -> bool:
    """One small product with strided operands (``lda``, ``ldc`` larger than ``n``) against
    ``torch.mm``, twice (``beta`` 0, then 1): the upper triangle summed, the strict lower one
    left as it was."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 9, generator=g, dtype=dt)[:, :5]
    c = torch.full((5, 8), 7.0, dtype=dt)
    core = c[:, :5]
    try:
        _call(fn, ct, core, x, 0.0)
        _call(fn, ct, core, x, 1.0)
    except Exception:  # noqa: BLE001 - any failure of the foreign call: not used
        return False
    want = 2 * (x.T @ x)
    upper = torch.ones(5, 5, dtype=torch.bool).triu()
    return bool(torch.allclose(core[upper], want[upper], rtol=1e-5, atol=1e-5)) and \
        bool((core[~upper] == 7.0).all()) and bool((c[:, 5:] == 7.0).all())


def upper_(c: torch.Tensor, x: torch.Tensor, beta: float) -> bool:
    """``c[i, j] = beta * c[i, j] + (x^T x)[i, j]`` for ``i <= j`` (``x``: ``(rows, n)``, ``c``:
    ``(n, n)``, both rows of unit stride, on the CPU, float32 or float64, no autograd), the
    strict lower triangle of ``c`` left unwritten. ``False`` (nothing done) where not available
    for these tensors (see the module docstring)."""
    if c.device.type != "cpu" or x.device.type != "cpu" or x.dtype != c.dtype or x.dim() != 2:
        return False
    fn = _entries().get(c.dtype)
    k, n = x.shape
    if fn is None or k == 0 or n == 0 or tuple(c.shape) != (n, n) or c.stride(1) != 1 or \
            x.stride(1) != 1 or x.stride(0) < n or c.stride(0) < n or x.is_conj() or \
            (torch.is_grad_enabled() and (x.requires_grad or c.requires_grad)):
        return False
    _call(fn[0], fn[1], c, x, beta)
    return True


def mirror_diagonal_blocks(m: torch.Tensor, block: int) -> None:
    """The strict lower triangle of every diagonal ``block x block`` block of the square ``m``
    (rows of unit stride) from its upper one, as :func:`upper_` leaves it (used by
    :func:`fimfast.structured.sums.full_gram`, which mirrors the blocks off the diagonal),
    touching only those entries: for ``h = block / 2, block / 4, ..., 1`` the lower-left
    ``h x h`` quarter of every diagonal ``2h x 2h`` sub-block of the full blocks is the
    transposed upper-right one (one strided copy per ``h``, all blocks at once, ``block`` a
    power of 2); the last, partial block apart. For 785 columns and blocks of 128: 0.09 ms on
    one CPU thread, against 0.2 ms for one ``torch.where`` per block."""
    n, ld = m.shape[0], m.stride(0)
    full = n // block
    h = block // 2
    while full and h:
        k = full * block // (2 * h)
        st = (2 * h * (ld + 1), ld, 1)
        m.as_strided((k, h, h), st, m.storage_offset() + h * ld).copy_(
            m.as_strided((k, h, h), st, m.storage_offset() + h).mT)
        h //= 2
    r = n - full * block
    if r > 1:
        d = m[full * block:, full * block:]
        low = torch.ones(r, r, dtype=torch.bool, device=m.device).tril_(-1)
        d.copy_(torch.where(low, d.mT, d))
