"""Triton kernel of :func:`fimfast.ops.accumulate_`: every tensor of a dtype pair in one launch.

apex ``multi_tensor_apply`` style: the host lists the addresses and sizes of the tensors and, per
program, which tensor and which block of it to update; each program casts the address back to a
typed pointer and updates one block (``s += alpha*g**2`` or ``s = beta*s + alpha*g**2``, squares in
the state's dtype). One launch per (state dtype, grad dtype) pair present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fimfast.ops.triton.library import triton_op

_BLOCK = 4096
_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _accumulate_kernel(
    S_addr_ptr,
    G_addr_ptr,
    Numel_ptr,
    Tensor_ptr,
    Start_ptr,
    Coef_ptr,
    EMA: tl.constexpr,
    S_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program b updates elements [Start[b], Start[b] + BLOCK) of tensor Tensor[b].

    Coef = [beta, alpha] in the state dtype.
    """
    b = tl.program_id(0)
    t = tl.load(Tensor_ptr + b)
    start = tl.load(Start_ptr + b)
    n = tl.load(Numel_ptr + t)
    s_ptr = tl.load(S_addr_ptr + t).to(tl.pointer_type(S_DTYPE))
    g_ptr = tl.load(G_addr_ptr + t).to(tl.pointer_type(G_DTYPE))
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(S_DTYPE)
    alpha = tl.load(Coef_ptr + 1)
    if EMA:
        s = s * tl.load(Coef_ptr) + alpha * (g * g)
    else:
        s = s + alpha * (g * g)
    tl.store(s_ptr + offs, s, mask=mask)


# the kernel reads the tensors' addresses from a table built on the host: a trace (whose tensors
# have no storage) cannot run the body, so the op stays whole under torch.compile. The mode is
# ``update_mode`` as in the C++ schema (csrc/fimfast.cpp): torch's auto_functionalized
# redispatch takes a positional ``mode`` of its own, and an op argument of that name collides
@triton_op(
    "accumulate_", kernels=(_accumulate_kernel,), mutates_args=("states",), traceable=False
)
def accumulate_op_(
    states: list[torch.Tensor],
    grads: list[torch.Tensor],
    update_mode: str,
    beta: float,
    scale: float,
) -> None:
    """``fimfast_triton::accumulate_``: the kernel, in place on ``states``."""
    if update_mode not in ("sum", "ema"):
        raise ValueError(f"accumulate_: mode must be 'sum' or 'ema'; got {update_mode!r}")
    ema = update_mode == "ema"
    alpha = (1.0 - beta) * scale if ema else scale
    groups: dict[tuple[torch.dtype, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for s, g in zip(states, grads):
        if s.numel() == 0:
            continue
        if not s.is_contiguous():
            work = s.contiguous()
            copies.append((s, work))
            s = work
        groups.setdefault((s.dtype, g.dtype), []).append((s, g.contiguous()))
    for (sdt, gdt), pairs in groups.items():
        dev = pairs[0][0].device
        numels = [s.numel() for s, _ in pairs]
        tensor_of, start_of = [], []
        for i, n in enumerate(numels):
            for e in range(0, n, _BLOCK):
                tensor_of.append(i)
                start_of.append(e)
        meta = torch.tensor(
            [[s.data_ptr() for s, _ in pairs], [g.data_ptr() for _, g in pairs], numels],
            dtype=torch.int64,
        ).to(dev)
        blocks = torch.tensor([tensor_of, start_of], dtype=torch.int64).to(dev)
        coef = torch.tensor([beta, alpha], dtype=sdt, device=dev)
        wrap_triton(_accumulate_kernel)[(len(tensor_of),)](
            meta[0], meta[1], meta[2], blocks[0], blocks[1], coef,
            EMA=ema, S_DTYPE=_TL[sdt], G_DTYPE=_TL[gdt], BLOCK=_BLOCK, num_warps=4,
        )
    for s, work in copies:
        s.copy_(work)


@accumulate_op_.register_fake
def _(states, grads, update_mode, beta, scale) -> None:
    return None


def accumulate_triton_(
    states: list[torch.Tensor],
    grads: list[torch.Tensor],
    mode: str = "sum",
    beta: float = 0.0,
    scale: float = 1.0,
) -> None:
    """:func:`fimfast.ops.accumulate_` in Triton (``torch.ops.fimfast_triton.accumulate_``), in
    place on ``states``."""
    accumulate_op_(list(states), [g.detach() for g in grads], mode, float(beta), float(scale))
