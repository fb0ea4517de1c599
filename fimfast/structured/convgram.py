"""A convolution's input factor ``A = sum_{n,l} [a_{n,l}, 1] [a_{n,l}, 1]^T`` from its input rows,
without the ``(N L, C k_h k_w)`` patch matrix (docs/structured.md, "KFAC"; the patches ``a_{n,l}``
are those of ``F.unfold``).

A patch is ``k_h`` row strips of the input (``k_w C`` values each, taken at the location's input
columns). With ``S_h`` the ``(N L_w, k_w C)`` matrix of the strips starting in input row ``h`` (one
row per sample and output column), the block of ``A`` between kernel rows ``i`` and ``i + d`` is

    A_{i, i+d} = sum_{p < L_h} S_{h(p, i)}^T S_{h(p, i) + d d_h},   h(p, i) = p s_h + i d_h

so the ``H k_h`` products ``Q_d[h] = S_h^T S_{h + d d_h}`` (``d = 0..k_h - 1``) give every block:
``N L_w (k_w C)^2 H k_h`` multiply-adds instead of ``N L_h L_w (C k_h k_w)^2 / 2`` for the
symmetric half of the patch Gram, about ``2 H / (L_h k_h)`` of it (0.6 for a 5 x 5 kernel on a
12 x 12 input; 0.3 against the full product).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fimfast.structured.capture import conv_args, conv_padding


def _geometry(m: nn.Conv2d, H: int, W: int):
    (kh, kw), (dh, dw), (sh, sw) = conv_args(m)
    return kh, kw, dh, dw, sh, sw, (H - dh * (kh - 1) - 1) // sh + 1, \
        (W - dw * (kw - 1) - 1) // sw + 1


def worthwhile(m: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the strip products cost fewer multiply-adds than the symmetric half of the patch
    Gram, for a batched 4-D input (also faster in time where measured: 1 to 16 channels, 5 x 5
    kernels, one CPU thread)."""
    if x.dim() != 4:
        return False
    ph, pw = conv_padding(m)
    H, W = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
    kh, kw, dh, dw, sh, sw, oh, ow = _geometry(m, H, W)
    C = x.shape[1]
    if kh == 1 or oh < 1 or ow < 1:
        return False
    strips = ow * (kw * C) ** 2 * sum(H - d * dh for d in range(kh))
    return strips < oh * ow * (C * kh * kw) ** 2 / 2


def conv_gram(x: torch.Tensor, m: nn.Conv2d, dtype: torch.dtype,
              one: bool = False) -> tuple[torch.Tensor, int]:
    """``(sum y y^T, N L)`` over the patches ``a`` of one call of ``m`` on ``x`` (``(N, C, H,
    W)``), in ``F.unfold``'s order of patch entries ``(C, k_h, k_w)``: ``y = a`` or, if ``one``,
    ``y = [a, 1]`` (the last row and column ``sum a`` and ``N L``). Each block of kernel rows is
    written once, straight into that order (a strided copy per block of kernel rows, no
    reordering of the whole matrix); the blocks come from the strip products or, for inputs of
    at most :data:`PIXEL_ROW_MAX` values a row, from the products of whole input rows
    (:func:`_row_blocks`)."""
    ph, pw = conv_padding(m)
    x = x.to(dtype)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    N, C, H, W = x.shape
    geo = _geometry(m, H, W)
    kh, kw, dh, dw, sh, sw, oh, ow = geo
    sel = _selector(kh, H, oh, sh, dh, x.dtype, x.device)
    K = kh * kw * C
    out = x.new_empty(K + one, K + one)
    A6 = out[:K, :K].view(C, kh, kw, C, kh, kw)  # entries (c, i, j) of F.unfold
    blocks = _row_blocks if W * C <= PIXEL_ROW_MAX else _strip_blocks
    for d, (blk, sums) in enumerate(blocks(x, geo, sel, one)):
        # blk[i, j, c, j', c']: the block between kernel rows i and i + d
        A6.diagonal(d, 1, 4).copy_(blk.permute(2, 1, 4, 3, 0))
        if d:
            A6.diagonal(-d, 1, 4).copy_(blk.permute(4, 3, 2, 1, 0))
        if sums is not None:  # the last column, row and corner written through views
            col = out.select(1, K).narrow(0, 0, K)
            col.view(C, kh, kw).copy_(sums.permute(2, 0, 1))
            last = out.select(0, K)
            last.narrow(0, 0, K).copy_(col)
            last.narrow(0, K, 1).fill_(N * oh * ow)
    return out, N * oh * ow


# inputs of at most this many values a row (W C) take the products of whole rows: measured on one
# CPU thread (float32, N = 64), 0.43-0.49 of the time of the strip products for one channel (28 x
# 28 inputs, 3 x 3 and 5 x 5 kernels), 0.86-0.91 for three channels of 32 x 32, 0.91 for 6 x 14 x
# 14, 0.97 for 16 x 12 x 12, and slower from 8 x 16 x 16 (1.27) on
PIXEL_ROW_MAX = 96


def _strip_blocks(x, geo, sel, one: bool):
    """Per ``d``, ``(blk, sums)``: the blocks between kernel rows ``i`` and ``i + d`` as
    ``(k_h - d, k_w, C, k_w, C)`` from the strip products ``Q_d[h] = S_h^T S_{h + d d_h}`` (see
    the module docstring), and with the first block (``one``) the patch sums ``(k_h, k_w, C)``."""
    N, C, H, W = x.shape
    kh, kw, dh, dw, sh, sw, oh, ow = geo
    xc = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    sN, sH, sW, sC = xc.stride()
    # S[h]: (N ow, kw C) strips of input row h, entries (j, c) at column q s_w + j d_w
    S = xc.as_strided((H, N, ow, kw, C), (sH, sN, sW * sw, sW * dw, sC)).reshape(
        H, N * ow, kw * C)
    for d in range(kh):
        Hd = H - d * dh
        Q = torch.bmm(S[:Hd].mT, S[d * dh:d * dh + Hd])  # Q_d[h] = S_h^T S_{h + d d_h}
        blk = (sel[:kh - d, :Hd] @ Q.reshape(Hd, -1)).reshape(kh - d, kw, C, kw, C)
        yield blk, (sel @ S.sum(1)).view(kh, kw, C) if one and d == 0 else None


def _row_blocks(x, geo, sel, one: bool):
    """:func:`_strip_blocks` from the products of whole input rows: with ``X_h`` the ``(N, W C)``
    values of input row ``h``, ``R_d[h] = X_h^T X_{h + d d_h}`` (``(W C)^2`` entries) holds every
    product of two input columns, and the block entry of kernel columns ``j, j'`` is the sum over
    the output columns ``q`` of its entry at columns ``(q s_w + j d_w, q s_w + j' d_w)`` (a
    strided view). ``(W C)^2 N H k_h`` multiply-adds against ``(k_w C)^2 N L_w H k_h`` for the
    strips, in larger products where ``k_w C`` is small."""
    N, C, H, W = x.shape
    kh, kw, dh, dw, sh, sw, oh, ow = geo
    X = x.permute(2, 0, 3, 1).reshape(H, N, W * C)  # (H, N, W C), entries (w, c)
    for d in range(kh):
        Hd = H - d * dh
        R = torch.bmm(X[:Hd].mT, X[d * dh:d * dh + Hd])
        B = (sel[:kh - d, :Hd] @ R.reshape(Hd, -1)).reshape(kh - d, W, C, W, C)
        s0, s1, s2, s3, s4 = B.stride()
        blk = B.as_strided((kh - d, kw, C, kw, C, ow),
                           (s0, s1 * dw, s2, s3 * dw, s4, (s1 + s3) * sw)).sum(-1)
        sums = None
        if one and d == 0:
            T = (sel @ X.sum(1)).view(kh, W, C)
            t0, t1, t2 = T.stride()
            sums = T.as_strided((kh, kw, C, ow), (t0, t1 * dw, t2, t1 * sw)).sum(-1)
        yield blk, sums


@functools.lru_cache(maxsize=64)
def _selector(kh: int, H: int, oh: int, sh: int, dh: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``sel`` ``(k_h, H)``: ``sel[i, h] = 1`` for the input rows ``h = p s_h + i d_h`` (``p <
    o_h``) of kernel row ``i``, so that the sums over ``p`` are one product with the ``(h, ...)``
    stacks of :func:`conv_gram` (read only; kept per geometry)."""
    sel = torch.zeros(kh, H, dtype=dtype, device=device)
    i = torch.arange(kh, device=device)
    sel[i.unsqueeze(1), torch.arange(oh, device=device).unsqueeze(0) * sh +
        i.unsqueeze(1) * dh] = 1
    return sel
