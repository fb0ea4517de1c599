"""Triton kernel of :func:`fimfast.ops.shared_sq`: ``sum_n (G_n^T A_n)**2`` tile by tile.

Each program owns a ``(BLOCK_O, BLOCK_I)`` tile of the output and a slice of the samples; per
sample it forms the tile of ``G_n^T A_n`` with ``tl.dot`` over the positions ``T`` and adds its
square to a register accumulator, so the ``N*O*I`` per-sample gradients never exist in memory.
Products run in fp32 with ``input_precision="ieee"`` (fp64 for fp64 inputs on sm_90+; older GPUs
run fp64 through the torch reference, see :mod:`fimfast.ops.triton.arch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fimfast.dtypes import compute_dtype
from fimfast.ops.torch_ref import shared_sq_torch
from fimfast.ops.triton.arch import fp64_dot
from fimfast.ops.triton.library import triton_op


@triton.jit
def _shared_sq_kernel(
    G_ptr,
    G_stride_n,
    G_stride_t,
    G_stride_o,
    A_ptr,
    A_stride_n,
    A_stride_t,
    A_stride_i,
    Out_ptr,
    N,
    T,
    O,
    I,
    N_PER_SPLIT,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    ACC: tl.constexpr,
):
    """Out[split] (SPLIT, O, I) contiguous ACC <- sum over this split's samples."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    split = tl.program_id(2)
    ro = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    ri = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    mo = ro < O
    mi = ri < I
    acc = tl.zeros((BLOCK_O, BLOCK_I), ACC)
    n_lo = split * N_PER_SPLIT
    n_hi = tl.minimum(n_lo + N_PER_SPLIT, N)
    for n in range(n_lo, n_hi):
        g_n = G_ptr + tl.cast(n, tl.int64) * G_stride_n
        a_n = A_ptr + tl.cast(n, tl.int64) * A_stride_n
        per = tl.zeros((BLOCK_O, BLOCK_I), ACC)
        for t0 in range(0, T, BLOCK_T):
            rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            mt = rt < T
            gt = tl.load(
                g_n + ro[:, None] * G_stride_o + rt[None, :] * G_stride_t,
                mask=mo[:, None] & mt[None, :],
                other=0.0,
            ).to(ACC)
            a = tl.load(
                a_n + rt[:, None] * A_stride_t + ri[None, :] * A_stride_i,
                mask=mt[:, None] & mi[None, :],
                other=0.0,
            ).to(ACC)
            per += tl.dot(gt, a, input_precision="ieee")
        acc += per * per
    out = Out_ptr + split.to(tl.int64) * O * I + ro[:, None] * I + ri[None, :]
    tl.store(out, acc, mask=mo[:, None] & mi[None, :])


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


@triton_op("shared_sq", kernels=(_shared_sq_kernel,))
def shared_sq_op(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``fimfast_triton::shared_sq``: the kernel on ``G (N, T, O)``, ``A (N, T, I)``; ``(O, I)``."""
    N, T, O = G.shape
    I = A.shape[2]
    dt = compute_dtype(torch.promote_types(G.dtype, A.dtype))
    if N == 0 or O == 0 or I == 0:
        return torch.zeros((O, I), dtype=dt, device=G.device)
    if dt == torch.float64 and not fp64_dot(G.device):
        raise ValueError(
            "shared_sq: a float64 tl.dot compiles for sm_90 and newer only "
            "(fimfast.ops.triton.arch); use fimfast.ops.shared_sq"
        )
    if dt == torch.float64:
        bo = bi = 32
    else:
        bo = bi = 64
    # float32 64x64 tiles take 16 positions per step: with 32 the kernel spills on sm_90
    # (fimfast.ops.triton.aot)
    bt = 16 if dt != torch.float64 else max(16, min(32, triton.next_power_of_2(T)))
    tiles = triton.cdiv(O, bo) * triton.cdiv(I, bi)
    split = max(1, min(N, _target_programs(G.device) // tiles))
    per = triton.cdiv(N, split)
    split = triton.cdiv(N, per)
    out = torch.empty((split, O, I), dtype=dt, device=G.device)
    wrap_triton(_shared_sq_kernel)[(triton.cdiv(O, bo), triton.cdiv(I, bi), split)](
        G, *G.stride(), A, *A.stride(), out, N, T, O, I, per,
        BLOCK_T=bt, BLOCK_O=bo, BLOCK_I=bi, ACC=tl.float64 if dt == torch.float64 else tl.float32,
        num_warps=4,
    )
    return out[0] if split == 1 else out.sum(0)


@shared_sq_op.register_fake
def _(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    dt = compute_dtype(torch.promote_types(G.dtype, A.dtype))
    return G.new_empty((G.shape[2], A.shape[2]), dtype=dt)


def shared_sq_triton(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """:func:`fimfast.ops.shared_sq` in Triton; returns ``(O, I)`` float32|float64.

    float64 on a GPU older than sm_90 runs the torch reference (:mod:`fimfast.ops.triton.arch`);
    everything else runs ``torch.ops.fimfast_triton.shared_sq``.
    """
    dt = compute_dtype(torch.promote_types(G.dtype, A.dtype))
    if dt == torch.float64 and not fp64_dot(G.device):  # see fimfast.ops.triton.arch
        return shared_sq_torch(G, A)
    return shared_sq_op(G.detach(), A.detach())
