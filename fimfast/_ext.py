"""Lazy loading of the compiled extension ``fimfast._C`` (the ``cpp`` and ``cuda`` backends).

Importing :mod:`fimfast` never loads it: the first op that asks for the ``cpp``/``cuda`` backend
does, through :func:`load`. A missing or broken extension is reported as a reason string (and a
logged warning), never as an ImportError. Loading also registers the fake (meta) implementations
of the ``torch.ops.fimfast`` ops, so ``torch.compile`` and ``torch.library.opcheck`` can trace them.
"""

from __future__ import annotations

import logging
from functools import cache

logger = logging.getLogger("fimfast")


@cache
def load() -> tuple[bool, str]:
    """Load ``fimfast._C`` once and register its fake implementations; returns ``(ok, reason)``."""
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from fimfast import _C  # noqa: F401
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        reason = (
            f"fimfast._C is not available ({type(exc).__name__}: {exc}); "
            "reinstall fimfast with a C++ compiler present to build it"
        )
        logger.warning(reason)
        return False, reason
    try:
        _register_fakes()
    except Exception as exc:  # a schema that disagrees with this file: a stale build
        reason = f"fimfast._C does not match this fimfast ({type(exc).__name__}: {exc}); rebuild it"
        logger.warning(reason)
        return False, reason
    return True, "ok"


def has_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    ok, _ = load()
    if not ok:
        return False
    from fimfast import _C

    return bool(getattr(_C, "WITH_CUDA", False))


def _acc_dtype(*tensors):
    from fimfast.dtypes import compute_dtype

    return compute_dtype(*(t.dtype for t in tensors))


def _register_fakes() -> None:
    """Shape/dtype rules of the ops (the schemas are in csrc/fimfast.cpp)."""
    import torch

    @torch.library.register_fake("fimfast::probe_logit_grad")
    def _probe(logits, probe_mode, seed, offset, num_probes, labels, lam, vec, sigma2):
        torch._check(logits.dim() == 2, lambda: "logits must be 2-D")
        R, C = logits.shape
        return logits.new_empty((num_probes, R, C), dtype=_acc_dtype(logits))

    @torch.library.register_fake("fimfast::core_topk")
    def _topk(p, k, solver, iters):
        torch._check(p.dim() == 2, lambda: "p must be 2-D")
        R, C = p.shape
        dt = _acc_dtype(p)
        return p.new_empty((R, k), dtype=dt), p.new_empty((R, k, C), dtype=dt)

    @torch.library.register_fake("fimfast::sq_matmul")
    def _sq(g, a):
        return g.new_empty((g.shape[1], a.shape[1]), dtype=_acc_dtype(g, a))

    @torch.library.register_fake("fimfast::shared_sq")
    def _shared(G, A):
        return G.new_empty((G.shape[2], A.shape[2]), dtype=_acc_dtype(G, A))

    @torch.library.register_fake("fimfast::accumulate_")
    def _acc(states, grads, update_mode, beta, scale):
        return None
