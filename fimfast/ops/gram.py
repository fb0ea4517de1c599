"""``gram_upper_``: the upper triangle of a Gram matrix, a symmetric rank-``k`` update, and
``mirror_upper_``, which completes it.

``out[i, j] (+)= sum_r x[r, i] x[r, j]`` for ``i <= j`` (``out`` ``(n, n)``, ``x`` ``(R, n)``),
the entries below the diagonal left unspecified (a kernel may leave them or write them): the
sums of KFAC's factors (:mod:`fimfast.structured.sums`), whose readers mirror the upper triangle.
The ``cpp`` backend (``csrc/cpu/gram_upper.cpp``) calls the symmetric rank-``k`` update of the
MKL that torch links (half the multiply-adds of ``x^T x`` in one call); without MKL, and on an
extension built before the op, the upper block rows below. ``mirror_upper_`` scales the upper
triangle in place and copies it below the diagonal (the ``cpp`` kernel in strips of 64 rows, 32
in float64, through a transposed tile that stays in L1).
Timings: ``benchmarks/bench_gram_upper.py``.
"""

from __future__ import annotations

import torch

from fimfast.ops.registry import bound

_OP = "gram_upper_"  # the ops' names in fimfast._C
_MIRROR = "mirror_upper_"
BLOCK = 128  # rows of a block of the reference


def gram_upper_torch_(out: torch.Tensor, x: torch.Tensor, accumulate: bool) -> None:
    """The torch reference: the blocks on and right of the diagonal, one ``addmm_`` per block
    row of ``BLOCK`` rows (the lower triangles of the diagonal blocks are written too)."""
    n = x.shape[1]
    beta = 1 if accumulate else 0
    xt = x.T
    for i in range(0, n, BLOCK):
        out[i:i + BLOCK, i:].addmm_(xt[i:i + BLOCK], x[:, i:], beta=beta)


def gram_upper_cpp_(out: torch.Tensor, x: torch.Tensor, accumulate: bool) -> None:
    """:func:`gram_upper_` on the CPU (float32 and float64; an extension built before the op
    runs the reference)."""
    op = getattr(torch.ops.fimfast, _OP, None)
    if op is None or out.dtype not in (torch.float32, torch.float64):
        gram_upper_torch_(out, x, accumulate)
        return
    op(out, x, accumulate)


def gram_upper_(out: torch.Tensor, x: torch.Tensor, accumulate: bool = False,
                backend: str | None = None) -> None:
    """Add (``accumulate``) or write the upper triangle of ``x^T x`` into ``out`` in place.

    Args:
        out: ``(n, n)`` float32 or float64 (a view with rows of stride 1 is written in place).
        x: ``(R, n)`` in ``out``'s dtype, any strides.
        accumulate: add to ``out`` (else overwrite the triangle, ``out``'s old values ignored).
        backend: as in :func:`fimfast.ops.probe_logit_grad`.

    The entries of ``out`` below the diagonal are unspecified afterwards.
    """
    if x.dim() != 2 or out.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"gram_upper_: x must be (R, n) and out (n, n); got x "
                         f"{tuple(x.shape)} and out {tuple(out.shape)}")
    if out.dtype not in (torch.float32, torch.float64) or x.dtype != out.dtype:
        raise ValueError(f"gram_upper_: out must be float32 or float64 and x of its dtype; got "
                         f"out {out.dtype}, x {x.dtype}")
    bound(_OP, backend, out.device)(out, x, accumulate)


def mirror_upper_torch_(m: torch.Tensor, scale: float) -> None:
    """The torch reference of :func:`mirror_upper_`: per block row of ``BLOCK`` rows, the blocks
    right of the diagonal scaled and copied below it; then the diagonal blocks (the whole ones
    as one strided batch) completed from their upper triangles."""
    n = m.shape[0]
    for i in range(0, n, BLOCK):
        j = min(i + BLOCK, n)
        if scale != 1.0:
            m[i:j, i:].mul_(scale)
        if j < n:
            m[j:, i:j] = m[i:j, j:].T
    k = n // BLOCK
    s0, s1 = m.stride()
    parts = [m.as_strided((k, BLOCK, BLOCK), (BLOCK * (s0 + s1), s0, s1),
                          m.storage_offset())] if k else []
    if n - k * BLOCK > 1:
        parts.append(m[k * BLOCK:, k * BLOCK:])
    for d in parts:
        d.copy_(d.triu().add_(d.triu(1).mT))


def mirror_upper_cpp_(m: torch.Tensor, scale: float) -> None:
    """:func:`mirror_upper_` on the CPU (float32 and float64; an extension built before the op
    runs the reference)."""
    op = getattr(torch.ops.fimfast, _MIRROR, None)
    if op is None or m.dtype not in (torch.float32, torch.float64):
        mirror_upper_torch_(m, scale)
        return
    op(m, float(scale))


def mirror_upper_(m: torch.Tensor, scale: float = 1.0, backend: str | None = None) -> None:
    """Make the square ``m`` symmetric in place from its upper triangle (diagonal included),
    scaled by ``scale``: ``m[i, j] = m[j, i] = scale * m[i, j]`` for ``i <= j``; the entries
    below the diagonal are read by no one (a sum of :func:`gram_upper_`)."""
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"mirror_upper_: m must be a square matrix; got {tuple(m.shape)}")
    if m.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"mirror_upper_: m must be float32 or float64; got {m.dtype}")
    bound(_MIRROR, backend, m.device)(m, scale)
