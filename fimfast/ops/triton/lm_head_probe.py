"""Fused Triton kernels of :func:`fimfast.ops.lm_head_probe`: the logits exist one tile at a time.

Two kernels, both recomputing the logit tiles ``z = h W^T + b`` (``BM`` rows by ``BN`` classes)
from the hidden rows and the weight instead of storing them:

* ``_rows_kernel``, one program per block of ``BM`` rows: pass 1 runs an online max / sum of
  ``exp`` over the classes, the sum split into the classes below the max and the leading ones;
  pass 2 (``hutchinson``, ``sqrt``) sums ``w = sqrt(p) xi`` below the max and at it, from which
  the entry of a leading class is formed once per row and probe sign (exact on confident rows,
  :mod:`fimfast.ops.softmax_rest`); pass 3 forms ``u = w - p sum(w)`` (``dg``: ``u = w``) and
  accumulates ``grad_hidden = u W``. It writes the five row statistics.
* ``_weight_kernel``, one program per block of ``BN`` classes: for every row block it rebuilds
  ``u`` from the row statistics and accumulates ``grad_weight = u^T h`` and ``grad_bias = sum u``.
  Each output tile has one owner: no atomics, a deterministic result.

Both write their ``(rows or classes, d)`` result into a buffer of whole tiles (``BM`` or ``BN``
rows; a hidden size below its block ``BD`` is padded with zero columns, which leave the logits
unchanged), so the final stores need no mask: the masks computed for the loads before the loops
would stay live across them, and ``ptxas`` spilled those predicates to local memory
(:mod:`fimfast.ops.triton.aot`).

The signs are those of :mod:`fimfast.ops.rng` at the counters ``offset + r*V + c``, as in the
reference. ``sqrt`` uses the same formula as ``hutchinson`` (the reference forms its
``log_softmax`` gradient ``w - p sum(w)`` by :func:`fimfast.ops.softmax_rest.mix`; the two agree to
rounding). ``row_chunk`` does not apply (tiles are
``BM x BN``). The hidden size is one block of registers (``d <= MAX_D``); larger heads use the
composite (torch matmuls around the Triton ``probe_logit_grad``), as does float64 (the fused
kernels spill there, and a float64 ``tl.dot`` needs sm_90: :mod:`fimfast.ops.triton.arch`). The
kernels are verified against the reference under ``TRITON_INTERPRET=1``; their tiling has not been
tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fimfast.dtypes import compute_dtype
from fimfast.ops import rng
from fimfast.ops.lm_head import lm_head_probe_composite
from fimfast.ops.rng import as_int64
from fimfast.ops.triton.library import triton_op
from fimfast.ops.triton.rng import sign_bit

_MODE_ID = {"hutchinson": 0, "sqrt": 1, "dg": 2}
BM = 16  # rows per tile (tl.dot needs >= 16)
BN = 64  # classes per tile
# hidden sizes up to this stay in one block: (BM, d) and (BN, d) tiles in registers. At d = 256
# both kernels spill on sm_80 and sm_90 (ptxas: 1.7 KB per thread in the row kernel, 20 KB in the
# weight kernel; python -m fimfast.ops.triton.aot); d = 64 compiles without spills at 8 warps.
# In float64 the weight kernel spills even at d = 32 (40-72 bytes on sm_90) and a float64 tl.dot
# needs sm_90: float64 heads take the composite
MAX_D = 64


@triton.jit
def _logits(h, W_ptr, B_ptr, cols, V, D, offs_d, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """``(BM, BN)`` logits of the rows ``h`` (BM, BD) and classes ``cols``; -inf past ``V``."""
    cm = cols < V
    w = tl.load(
        W_ptr + cols.to(tl.int64)[:, None] * D + offs_d[None, :],
        mask=cm[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    z = tl.dot(h, tl.trans(w), input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        z += tl.load(B_ptr + cols, mask=cm, other=0.0)[None, :]
    return tl.where(cm[None, :], z, float("-inf")), w


@triton.jit
def _factor(z, m, s, dot, up, um, rows, cols, offset, V, k0, k1, MODE: tl.constexpr):
    """``u`` of a tile from its logits and the row statistics (zero outside the valid tile):
    ``w - p dot``; at a leading class (``z == m``) the row's ``up`` or ``um`` by the sign of its
    probe (:func:`_lead_entries`)."""
    p = tl.exp(z - m[:, None]) / s[:, None]
    bit = sign_bit(offset + rows.to(tl.int64)[:, None] * V + cols.to(tl.int64)[None, :], k0, k1)
    sp = tl.sqrt(p)
    w = tl.where(bit != 0, -sp, sp)
    if MODE != 2:
        w = tl.where(z == m[:, None], tl.where(bit != 0, um[:, None], up[:, None]),
                     w - p * dot[:, None])
    return w


@triton.jit
def _lead_entries(m, below, ties, s, sw, sl):
    """HUTCHINSON's entry ``w - p (sum w)`` of a leading class of each row, for a probe sign of
    +1 (``up``) and -1 (``um``): with ``|w|`` and ``p`` as the tiles form them there,
    ``k = sl / |w|`` the exact integer of the tied classes' signs, ``sw`` the sum of ``w`` below
    the max, ``+-|w| (below + ties -+ k) / s - p sw``: no difference of numbers near 1 (nor near
    1/2, two tied classes of one sign) is formed (:mod:`fimfast.ops.softmax_rest`)."""
    p = tl.exp(m - m) / s
    wl = tl.sqrt(p)
    k = tl.floor(sl / wl + 0.5)
    up = wl * ((below + (ties - k)) / s) - p * sw
    um = -wl * ((below + (ties + k)) / s) - p * sw
    return up, um


@triton.jit(do_not_specialize=["R", "V", "offset", "K0", "K1"])
def _rows_kernel(
    H_ptr, W_ptr, B_ptr, GH_ptr, M_ptr, S_ptr, D_ptr, UP_ptr, UM_ptr, R, V, D, offset, K0, K1,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Row statistics and ``grad_hidden`` of one block of ``BM`` rows; ``D == BD`` and GH has whole
    blocks of rows (stored without a mask)."""
    offset = tl.cast(offset, tl.int64)
    k0 = K0.to(tl.uint32)
    k1 = K1.to(tl.uint32)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < R
    offs_d = tl.arange(0, BD)
    hmask = rm[:, None] & (offs_d[None, :] < D)
    h = tl.load(H_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], mask=hmask, other=0.0)
    m = tl.full((BM,), float("-inf"), ACC)
    below = tl.zeros((BM,), ACC)  # the sum of exp(z - m) over the classes below m
    ties = tl.zeros((BM,), ACC)  # the classes at m (exp = 1): the sum is below + ties
    for c0 in range(0, V, BN):
        cols = c0 + tl.arange(0, BN)
        z, _ = _logits(h, W_ptr, B_ptr, cols, V, D, offs_d, HAS_BIAS, ACC)
        m_new = tl.maximum(m, tl.max(z, 1))
        e = tl.exp(z - m_new[:, None])
        at = z == m_new[:, None]
        tile_below = tl.sum(tl.where(at, 0.0, e), 1)
        tile_ties = tl.sum(at.to(ACC), 1)
        grew = m_new > m  # a new row max: the old sum is all below it
        below = tl.where(grew, (below + ties) * tl.exp(m - m_new), below) + tile_below
        ties = tl.where(grew, 0.0, ties) + tile_ties
        m = m_new
    s = below + ties
    sw = tl.zeros((BM,), ACC)
    sl = tl.zeros((BM,), ACC)
    if MODE != 2:
        for c0 in range(0, V, BN):
            cols = c0 + tl.arange(0, BN)
            z, _ = _logits(h, W_ptr, B_ptr, cols, V, D, offs_d, HAS_BIAS, ACC)
            p = tl.exp(z - m[:, None]) / s[:, None]
            bit = sign_bit(
                offset + rows.to(tl.int64)[:, None] * V + cols.to(tl.int64)[None, :], k0, k1
            )
            sp = tl.sqrt(p)
            w = tl.where(bit != 0, -sp, sp)
            lead = z == m[:, None]
            sw += tl.sum(tl.where(lead, 0.0, w), 1)
            sl += tl.sum(tl.where(lead, w, 0.0), 1)
    up, um = _lead_entries(m, below, ties, s, sw, sl)
    dot = sw + sl
    gh = tl.zeros((BM, BD), ACC)
    for c0 in range(0, V, BN):
        cols = c0 + tl.arange(0, BN)
        z, w = _logits(h, W_ptr, B_ptr, cols, V, D, offs_d, HAS_BIAS, ACC)
        u = _factor(z, m, s, dot, up, um, rows, cols, offset, V, k0, k1, MODE)
        u = tl.where(rm[:, None] & (cols < V)[None, :], u, 0.0)
        gh += tl.dot(u, w, input_precision="ieee", out_dtype=ACC)
    tl.store(GH_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], gh)
    tl.store(M_ptr + rows, m, mask=rm)
    tl.store(S_ptr + rows, s, mask=rm)
    tl.store(D_ptr + rows, dot, mask=rm)
    tl.store(UP_ptr + rows, up, mask=rm)
    tl.store(UM_ptr + rows, um, mask=rm)


@triton.jit(do_not_specialize=["R", "V", "offset", "K0", "K1"])
def _weight_kernel(
    H_ptr, W_ptr, B_ptr, GW_ptr, GB_ptr, M_ptr, S_ptr, D_ptr, UP_ptr, UM_ptr, R, V, D, offset, K0,
    K1,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``grad_weight`` and ``grad_bias`` of one block of ``BN`` classes, over every row block;
    ``D == BD`` and GW has whole blocks of classes (stored without a mask)."""
    offset = tl.cast(offset, tl.int64)
    k0 = K0.to(tl.uint32)
    k1 = K1.to(tl.uint32)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cm = cols < V
    offs_d = tl.arange(0, BD)
    gw = tl.zeros((BN, BD), ACC)
    gb = tl.zeros((BN,), ACC)
    for r0 in range(0, R, BM):
        rows = r0 + tl.arange(0, BM)
        rm = rows < R
        h = tl.load(
            H_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=rm[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        z, _ = _logits(h, W_ptr, B_ptr, cols, V, D, offs_d, HAS_BIAS, ACC)
        m = tl.load(M_ptr + rows, mask=rm, other=0.0)
        s = tl.load(S_ptr + rows, mask=rm, other=1.0)
        dot = tl.load(D_ptr + rows, mask=rm, other=0.0)
        up = tl.load(UP_ptr + rows, mask=rm, other=0.0)
        um = tl.load(UM_ptr + rows, mask=rm, other=0.0)
        u = _factor(z, m, s, dot, up, um, rows, cols, offset, V, k0, k1, MODE)
        u = tl.where(rm[:, None] & cm[None, :], u, 0.0)
        gw += tl.dot(tl.trans(u), h, input_precision="ieee", out_dtype=ACC)
        gb += tl.sum(u, 0)
    tl.store(GW_ptr + cols.to(tl.int64)[:, None] * D + offs_d[None, :], gw)
    if HAS_BIAS:
        tl.store(GB_ptr + cols, gb, mask=cm)


@triton_op("lm_head_probe", kernels=(_rows_kernel, _weight_kernel))
def lm_head_probe_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fimfast_triton::lm_head_probe``: the two fused kernels (``seed``, ``offset`` as the int64
    of their 64 bits); ``(grad_hidden, grad_weight, grad_bias)``, ``grad_bias`` of shape ``(0,)``
    without a bias.

    Raises ValueError for heads the kernels do not hold (``d > MAX_D``, float64);
    :func:`lm_head_probe_triton` sends those to the composite.
    """
    if mode not in _MODE_ID:
        raise ValueError(f"lm_head_probe: mode must be one of {tuple(_MODE_ID)}; got {mode!r}")
    R, D = hidden.shape
    V = weight.shape[0]
    dt = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    if D > MAX_D or dt == torch.float64:
        raise ValueError(
            f"lm_head_probe: the fused kernels hold d <= {MAX_D} in float32; got d={D} in {dt} "
            "(use fimfast.ops.lm_head_probe)"
        )
    dev = hidden.device
    h = hidden.detach().to(dt).contiguous()
    W = weight.detach().to(dt).contiguous()
    b = (
        bias.detach().to(dt).contiguous()
        if bias is not None
        else torch.zeros(1, dtype=dt, device=dev)
    )
    gb = torch.empty((V if bias is not None else 0,), dtype=dt, device=dev)
    if R == 0:
        gb.zero_()
        gh = torch.empty((0, D), dtype=hidden.dtype, device=dev)
        return gh, torch.zeros((V, D), dtype=dt, device=dev), gb
    bd = max(16, triton.next_power_of_2(D))
    if bd != D:  # zero columns up to the block: the kernels store whole tiles (module docstring)
        h = torch.nn.functional.pad(h, (0, bd - D))
        W = torch.nn.functional.pad(W, (0, bd - D))
    gh_pad = torch.empty((triton.cdiv(R, BM) * BM, bd), dtype=dt, device=dev)
    gw_pad = torch.empty((triton.cdiv(V, BN) * BN, bd), dtype=dt, device=dev)
    # per row: m, the sum of exp(z - m), of w = sqrt(p) xi, a leading class's entry for + and -
    stats = torch.empty((5, R), dtype=dt, device=dev)
    st = (stats[0], stats[1], stats[2], stats[3], stats[4])
    k0, k1 = rng.keys(seed, rng.STREAM_SIGN)
    meta = dict(
        MODE=_MODE_ID[mode],
        HAS_BIAS=bias is not None,
        BD=bd,
        BM=BM,
        BN=BN,
        ACC=tl.float64 if dt == torch.float64 else tl.float32,
        # 8 warps for d > 32: at 4 the (BN, d) weight tile and the (BM, d) accumulator spill
        # (12 bytes per thread on sm_80; fimfast.ops.triton.aot)
        num_warps=8 if D > 32 else 4,
        # double-buffered loads: a third stage adds a tile of shared memory and the loop-carried
        # addresses and masks of one more tile in flight, which pushed ptxas into small spills
        num_stages=2,
    )
    off = offset & ((1 << 63) - 1)
    wrap_triton(_rows_kernel)[(triton.cdiv(R, BM),)](
        h, W, b, gh_pad, *st, R, V, bd, off, k0, k1, **meta
    )
    wrap_triton(_weight_kernel)[(triton.cdiv(V, BN),)](
        h, W, b, gw_pad, gb if bias is not None else b, *st, R, V, bd, off, k0, k1, **meta,
    )  # fmt: skip
    gh, gw = gh_pad[:R, :D], gw_pad[:V, :D]  # views; contiguous when D is a power of 2 >= 16
    if D != bd:
        gh, gw = gh.contiguous(), gw.contiguous()
    return gh.to(hidden.dtype), gw, gb


@lm_head_probe_op.register_fake
def _(hidden, weight, bias, mode, seed, offset):
    dt = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    V, D = weight.shape
    return (
        hidden.new_empty(hidden.shape),
        weight.new_empty((V, D), dtype=dt),
        weight.new_empty((V if bias is not None else 0,), dtype=dt),
    )


def lm_head_probe_triton(hidden, weight, bias, mode, seed, offset, row_chunk):
    """:func:`fimfast.ops.lm_head_probe` in two fused Triton kernels (see the module docstring),
    ``torch.ops.fimfast_triton.lm_head_probe``; heads of ``d > MAX_D`` and float64 heads run the
    composite (torch matmuls around the Triton ``probe_logit_grad``)."""
    dt = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    # the (BM, d) accumulator would not fit in registers; in float64 the fused kernels spill
    # (or, before sm_90, do not compile: fimfast.ops.triton.arch)
    if hidden.shape[1] > MAX_D or dt == torch.float64:
        return lm_head_probe_composite(
            hidden, weight, bias, mode, seed, offset, row_chunk, "triton"
        )
    gh, gw, gb = lm_head_probe_op(
        hidden.detach(), weight.detach(), None if bias is None else bias.detach(), mode,
        as_int64(seed), as_int64(offset),
    )  # fmt: skip
    return gh, gw, gb if bias is not None else None
