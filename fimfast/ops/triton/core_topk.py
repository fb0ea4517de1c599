"""Triton kernel of :func:`fimfast.ops.core_topk`: one program per row of probabilities.

The row stays in registers (``C <= MAX_C``; longer rows, ``k > MAX_K`` for the power solver, and
rows whose live vectors would spill out of the registers (:func:`_plan`: ``exact`` beyond 4096
classes in float32 and 2048 in float64, the power solver's larger ``k``) fall back to the torch
reference). No sort: the
``j``-th largest probability and the next one (the poles bounding eigenvalue ``j``) are found by
max reductions over the classes not yet taken, with ties ordered by class index as every backend
does. ``exact`` runs the reference's safeguarded rational/Newton/bisection steps on the secular
equation, stopping when ``tau`` (the distance to the nearest pole) stops moving relative to
itself; ties get the reference's Helmert vectors and zero probabilities its indicator vectors.
``power`` keeps the ``k`` vectors as a ``(KB, C)`` tile.
Signs follow :func:`fimfast.ops.torch_ref.fix_signs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fimfast.ops.torch_ref import SIGN_TIE_ULPS, compute_dtype, core_topk_torch
from fimfast.ops.triton.library import triton_op

# one row in registers: 8 values per thread at 32 warps; beyond this the reference runs
MAX_C = 8192
# the power solver holds k vectors of C values
MAX_K = 16
# registers a thread holds besides its row vectors (indices, scalars, addresses)
_REG_OVERHEAD = 16
# row vectors live at once: exact (p, qs, v, the masks, the Helmert vector); power (the k
# vectors, p, w, vj, yi)
_LIVE_EXACT = 8
_LIVE_POWER_EXTRA = 4
_SIGN_TIE_ULPS = tl.constexpr(SIGN_TIE_ULPS)


@triton.jit
def _secular(qs, cm, origin, tau):
    """g = sum q/((q - origin) - tau) and dg = sum q/delta**2 over the valid lanes."""
    delta = (qs - origin) - tau
    r = tl.where(cm, qs / delta, 0.0)
    return tl.sum(r, 0), tl.sum(tl.where(cm, r / delta, 0.0), 0)


@triton.jit
def _fix_sign(v, cm, offs, EPS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest-magnitude entry positive; entries within SIGN_TIE_ULPS ulps of the largest count
    as equal and the first in class order decides (torch_ref.fix_signs)."""
    amax = tl.max(tl.abs(v), 0)
    near = cm & (tl.abs(v) >= amax * (1.0 - _SIGN_TIE_ULPS * EPS))
    first = tl.min(tl.where(near, offs, BLOCK), 0)
    pivot = tl.sum(tl.where(offs == first, v, 0.0), 0)
    return tl.where(pivot < 0, -v, v)


@triton.jit
def _exact_kernel(
    P_ptr,
    P_stride_r,
    P_stride_c,
    L_ptr,
    V_ptr,
    C,
    K,
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Eigenpairs j < K of row r: L (R, K) and V (R, K, C) contiguous in ACC."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cm = offs < C
    p = tl.load(P_ptr + r * P_stride_r + offs.to(tl.int64) * P_stride_c, mask=cm, other=0.0)
    p = p.to(ACC)
    avail = cm
    inf = float("inf")
    for j in range(K):
        # hi: the (j+1)-th largest probability (ties: the larger class index ranks higher)
        hi = tl.max(tl.where(avail, p, -1.0), 0)
        ia = tl.max(tl.where(avail & (p == hi), offs, -1), 0)
        below = avail & (offs != ia)  # the classes ranked below ia
        lo = tl.max(tl.where(below, p, -1.0), 0)
        tie = (hi - lo) <= 8 * EPS * hi
        zlo = (lo <= 0) & (tie == 0)
        scale = tl.where(hi > 0, hi, 1.0)
        qs = tl.where(cm, p / scale, 0.0)
        lo_s = lo / scale
        hi_s = hi / scale
        gap = hi_s - lo_s
        fixed = tie | zlo
        # fixed eigenpairs (ties, zeros) take the origin -1, off every pole (q >= 0): their secular
        # vector is replaced below, and no division by zero is evaluated
        mid = tl.where(fixed, -1.0, 0.5 * (lo_s + hi_s))
        g_mid, _ = _secular(qs, cm, mid, 0.0 * mid)
        left = g_mid >= 0
        origin = tl.where(fixed, -1.0, tl.where(left, lo_s, hi_s))
        t_lo = tl.where(left, 0.0, -0.5 * gap)
        t_hi = tl.where(left, 0.5 * gap, 0.0)
        tau = tl.where(fixed, 0.0, 0.5 * (t_lo + t_hi))
        done = fixed.to(tl.int32)
        it = tl.program_id(0) * 0
        while (it < 200) & (done == 0):
            g, dg = _secular(qs, cm, origin, tau)
            t_lo = tl.where(g < 0, tau, t_lo)
            t_hi = tl.where(g > 0, tau, t_hi)
            s_ = dg * tau * tau
            rational = s_ / (g + s_ / tau)
            newton = tau - g / dg
            ok_r = (rational > t_lo) & (rational < t_hi) & (tl.abs(rational) < inf)
            ok_r = ok_r & (rational != tau)
            ok_n = (newton > t_lo) & (newton < t_hi) & (tl.abs(newton) < inf) & (newton != tau)
            nxt = tl.where(ok_r, rational, tl.where(ok_n, newton, 0.5 * (t_lo + t_hi)))
            conv = (g == 0) | (tl.abs(nxt - tau) <= 2 * EPS * tl.abs(tau))
            tau = tl.where(g == 0, tau, nxt)
            done = conv.to(tl.int32)
            it += 1
        v = tl.where(cm, qs / ((qs - origin) - tau), 0.0)
        # non-finite: inf on a pole, or nan (inf / inf) where p / hi overflows (hi subnormal)
        nonfin = cm & ((tl.abs(v) >= inf) | (v != v))
        bad = tl.max(nonfin.to(tl.int32), 0) > 0
        lam = tl.where(tie, hi, (origin + tau) * scale)
        lam = tl.where(zlo, 0.0, lam)
        # a root on a pole to within rounding: the class of the infinite entry alone
        v = tl.where(bad, tl.where(nonfin, 1.0, 0.0), v)
        # zero probabilities: the indicator of the zero group (eigenvalue 0)
        v = tl.where(zlo, tl.where(cm & (p <= 0), 1.0, 0.0), v)
        # tie group ending at ia: the Helmert vector (1 on the group below ia, -size at ia)
        member = below & ((hi - p) <= 8 * EPS * hi)
        n_mem = tl.sum(member.to(tl.int32), 0).to(ACC)
        helm = tl.where(member, 1.0, tl.where(offs == ia, -n_mem, 0.0))
        v = tl.where(tie, helm, v)
        v = v / tl.sqrt(tl.sum(v * v, 0))
        v = _fix_sign(v, cm, offs, EPS, BLOCK)
        tl.store(L_ptr + r * K + j, lam)
        tl.store(V_ptr + (r * K + j) * C + offs, v, mask=cm)
        avail = avail & (offs != ia)


@triton.jit
def _power_kernel(
    P_ptr,
    P_stride_r,
    P_stride_c,
    L_ptr,
    V_ptr,
    C,
    K,
    ITERS,
    EPS: tl.constexpr,
    TINY: tl.constexpr,
    KB: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Power iteration with modified Gram-Schmidt for K <= KB vectors of row r."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cm = offs < C
    rows = tl.arange(0, KB)[:, None]
    p = tl.load(P_ptr + r * P_stride_r + offs.to(tl.int64) * P_stride_c, mask=cm, other=0.0)
    p = p.to(ACC)
    # start: e_{top_j} - 1/C, top by descending probability (ties: lower class first)
    V = tl.zeros((KB, BLOCK), ACC)
    avail = cm
    for j in range(K):
        hv = tl.max(tl.where(avail, p, -1.0), 0)
        idx = tl.min(tl.where(avail & (p == hv), offs, BLOCK), 0)
        avail = avail & (offs != idx)
        zero = tl.zeros((BLOCK,), ACC)
        vj = tl.where(cm, tl.where(offs == idx, 1.0 + zero, zero) - 1.0 / (C + zero), zero)
        V = tl.where(rows == j, vj[None, :], V)
    for _ in range(ITERS):
        for j in range(K):
            vj = tl.sum(tl.where(rows == j, V, 0.0), 0)
            w = p * vj - p * tl.sum(p * vj, 0)
            for i in range(j):
                yi = tl.sum(tl.where(rows == i, V, 0.0), 0)
                w = w - tl.sum(w * yi, 0) * yi
            w = w / tl.maximum(tl.sqrt(tl.sum(w * w, 0)), TINY)
            V = tl.where(rows == j, w[None, :], V)
    for j in range(K):
        vj = tl.sum(tl.where(rows == j, V, 0.0), 0)
        w = p * vj - p * tl.sum(p * vj, 0)
        lam = tl.sum(vj * w, 0)
        vj = _fix_sign(vj, cm, offs, EPS, BLOCK)
        tl.store(L_ptr + r * K + j, lam)
        tl.store(V_ptr + (r * K + j) * C + offs, vj, mask=cm)


def _plan(C: int, k: int, solver: str, dt: torch.dtype) -> tuple[int, int] | None:
    """``(BLOCK, num_warps)`` for a row of ``C`` classes, or None where the row's live vectors
    would not fit in the registers a thread has at that ``num_warps`` (it would spill).

    A thread holds ``BLOCK / (32 num_warps)`` values of each row vector (twice the registers in
    float64) and may use ``min(255, 65536 / (32 num_warps))`` registers. The estimate
    ``live vectors x registers per vector + 16`` matches what ``ptxas`` allocates for sm_80 and
    sm_90 (``python -m fimfast.ops.triton.aot``): it admits every configuration that compiled
    without spills there and refuses every one that spilled (``exact`` on float32 rows of 8192
    classes and float64 rows of 4096; ``power`` on float32 rows of 8192 classes with ``k >= 4``,
    float64 rows of 8192 classes, float64 with ``k = 16``).
    """
    if C > MAX_C or (solver == "power" and k > MAX_K):
        return None
    block = triton.next_power_of_2(C)
    warps = max(1, min(32, block // 256))
    per_vector = block // (32 * warps) * (2 if dt == torch.float64 else 1)
    live = _LIVE_EXACT if solver == "exact" else triton.next_power_of_2(k) + _LIVE_POWER_EXTRA
    budget = min(255, 65536 // (32 * warps))
    if live * max(per_vector, 1) + _REG_OVERHEAD > budget:
        return None
    return block, warps


@triton_op("core_topk", kernels=(_exact_kernel, _power_kernel))
def core_topk_op(
    p: torch.Tensor, k: int, solver: str, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fimfast_triton::core_topk``: the kernels on ``p (R, C)``; ``(lam (R, k), V (R, k, C))``.

    Raises ValueError for rows the kernels do not hold (:func:`_plan`); :func:`core_topk_triton`
    sends those to the torch reference.
    """
    if solver not in ("exact", "power"):
        raise ValueError(f"core_topk: solver must be 'exact' or 'power'; got {solver!r}")
    R, C = p.shape
    if not 1 <= k <= C - 1:
        raise ValueError(f"core_topk: k must be in [1, C-1] = [1, {C - 1}]; got {k}")
    dt = compute_dtype(p.dtype)
    plan = _plan(C, k, solver, dt)
    if plan is None:
        raise ValueError(
            f"core_topk: rows of C={C} classes with k={k} ({solver}, {dt}) do not fit the Triton "
            f"kernels' registers (C <= {MAX_C}, power k <= {MAX_K}); use fimfast.ops.core_topk"
        )
    block, warps = plan
    lam = torch.empty((R, k), dtype=dt, device=p.device)
    vec = torch.empty((R, k, C), dtype=dt, device=p.device)
    if R == 0:
        return lam, vec
    acc = tl.float64 if dt == torch.float64 else tl.float32
    if solver == "exact":
        wrap_triton(_exact_kernel)[(R,)](
            p, p.stride(0), p.stride(1), lam, vec, C, k,
            EPS=torch.finfo(dt).eps, BLOCK=block, ACC=acc, num_warps=warps,
        )
    else:
        wrap_triton(_power_kernel)[(R,)](
            p, p.stride(0), p.stride(1), lam, vec, C, k, iters,
            EPS=torch.finfo(dt).eps, TINY=torch.finfo(dt).tiny, KB=triton.next_power_of_2(k),
            BLOCK=block, ACC=acc, num_warps=warps,
        )
    return lam, vec


@core_topk_op.register_fake
def _(p: torch.Tensor, k: int, solver: str, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    R, C = p.shape
    dt = compute_dtype(p.dtype)
    return p.new_empty((R, k), dtype=dt), p.new_empty((R, k, C), dtype=dt)


def core_topk_triton(
    p: torch.Tensor, k: int, solver: str = "exact", iters: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fimfast.ops.core_topk` in Triton; returns ``(lam (R, k), V (R, k, C))``.

    Rows longer than ``MAX_C`` classes, ``k > MAX_K`` with ``solver="power"``, and rows whose
    vectors would not fit in registers (:func:`_plan`) run the torch reference instead (same
    contract); the rest run ``torch.ops.fimfast_triton.core_topk``.
    """
    if solver not in ("exact", "power"):
        raise ValueError(f"core_topk: solver must be 'exact' or 'power'; got {solver!r}")
    k = int(k)
    if _plan(p.shape[1], k, solver, compute_dtype(p.dtype)) is None:
        return core_topk_torch(p, k, solver, iters)
    return core_topk_op(p.detach(), k, solver, int(iters))
