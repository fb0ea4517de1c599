"""Triton kernel of :func:`fimfast.ops.sq_matmul`: ``(g*g)^T (a*a)`` with the squares on the fly.

A tiled GEMM over the sample axis: each program owns a ``(BLOCK_O, BLOCK_I)`` tile of the output
and a slice of the samples, loads ``g`` transposed and ``a`` tile by tile, widens and squares them
in registers and accumulates ``tl.dot`` in fp32 with ``input_precision="ieee"`` (TF32 would cost
~1e-3 relative error, far above the float32 reference), or fp64 for fp64 inputs (sm_90+; older GPUs
run fp64 through the torch reference, see :mod:`fimfast.ops.triton.arch`). When the output
has few tiles the samples are split over programs and the partial tiles summed in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fimfast.dtypes import compute_dtype
from fimfast.ops.torch_ref import sq_matmul_torch
from fimfast.ops.triton.arch import fp64_dot
from fimfast.ops.triton.library import triton_op


@triton.jit
def _sq_matmul_kernel(
    G_ptr,
    G_stride_n,
    G_stride_o,
    A_ptr,
    A_stride_n,
    A_stride_i,
    Out_ptr,
    N,
    O,
    I,
    N_PER_SPLIT,
    BLOCK_N: tl.constexpr,
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
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = rn < n_hi
        gt = tl.load(
            G_ptr + ro[:, None] * G_stride_o + rn[None, :] * G_stride_n,
            mask=mo[:, None] & mn[None, :],
            other=0.0,
        ).to(ACC)
        a = tl.load(
            A_ptr + rn[:, None] * A_stride_n + ri[None, :] * A_stride_i,
            mask=mn[:, None] & mi[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.dot(gt * gt, a * a, input_precision="ieee")
    out = Out_ptr + split.to(tl.int64) * O * I + ro[:, None] * I + ri[None, :]
    tl.store(out, acc, mask=mo[:, None] & mi[None, :])


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


@triton_op("sq_matmul", kernels=(_sq_matmul_kernel,))
def sq_matmul_op(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``fimfast_triton::sq_matmul``: the kernel on ``g (N, O)``, ``a (N, I)``; ``(O, I)``."""
    N, O = g.shape
    I = a.shape[1]
    dt = compute_dtype(torch.promote_types(g.dtype, a.dtype))
    if N == 0 or O == 0 or I == 0:
        return torch.zeros((O, I), dtype=dt, device=g.device)
    if dt == torch.float64 and not fp64_dot(g.device):
        raise ValueError(
            "sq_matmul: a float64 tl.dot compiles for sm_90 and newer only "
            "(fimfast.ops.triton.arch); use fimfast.ops.sq_matmul"
        )
    if dt == torch.float64:
        bo = bi = 32
        bn = 16
    else:
        bo = bi = 64
        bn = 32
    tiles = triton.cdiv(O, bo) * triton.cdiv(I, bi)
    split = max(1, min(triton.cdiv(N, 4 * bn), _target_programs(g.device) // tiles))
    per = triton.cdiv(triton.cdiv(N, split), bn) * bn
    split = triton.cdiv(N, per)
    out = torch.empty((split, O, I), dtype=dt, device=g.device)
    wrap_triton(_sq_matmul_kernel)[(triton.cdiv(O, bo), triton.cdiv(I, bi), split)](
        g, g.stride(0), g.stride(1), a, a.stride(0), a.stride(1), out, N, O, I, per,
        BLOCK_N=bn, BLOCK_O=bo, BLOCK_I=bi, ACC=tl.float64 if dt == torch.float64 else tl.float32,
        num_warps=4,
    )
    return out[0] if split == 1 else out.sum(0)


@sq_matmul_op.register_fake
def _(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    dt = compute_dtype(torch.promote_types(g.dtype, a.dtype))
    return g.new_empty((g.shape[1], a.shape[1]), dtype=dt)


def sq_matmul_triton(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """:func:`fimfast.ops.sq_matmul` in Triton; returns ``(O, I)`` float32|float64.

    float64 on a GPU older than sm_90 runs the torch reference (:mod:`fimfast.ops.triton.arch`);
    everything else runs ``torch.ops.fimfast_triton.sq_matmul``.
    """
    dt = compute_dtype(torch.promote_types(g.dtype, a.dtype))
    if dt == torch.float64 and not fp64_dot(g.device):  # see fimfast.ops.triton.arch
        return sq_matmul_torch(g, a)
    return sq_matmul_op(g.detach(), a.detach())
