"""The ``cpp`` backend: CPU kernels of ``fimfast._C`` (``csrc/cpu/<op>.cpp``) behind the contracts
of :mod:`fimfast.ops.torch_ref`.

The ops are ``torch.ops.fimfast.*`` (schemas in ``csrc/fimfast.cpp``); the same ops run the CUDA
kernels for CUDA tensors (see :mod:`fimfast.ops.cuda`). Importing this module loads the extension
and raises ImportError when it cannot.
"""

from __future__ import annotations

import torch

from fimfast import _ext
from fimfast.ops.rng import as_int64

_ok, _why = _ext.load()
if not _ok:
    raise ImportError(_why)

def probe_logit_grad_cpp(
    logits: torch.Tensor,
    mode: str,
    seed: int,
    offset: int,
    num_probes: int,
    labels: torch.Tensor | None = None,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    sigma2: float = 1.0,
) -> torch.Tensor:
    """:func:`fimfast.ops.probe_logit_grad` on the CPU; returns ``(S, R, C)`` float32|float64."""
    lam, vec = eig if eig is not None else (None, None)
    return torch.ops.fimfast.probe_logit_grad(
        logits, mode, as_int64(seed), as_int64(offset), int(num_probes), labels, lam, vec,
        float(sigma2),
    )


def core_topk_cpp(
    p: torch.Tensor, k: int, solver: str = "exact", iters: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fimfast.ops.core_topk` on the CPU; returns ``(lam (R, k), V (R, k, C))``."""
    lam, vec = torch.ops.fimfast.core_topk(p, int(k), solver, int(iters))
    return lam, vec


def sq_matmul_cpp(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """:func:`fimfast.ops.sq_matmul` on the CPU; returns ``(O, I)`` float32|float64."""
    return torch.ops.fimfast.sq_matmul(g, a)


def shared_sq_cpp(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """:func:`fimfast.ops.shared_sq` on the CPU; returns ``(O, I)`` float32|float64."""
    return torch.ops.fimfast.shared_sq(G, A)


def pair_gram_cpp_(A: torch.Tensor, P: list, accumulate: bool) -> None:
    """:func:`fimfast.ops.pair_gram` on the CPU, into ``A`` in place (``P`` the positions'
    ``(M, N, O)``); an extension built before the op runs the torch reference."""
    op = getattr(torch.ops.fimfast, "pair_gram_", None)
    if op is None:
        from fimfast.ops.pairs import pair_gram_torch_

        pair_gram_torch_(A, P, accumulate)
        return
    op(A, P, accumulate)


def accumulate_cpp_(
    states: list[torch.Tensor],
    grads: list[torch.Tensor],
    mode: str = "sum",
    beta: float = 0.0,
    scale: float = 1.0,
) -> None:
    """:func:`fimfast.ops.accumulate_` on the CPU, all tensors in one parallel loop."""
    torch.ops.fimfast.accumulate_(list(states), list(grads), mode, float(beta), float(scale))


def recurrent_bptt_cpp(mode, saved, whh, dys, dh, dc, reverse):
    """:func:`fimfast.ops.recurrent_bptt` on the CPU, the whole recurrence in one call (float32
    and float64, all arguments of one dtype; otherwise the torch reference)."""
    dts = {t.dtype for t in (*saved, whh, dys, dh) + (() if dc is None else (dc,))}
    if len(dts) != 1 or whh.dtype not in (torch.float32, torch.float64):
        from fimfast.ops.recurrent import recurrent_bptt_torch

        return recurrent_bptt_torch(mode, saved, whh, dys, dh, dc, reverse)
    dG, dgh, dh0, dc0 = torch.ops.fimfast.recurrent_bptt(mode, saved, whh, dys, dh, dc, reverse)
    return dG, (dgh if mode == "GRU" else None), dh0, (dc0 if mode == "LSTM" else None)


def recurrent_forward_cpp(mode, gi, h0, c0, whh, bhh, reverse):
    """:func:`fimfast.ops.recurrent_forward` on the CPU, all steps in one call (float32 and
    float64, all arguments of one dtype; otherwise the torch reference)."""
    ts = (gi, h0, whh) + tuple(t for t in (c0, bhh) if t is not None)
    if len({t.dtype for t in ts}) != 1 or whh.dtype not in (torch.float32, torch.float64):
        from fimfast.ops.recurrent import recurrent_forward_torch

        return recurrent_forward_torch(mode, gi, h0, c0, whh, bhh, reverse)
    ys, pre, hT, cT = torch.ops.fimfast.recurrent_forward(mode, gi, h0, c0, whh, bhh, reverse)
    return ys, pre, hT, (cT if mode == "LSTM" else None)
