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
    reordering of the whole matrix)."""
    ph, pw = conv_padding(m)
    x = x.to(dtype)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    N, C, H, W = x.shape
    kh, kw, dh, dw, sh, sw, oh, ow = _geometry(m, H, W)
    xc = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    sN, sH, sW, sC = xc.stride()
    KW = kw * C
    # S[h]: (N ow, kw C) strips of input row h, entries (j, c) at column q s_w + j d_w
    S = xc.as_strided((H, N, ow, kw, C), (sH, sN, sW * sw, sW * dw, sC)).reshape(H, N * ow, KW)
    # sel[i, h] = 1 for the input rows h(p, i) = p s_h + i d_h of kernel row i: the sums over p
    # as one product with the (h, ...) stacks below
    sel = x.new_zeros(kh, H)
    i = torch.arange(kh, device=x.device)
    sel[i.unsqueeze(1), torch.arange(oh, device=x.device).unsqueeze(0) * sh +
        i.unsqueeze(1) * dh] = 1
    K = kh * KW
    out = x.new_empty(K + one, K + one)
    A6 = out[:K, :K].view(C, kh, kw, C, kh, kw)  # entries (c, i, j) of F.unfold
    for d in range(kh):
        Hd = H - d * dh
        Q = torch.bmm(S[:Hd].mT, S[d * dh:d * dh + Hd])  # Q_d[h] = S_h^T S_{h + d d_h}
        # blk[i, j, c, j', c']: the block between kernel rows i and i + d
        blk = (sel[:kh - d, :Hd] @ Q.reshape(Hd, -1)).reshape(kh - d, kw, C, kw, C)
        A6.diagonal(d, 1, 4).copy_(blk.permute(2, 1, 4, 3, 0))
        if d:
            A6.diagonal(-d, 1, 4).copy_(blk.permute(4, 3, 2, 1, 0))
    if one:
        col = (sel @ S.sum(1)).reshape(kh, kw, C).permute(2, 0, 1).reshape(-1)
        out[:K, K], out[K, :K], out[K, K] = col, col, N * oh * ow
    return out, N * oh * ow
