"""Triton kernel of :func:`fimfast.ops.probe_logit_grad`: one program per logit row.

A row of up to ``MAX_ONE_BLOCK`` classes is read once into registers: softmax (max, exp, sum),
the probes of the counter-based generator (hashed in uint32), the mix, and one write of each
probe row. Longer rows (a large vocabulary) go through the same steps in column blocks: an online
max/sum pass, then per probe a pass for the ``sqrt(p).xi`` dot (``hutchinson``) or the inverse-CDF
count (``mc``) and a write pass; those re-read the row (from L2 on a GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fimfast.ops import rng
from fimfast.ops.rng import as_int64
from fimfast.ops.torch_ref import PROBE_MODES, compute_dtype
from fimfast.ops.triton.library import triton_op
from fimfast.ops.triton.rng import sign_bit, uniform01

_MODE_ID = {m: i for i, m in enumerate(PROBE_MODES)}
_HUTCHINSON, _SQRT, _DG, _RANKK, _EMPIRICAL, _MC, _BERNOULLI, _GAUSSIAN = range(8)
# rows up to this many classes stay in registers (16 per thread at 16 warps on a GPU); float64
# rows up to half as many (a float64 row of 8192 spills on sm_80/sm_90: fimfast.ops.triton.aot)
MAX_ONE_BLOCK = 8192
_LOOP_BLOCK = 4096


@triton.jit
def _row_stats(X_ptr, row_off, X_stride_c, C, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Online max and sum of exp over a long row (column blocks): ``(m, below, ties)``, the sum
    being ``below + ties`` with ``ties`` the classes at ``m`` (``e = 1``) and ``below`` the others'
    ``e``. Each lane keeps its sum without one of the elements at its max, ``t``: a new lane max
    turns the old sum into ``t`` (no ``s - 1`` is formed)."""
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full((BLOCK,), float("-inf"), ACC)
    s_vec = tl.zeros((BLOCK,), ACC)
    t_vec = tl.zeros((BLOCK,), ACC)
    for c0 in range(0, C, BLOCK):
        cols = c0 + offs
        x = tl.load(
            X_ptr + row_off + cols.to(tl.int64) * X_stride_c, mask=cols < C, other=float("-inf")
        ).to(ACC)
        m_new = tl.maximum(m_vec, x)
        scaled = s_vec * tl.exp(m_vec - m_new)
        ex = tl.exp(x - m_new)
        t_new = tl.where(x > m_vec, scaled, t_vec + ex)
        # lanes still at -inf keep a zero sum (exp(-inf - -inf) would be nan)
        s_vec = tl.where(m_new == float("-inf"), 0.0, scaled + ex)
        t_vec = tl.where(m_new == float("-inf"), 0.0, t_new)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    at = (m_vec == m) & (m_vec != float("-inf"))
    below = tl.sum(tl.where(at, t_vec, tl.where(m_vec == float("-inf"), 0.0,
                                                s_vec * tl.exp(m_vec - m))), 0)
    ties = tl.sum(at.to(ACC), 0)
    return m, below, ties


@triton.jit(do_not_specialize=["R", "S", "K", "offset", "K0", "K1", "U0", "U1"])
def _probe_logit_grad_kernel(
    X_ptr,
    X_stride_r,
    X_stride_c,
    Y_ptr,
    L_ptr,
    V_ptr,
    P_ptr,
    O_ptr,
    R,
    C,
    S,
    K,
    offset,
    K0,
    K1,
    U0,
    U1,
    MODE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """dz[s, r, :] for s < S of row r = program_id(0); O_ptr is (S, R, C) contiguous, ACC dtype.

    X: (R, C) logits (any float dtype, strided). Y: (R,) int64 labels (empirical). L: (R, K) and
    V: (R, K, C) contiguous eigenpairs in ACC (rankk). P: [1/sqrt(sigma2)] in ACC (gaussian).
    """
    r = tl.program_id(0).to(tl.int64)
    R = tl.cast(R, tl.int64)  # (s*R + r)*C passes 2**31 for large calls
    offset = tl.cast(offset, tl.int64)
    k0 = K0.to(tl.uint32)
    k1 = K1.to(tl.uint32)
    u0 = U0.to(tl.uint32)
    u1 = U1.to(tl.uint32)
    offs = tl.arange(0, BLOCK)
    row_off = r * X_stride_r
    if MODE == 3:  # rankk: sum_j xi_j sqrt(lam_j) v_j, counters (s*R + r)*K + j
        for s in range(S):
            base = offset + (s * R + r) * K
            o_row = O_ptr + (s * R + r) * C
            for c0 in range(0, C, BLOCK):
                cols = c0 + offs
                cm = cols < C
                acc = tl.zeros((BLOCK,), ACC)
                for j in range(K):
                    lam = tl.maximum(tl.load(L_ptr + r * K + j), 0.0)
                    coef = tl.sqrt(lam)
                    coef = tl.where(sign_bit(base + j, k0, k1) != 0, -coef, coef)
                    v = tl.load(V_ptr + (r * K + j) * C + cols, mask=cm, other=0.0)
                    acc += coef * v
                tl.store(o_row + cols, acc, mask=cm)
    elif ONE_BLOCK:
        cm = offs < C
        x = tl.load(X_ptr + row_off + offs.to(tl.int64) * X_stride_c, mask=cm, other=0.0).to(ACC)
        if MODE == 7:  # gaussian
            amp = tl.zeros((BLOCK,), ACC) + tl.load(P_ptr)
        elif MODE == 6:  # bernoulli: sqrt(s(1-s)) = 1 / (e^{z/2} + e^{-z/2}), both tails exact
            amp = 1.0 / (tl.exp(0.5 * x) + tl.exp(-0.5 * x))
        else:
            xm = tl.where(cm, x, float("-inf"))
            m = tl.max(xm, 0)
            e = tl.exp(xm - m)
            # 1 - p of a leading class (x == m) from the others' e: exact on confident rows
            lead = (xm == m) & cm
            below = tl.sum(tl.where(lead, 0.0, e), 0)
            ties = tl.sum(lead.to(ACC), 0)
            ssum = below + ties
            p = e / ssum
            q = (below + (ties - 1.0)) / ssum
            amp = tl.sqrt(p)
        if MODE == 4:
            y = tl.load(Y_ptr + r)
            dz = tl.where(offs == y, tl.where(lead, q, 1.0 - p), -p)
        if MODE == 5:
            cdf = tl.cumsum(p, 0)
        for s in range(S):
            row = s * R + r
            if MODE == 4:  # empirical: e_y - p for every probe
                out = dz
            elif MODE == 5:  # mc: e_yhat - p, yhat = #classes with cdf <= u
                u = uniform01(offset + row, u0, u1).to(ACC)
                yhat = tl.minimum(tl.sum(((cdf <= u) & cm).to(tl.int32), 0), C - 1)
                out = tl.where(offs == yhat, tl.where(lead, q, 1.0 - p), -p)
            else:
                bit = sign_bit(offset + row * C + offs, k0, k1)
                out = tl.where(bit != 0, -amp, amp)
                if MODE == 0:  # hutchinson: w - p (sqrt(p) . xi), at a leading class
                    # w (below + ties - k) / sum - p (w below), k = d_lead / w an exact integer
                    # (the tied classes' w have one magnitude): fimfast.ops.softmax_rest
                    d_below = tl.sum(tl.where(lead, 0.0, out), 0)
                    d_lead = tl.sum(tl.where(lead, out, 0.0), 0)
                    out = tl.where(lead, out * ((below + (ties - d_lead / out)) / ssum)
                                   - p * d_below, out - p * (d_below + d_lead))
            tl.store(O_ptr + row * C + offs, out, mask=cm)
    else:
        if MODE != 7 and MODE != 6:
            m, below, ties = _row_stats(X_ptr, row_off, X_stride_c, C, BLOCK, ACC)
            inv = 1.0 / (below + ties)
            q = (below + (ties - 1.0)) * inv  # 1 - p of a leading class (x == m)
        if MODE == 4:
            y = tl.load(Y_ptr + r)
        for s in range(S):
            row = s * R + r
            o_row = O_ptr + row * C
            if MODE == 0:  # sqrt(p) . xi, split at the leading classes
                dot = tl.zeros((BLOCK,), ACC)
                dot_lead = tl.zeros((BLOCK,), ACC)
                for c0 in range(0, C, BLOCK):
                    cols = c0 + offs
                    cm = cols < C
                    x = tl.load(
                        X_ptr + row_off + cols.to(tl.int64) * X_stride_c, mask=cm, other=0.0
                    ).to(ACC)
                    p = tl.where(cm, tl.exp(x - m) * inv, 0.0)
                    bit = sign_bit(offset + row * C + cols, k0, k1)
                    w = tl.where(bit != 0, -tl.sqrt(p), tl.sqrt(p))
                    lead = (x == m) & cm
                    dot += tl.where(lead, 0.0, w)
                    dot_lead += tl.where(lead, w, 0.0)
                d_below = tl.sum(dot, 0)
                d_lead = tl.sum(dot_lead, 0)
            if MODE == 5:
                u = uniform01(offset + row, u0, u1).to(ACC)
                carry = tl.sum(tl.zeros((BLOCK,), ACC), 0)
                count = tl.sum(tl.zeros((BLOCK,), tl.int32), 0)
                for c0 in range(0, C, BLOCK):
                    cols = c0 + offs
                    cm = cols < C
                    x = tl.load(
                        X_ptr + row_off + cols.to(tl.int64) * X_stride_c, mask=cm, other=0.0
                    )
                    p = tl.where(cm, tl.exp(x.to(ACC) - m) * inv, 0.0)
                    # p's sum first: p dies in the scan, so p and cdf are not both live through
                    # the count (at 16 values per thread that spilled on sm_80; same numbers)
                    psum = tl.sum(p, 0)
                    cdf = carry + tl.cumsum(p, 0)
                    count += tl.sum(((cdf <= u) & cm).to(tl.int32), 0)
                    carry += psum
                yhat = tl.minimum(count, C - 1)
            for c0 in range(0, C, BLOCK):
                cols = c0 + offs
                cm = cols < C
                x = tl.load(
                    X_ptr + row_off + cols.to(tl.int64) * X_stride_c, mask=cm, other=0.0
                ).to(ACC)
                if MODE == 7:
                    amp = tl.zeros((BLOCK,), ACC) + tl.load(P_ptr)
                elif MODE == 6:  # as in the one-block path: exact in both tails
                    amp = 1.0 / (tl.exp(0.5 * x) + tl.exp(-0.5 * x))
                else:
                    p = tl.exp(x - m) * inv
                    amp = tl.sqrt(p)
                    lead = x == m
                if MODE == 4:
                    out = tl.where(cols == y, tl.where(lead, q, 1.0 - p), -p)
                elif MODE == 5:
                    out = tl.where(cols == yhat, tl.where(lead, q, 1.0 - p), -p)
                else:
                    bit = sign_bit(offset + row * C + cols, k0, k1)
                    out = tl.where(bit != 0, -amp, amp)
                    if MODE == 0:  # as in the one-block path
                        out = tl.where(lead, out * ((below + (ties - d_lead / out)) * inv)
                                       - p * d_below, out - p * (d_below + d_lead))
                tl.store(o_row + cols, out, mask=cm)


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


@triton_op("probe_logit_grad", kernels=(_probe_logit_grad_kernel,))
def probe_logit_grad_op(
    logits: torch.Tensor,
    mode: str,
    seed: int,
    offset: int,
    num_probes: int,
    labels: torch.Tensor | None,
    lam: torch.Tensor | None,
    vec: torch.Tensor | None,
    sigma2: float,
) -> torch.Tensor:
    """``fimfast_triton::probe_logit_grad``: the kernel, arguments as the ``fimfast`` C++ op
    (``seed`` and ``offset`` as the int64 of their 64 bits, the eigenpairs as ``lam``, ``vec``);
    returns ``(S, R, C)`` float32|float64."""
    if mode not in _MODE_ID:
        raise ValueError(f"mode must be one of {PROBE_MODES}; got {mode!r}")
    R, C = logits.shape
    S = num_probes
    dt = compute_dtype(logits.dtype)
    out = torch.empty((S, R, C), dtype=dt, device=logits.device)
    if out.numel() == 0:
        return out
    dev = logits.device
    dummy = torch.zeros(1, dtype=dt, device=dev)
    labels_t = torch.zeros(1, dtype=torch.int64, device=dev)
    lam_t = vec_t = dummy
    K = 0
    if mode == "empirical":
        if labels is None:
            raise ValueError("probe_logit_grad: mode 'empirical' needs labels")
        labels_t = labels.to(device=dev, dtype=torch.int64).contiguous()
    if mode == "rankk":
        if lam is None or vec is None:
            raise ValueError("probe_logit_grad: mode 'rankk' needs eig=(eigenvalues, eigenvectors)")
        lam_t = lam.to(device=dev, dtype=dt).contiguous()
        vec_t = vec.to(device=dev, dtype=dt).contiguous()
        K = lam_t.shape[1]
    params = torch.full((1,), 1.0 / math.sqrt(sigma2), dtype=dt, device=dev)
    k0, k1 = rng.keys(seed, rng.STREAM_SIGN)
    u0, u1 = rng.keys(seed, rng.STREAM_UNIFORM)
    one_block = C <= (MAX_ONE_BLOCK if dt != torch.float64 else MAX_ONE_BLOCK // 2)
    block = triton.next_power_of_2(C) if one_block else _LOOP_BLOCK
    wrap_triton(_probe_logit_grad_kernel)[(R,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        labels_t,
        lam_t,
        vec_t,
        params,
        out,
        R,
        C,
        S,
        K,
        offset & ((1 << 63) - 1),
        k0,
        k1,
        u0,
        u1,
        MODE=_MODE_ID[mode],
        ONE_BLOCK=one_block,
        BLOCK=block,
        ACC=tl.float64 if dt == torch.float64 else tl.float32,
        num_warps=_num_warps(block),
    )
    return out


@probe_logit_grad_op.register_fake
def _(logits, mode, seed, offset, num_probes, labels, lam, vec, sigma2):
    R, C = logits.shape
    return logits.new_empty((num_probes, R, C), dtype=compute_dtype(logits.dtype))


def probe_logit_grad_triton(
    logits: torch.Tensor,
    mode: str,
    seed: int,
    offset: int,
    num_probes: int,
    labels: torch.Tensor | None = None,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    sigma2: float = 1.0,
) -> torch.Tensor:
    """:func:`fimfast.ops.probe_logit_grad` in Triton, through
    ``torch.ops.fimfast_triton.probe_logit_grad``; returns ``(S, R, C)`` float32|float64."""
    lam, vec = (None, None) if eig is None else (eig[0].detach(), eig[1].detach())
    return probe_logit_grad_op(
        logits.detach(), mode, as_int64(seed), as_int64(offset), int(num_probes),
        None if labels is None else labels.detach(), lam, vec, float(sigma2),
    )  # fmt: skip
