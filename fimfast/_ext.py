"""Lazy loading of the compiled extension ``fimfast._C`` (the ``cpp`` and ``cuda`` backends).

Importing :mod:`fimfast` never loads it: the first op that asks for the ``cpp``/``cuda`` backend
does, through :func:`load`. A missing or broken extension is reported as a reason string (and a
logged warning), never as an ImportError. Loading also registers the fake (meta) implementations
of the ``torch.ops.fimfast`` ops, so ``torch.compile`` and ``torch.library.opcheck`` can trace them.

The extension is compiled against one torch (C++ ABI and, for CUDA, one toolkit); ``setup.py``
writes that torch's version beside it (``fimfast/_build_info.py``). An extension built for
another torch is refused *before* it is imported (importing it could fail with undefined symbols
or crash), with a logged reason, and the ops run on the torch backend.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache

from fimfast import _env

logger = logging.getLogger("fimfast")

REBUILD = (
    "reinstall fimfast against this torch: pip install --no-build-isolation --no-deps "
    "--force-reinstall <fimfast source>"
)


def build_mismatch(built_for: str, running: str) -> str | None:
    """Why an extension built against torch ``built_for`` cannot load in torch ``running``, or
    ``None`` when it can. The versions must be equal, local tag (``+cpu``, ``+cu128``) included:
    libtorch's C++ ABI is not stable across releases and a CUDA build links one toolkit."""
    if built_for == running:
        return None
    return (
        f"fimfast._C was built against torch {built_for} but torch {running} is running; "
        "it is not loaded and the torch backend is used instead; " + REBUILD
    )


def build_info() -> dict | None:
    """The build record of the extension (``TORCH_VERSION``, ``TORCH_CUDA_VERSION``,
    ``WITH_CUDA``), or ``None`` when there is none (no extension, or one built before records)."""
    try:
        mod = importlib.import_module("fimfast._build_info")
    except ImportError:
        return None
    return {k: getattr(mod, k, None) for k in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "WITH_CUDA")}


def check_build() -> str | None:
    """The reason the extension must not be loaded here, or ``None``."""
    import torch

    info = build_info()
    if info is None or not info.get("TORCH_VERSION"):
        logger.debug("fimfast._C has no build record; its torch version cannot be checked")
        return None
    return build_mismatch(str(info["TORCH_VERSION"]), str(torch.__version__))


@cache
def load() -> tuple[bool, str]:
    """Load ``fimfast._C`` once and register its fake implementations; returns ``(ok, reason)``.

    An extension whose build record names another torch is refused before it is imported.
    """
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        mismatch = check_build()
        if mismatch is not None:
            logger.warning(mismatch)
            return False, mismatch
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


@cache
def host_function(name: str):
    """The host function ``name`` of the extension's Python module (csrc/fimfast.cpp: a function
    on CPU tensors, outside the dispatcher), or ``None`` when the extension is missing, built for
    another torch, or older than the function, or hidden by ``FIMFAST_DISABLE_EXT=1``. Quiet:
    every caller has a torch path. Looked up once per process."""
    if _env.disable_ext():
        return None
    try:
        if check_build() is not None:
            return None
        from fimfast import _C
    except Exception:
        return None
    return getattr(_C, name, None)


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

    @torch.library.register_fake("fimfast::pair_gram_")
    def _pair(A, P, accumulate):
        return None

    @torch.library.register_fake("fimfast::recurrent_bptt")
    def _bptt(mode, saved, whh, dys, dh, dc, reverse):
        G = whh.shape[0]
        dG = dys.new_empty((*dys.shape[:2], G))
        dgh = dys.new_empty(dG.shape if mode == "GRU" else (0,))
        return dG, dgh, dh.new_empty(dh.shape), dh.new_empty(dh.shape if dc is not None else (0,))

    @torch.library.register_fake("fimfast::recurrent_forward")
    def _rfwd(mode, gi, h0, c0, whh, bhh, reverse):
        ys = gi.new_empty((*gi.shape[:2], whh.shape[1]))
        return ys, gi.new_empty(gi.shape), h0.new_empty(h0.shape), h0.new_empty(
            h0.shape if c0 is not None else (0,))

    if hasattr(torch.ops.fimfast, "norm_terms"):  # an extension built before the op lacks it

        @torch.library.register_fake("fimfast::norm_terms")
        def _norm_terms(G, X, eps):
            return G.new_empty((*G.shape[:2], G.shape[3])), G.new_empty((*G.shape[:2], G.shape[3]))

    if hasattr(torch.ops.fimfast, "gram_upper_"):

        @torch.library.register_fake("fimfast::gram_upper_")
        def _gram_upper(out, x, accumulate):
            return None

    if hasattr(torch.ops.fimfast, "mirror_upper_"):

        @torch.library.register_fake("fimfast::mirror_upper_")
        def _mirror_upper(m, scale):
            return None

    @torch.library.register_fake("fimfast::accumulate_")
    def _acc(states, grads, update_mode, beta, scale):
        return None
