"""The ``cuda`` backend: CUDA kernels of ``fimfast._C`` (``csrc/cuda/<op>.cu``) behind the contracts
of :mod:`fimfast.ops.torch_ref`.

The ops are the ``torch.ops.fimfast.*`` of the ``cpp`` backend; torch dispatches a CUDA tensor to
the CUDA kernels (``TORCH_LIBRARY_IMPL(fimfast, CUDA, ...)`` in ``csrc/cuda/*_binding.cpp``), which
exist only when the extension was built against a CUDA torch. Importing this module raises
ImportError otherwise.
"""

from __future__ import annotations

import torch

from fimfast import _ext

_ok, _why = _ext.load()
if not _ok:
    raise ImportError(_why)
if not _ext.has_cuda():
    raise ImportError("fimfast._C was built without CUDA kernels (no CUDA toolkit or CPU torch)")

from fimfast.ops.cpp import as_int64  # noqa: E402  (after the extension check)


def probe_logit_grad_cuda(
    logits: torch.Tensor,
    mode: str,
    seed: int,
    offset: int,
    num_probes: int,
    labels: torch.Tensor | None = None,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    sigma2: float = 1.0,
) -> torch.Tensor:
    """:func:`fimfast.ops.probe_logit_grad` on a GPU; returns ``(S, R, C)`` float32|float64."""
    lam, vec = eig if eig is not None else (None, None)
    return torch.ops.fimfast.probe_logit_grad(
        logits, mode, as_int64(seed), as_int64(offset), int(num_probes), labels, lam, vec,
        float(sigma2),
    )


def core_topk_cuda(
    p: torch.Tensor, k: int, solver: str = "exact", iters: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fimfast.ops.core_topk` on a GPU; returns ``(lam (R, k), V (R, k, C))``."""
    lam, vec = torch.ops.fimfast.core_topk(p, int(k), solver, int(iters))
    return lam, vec


def sq_matmul_cuda(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """:func:`fimfast.ops.sq_matmul` on a GPU; returns ``(O, I)`` float32|float64."""
    return torch.ops.fimfast.sq_matmul(g, a)


def shared_sq_cuda(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """:func:`fimfast.ops.shared_sq` on a GPU; returns ``(O, I)`` float32|float64."""
    return torch.ops.fimfast.shared_sq(G, A)


def accumulate_cuda_(
    states: list[torch.Tensor],
    grads: list[torch.Tensor],
    mode: str = "sum",
    beta: float = 0.0,
    scale: float = 1.0,
) -> None:
    """:func:`fimfast.ops.accumulate_` on a GPU: one multi-tensor launch per dtype pair."""
    torch.ops.fimfast.accumulate_(list(states), list(grads), mode, float(beta), float(scale))
