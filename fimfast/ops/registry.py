"""Op -> backend -> implementation, resolved per call (the automatic choice is remembered).

Resolution order: the explicit ``backend`` argument, then ``FIMFAST_BACKEND``, then automatic.
An explicit backend that cannot run raises :class:`BackendUnavailableError` with the probe's reason;
the automatic choice falls back quietly to the next candidate (finally the torch reference).

Implementations are named as ``"module:function"`` strings and imported on first use, so importing
:mod:`fimfast` never imports triton, never loads ``fimfast._C`` and never initialises CUDA.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable

import torch

from fimfast import _env

BACKENDS = ("torch", "triton", "cuda", "cpp")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op here."""


# op -> backend -> "module:function"; imported on first use only
_T = "fimfast.ops.triton."
_IMPLS: dict[str, dict[str, str]] = {
    "probe_logit_grad": {
        "torch": "fimfast.ops.torch_ref:probe_logit_grad_torch",
        "triton": _T + "probe_logit_grad:probe_logit_grad_triton",
        "cpp": "fimfast.ops.cpp:probe_logit_grad_cpp",
        "cuda": "fimfast.ops.cuda:probe_logit_grad_cuda",
    },
    "core_topk": {
        "torch": "fimfast.ops.torch_ref:core_topk_torch",
        "triton": _T + "core_topk:core_topk_triton",
        "cpp": "fimfast.ops.cpp:core_topk_cpp",
        "cuda": "fimfast.ops.cuda:core_topk_cuda",
    },
    "sq_matmul": {
        "torch": "fimfast.ops.torch_ref:sq_matmul_torch",
        "triton": _T + "sq_matmul:sq_matmul_triton",
        "cpp": "fimfast.ops.cpp:sq_matmul_cpp",
        "cuda": "fimfast.ops.cuda:sq_matmul_cuda",
    },
    "shared_sq": {
        "torch": "fimfast.ops.torch_ref:shared_sq_torch",
        "triton": _T + "shared_sq:shared_sq_triton",
        "cpp": "fimfast.ops.cpp:shared_sq_cpp",
        "cuda": "fimfast.ops.cuda:shared_sq_cuda",
    },
    "pair_gram_": {
        "torch": "fimfast.ops.pairs:pair_gram_torch_",
        "cpp": "fimfast.ops.cpp:pair_gram_cpp_",
    },
    "accumulate_": {
        "torch": "fimfast.ops.torch_ref:accumulate_torch_",
        "triton": _T + "accumulate:accumulate_triton_",
        "cpp": "fimfast.ops.cpp:accumulate_cpp_",
        "cuda": "fimfast.ops.cuda:accumulate_cuda_",
    },
    "gram_upper_": {
        "torch": "fimfast.ops.gram:gram_upper_torch_",
        "cpp": "fimfast.ops.gram:gram_upper_cpp_",
    },
    "mirror_upper_": {
        "torch": "fimfast.ops.gram:mirror_upper_torch_",
        "cpp": "fimfast.ops.gram:mirror_upper_cpp_",
    },
    "norm_terms": {
        "torch": "fimfast.ops.norm_terms:norm_terms_torch",
        "cpp": "fimfast.ops.norm_terms:norm_terms_cpp",
    },
    "recurrent_bptt": {
        "torch": "fimfast.ops.recurrent:recurrent_bptt_torch",
        "cpp": "fimfast.ops.cpp:recurrent_bptt_cpp",
    },
    "recurrent_forward": {
        "torch": "fimfast.ops.recurrent:recurrent_forward_torch",
        "cpp": "fimfast.ops.cpp:recurrent_forward_cpp",
    },
    # torch/cpp/cuda: chunked torch matmuls around that backend's probe_logit_grad
    # (fimfast.ops.lm_head); triton: fused kernels that never store a logits tile
    "lm_head_probe": {
        "torch": "fimfast.ops.lm_head:lm_head_probe_torch",
        "triton": _T + "lm_head_probe:lm_head_probe_triton",
        "cpp": "fimfast.ops.lm_head:lm_head_probe_cpp",
        "cuda": "fimfast.ops.lm_head:lm_head_probe_cuda",
    },
}

# automatic order per device type. On the CPU, the measured fastest correct backend first
# (benchmarks/bench_ops.py; benchmarks/results/ops_cpu_2026-11-23.json, AMD EPYC, 1 thread CPU
# time, speed-up of cpp over the torch reference): probe_logit_grad 2.4-4.9x by mode (hutchinson
# 3.2x; 10.5x over the eager softmax + bernoulli + mix), core_topk 1.9-3.7x, shared_sq 1.16-1.22x,
# accumulate_ 1.8-4.1x. sq_matmul runs the same BLAS product either way (0.95-1.08x); cpp goes
# first for its bounded temporaries (squares in 32 MiB chunks; the reference widens and squares
# whole inputs).
_AUTO_CUDA = ("cuda", "triton", "torch")
_AUTO_CPU: dict[str, tuple[str, ...]] = {
    "probe_logit_grad": ("cpp", "torch"),
    "core_topk": ("cpp", "torch"),
    "sq_matmul": ("cpp", "torch"),
    "shared_sq": ("cpp", "torch"),
    "pair_gram_": ("cpp", "torch"),
    "accumulate_": ("cpp", "torch"),
    "lm_head_probe": ("cpp", "torch"),
    "recurrent_bptt": ("cpp", "torch"),
    "norm_terms": ("cpp", "torch"),
    "gram_upper_": ("cpp", "torch"),
    "mirror_upper_": ("cpp", "torch"),
    "recurrent_forward": ("cpp", "torch"),
}


def register(op: str, backend: str, target: str, cpu_auto_first: bool | None = None) -> None:
    """Register ``target`` (``"module:function"``) as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = target
    _AUTO_CHOICE.clear()
    _AUTO_BOUND.clear()
    if cpu_auto_first is not None and backend == "cpp":
        order = [b for b in _AUTO_CPU.get(op, ("torch",)) if b != "cpp"]
        _AUTO_CPU[op] = tuple(["cpp", *order] if cpu_auto_first else [*order, "cpp"])


# probe results, once per process (a plain dict for torch.compile, as _LOADED below)
_PROBED: dict[str, tuple[bool, str]] = {}


def _probe_triton() -> tuple[bool, str]:
    got = _PROBED.get("triton")
    if got is None:
        got = _PROBED["triton"] = _find_triton()
    return got


def _find_triton() -> tuple[bool, str]:
    if _env.disable_triton():
        return False, "disabled by FIMFAST_DISABLE_TRITON=1"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if not hasattr(torch.library, "triton_op"):  # the kernels are custom ops: ops/triton/library.py
        return False, (
            f"the triton backend needs torch>=2.6 (torch.library.triton_op); torch is "
            f"{torch.__version__}"
        )
    return True, "ok"


def _triton_interpret() -> bool:
    return _env.get("TRITON_INTERPRET") == "1"


def _probe_ext() -> tuple[bool, str]:
    got = _PROBED.get("ext")
    if got is None:
        got = _PROBED["ext"] = _load_ext()
    return got


def _load_ext() -> tuple[bool, str]:
    if _env.disable_ext():
        return False, "disabled by FIMFAST_DISABLE_EXT=1"
    from fimfast import _ext

    return _ext.load()


def _probe_cuda_ext() -> tuple[bool, str]:
    ok, why = _probe_ext()
    if not ok:
        return ok, why
    from fimfast import _ext

    if not _ext.has_cuda():
        return False, "fimfast._C was built without CUDA kernels (no CUDA toolkit or CPU torch)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, "ok"


def backend_status(backend: str, device: torch.device | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` here, and why not."""
    dev_type = "cpu" if device is None else torch.device(device).type
    if backend == "torch":
        return True, "ok"
    if backend == "triton":
        ok, why = _probe_triton()
        if not ok:
            return ok, why
        if dev_type == "cuda":
            return True, "ok"
        if _triton_interpret():
            return True, "ok (TRITON_INTERPRET=1)"
        return False, "triton needs a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU"
    if backend == "cpp":
        ok, why = _probe_ext()
        if not ok:
            return ok, why
        if dev_type != "cpu":
            return False, f"the cpp backend runs on CPU tensors; got a {dev_type} tensor"
        return True, "ok"
    if backend == "cuda":
        ok, why = _probe_cuda_ext()
        if not ok:
            return ok, why
        if dev_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors; got a {dev_type} tensor"
        return True, "ok"
    raise ValueError(f"backend must be one of {('auto', *BACKENDS)}; got {backend!r}")


# a plain dict rather than functools.cache: torch.compile reads a loaded entry as a constant and
# traces a call through the registry into the backend's op (it traces through a cache wrapper,
# warning, and cannot trace importlib)
_LOADED: dict[str, Callable] = {}


def _load(target: str) -> Callable:
    fn = _LOADED.get(target)
    if fn is None:
        mod, name = target.split(":")
        module = sys.modules.get(mod)  # already imported: no import machinery to trace
        if module is None:
            module = importlib.import_module(mod)
        fn = _LOADED[target] = getattr(module, name)
    return fn


def resolve(op: str, backend: str | None, device: torch.device) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for a tensor on ``device``.

    Args:
        op: op name, a key of the registry.
        backend: ``None``/``"auto"`` for the automatic choice, or one of ``BACKENDS``.
        device: device of the op's inputs.

    Returns:
        ``(backend_name, function)``.

    Raises:
        BackendUnavailableError: ``backend`` was named explicitly and cannot run here.
    """
    impls = _IMPLS[op]
    if backend is None:
        backend = _step_backend(op)
    requested = backend if backend not in (None, "auto") else _env.backend()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}; got {requested!r}")
        if requested not in impls:
            raise BackendUnavailableError(
                f"backend={requested!r} has no implementation of op {op!r} "
                f"(implemented: {sorted(impls)})"
            )
        ok, why = backend_status(requested, device)
        if not ok:
            raise BackendUnavailableError(f"backend={requested!r} is unavailable for {op}: {why}")
        return requested, _load(impls[requested])
    # the automatic choice depends on the op, the device type and what can run here: triton and
    # the extension are probed once per process, TRITON_INTERPRET is read on every call
    key = (op, device.type, _triton_interpret())
    choice = _AUTO_CHOICE.get(key)
    if choice is None:
        choice = _AUTO_CHOICE[key] = _auto(op, impls, device)
    return choice


_AUTO_CHOICE: dict[tuple[str, str, bool], tuple[str, Callable]] = {}


def bound(op: str, backend: str | None, device: torch.device) -> Callable:
    """The function :func:`resolve` picks, for the ops called every step.

    With no backend named (argument and ``FIMFAST_BACKEND``, which is read on every call), an
    automatic choice already made is returned after one dict lookup; when the automatic order of
    ``op`` on this device type has no ``triton``, the choice does not depend on
    ``TRITON_INTERPRET`` and that variable is not read. Anything else (an explicit backend, a
    first call) goes through :func:`resolve` and raises as it does.
    """
    if backend is None:
        backend = _step_backend(op)
    if backend is None or backend == "auto":
        env = _env.get("FIMFAST_BACKEND")
        if env is None or env == "auto":
            fn = _AUTO_BOUND.get((op, device.type))
            if fn is not None and _AUTO_CHOICE:  # (cleared together with _AUTO_CHOICE)
                return fn
            choice = _AUTO_CHOICE.get((op, device.type, _triton_interpret()))
            if choice is None:
                choice = resolve(op, None, device)
            if "triton" not in _auto_order(op, device):
                _AUTO_BOUND[(op, device.type)] = choice[1]
            return choice[1]
    return resolve(op, backend, device)[1]


# (op, device type) -> the automatic choice, for the orders without triton (see bound)
_AUTO_BOUND: dict[tuple[str, str], Callable] = {}

# the backend option of the estimator whose step runs in this thread (see step_backend)
_STEP = threading.local()


def current_step_backend() -> str | None:
    """The ``backend`` option of the step running in this thread (set by :class:`step_backend`),
    ``None`` outside a step or where the step set none."""
    return getattr(_STEP, "backend", None)


def _step_backend(op: str) -> str | None:
    """The running step's ``backend`` option where ``op`` implements it, else ``None``."""
    b = current_step_backend()
    return b if b is not None and b in _IMPLS[op] else None


class step_backend:  # a context manager, named as the function it is used as
    """``with step_backend(backend):`` the ops called without a backend of their own take
    ``backend`` (an estimator's ``backend`` option) where they implement it, the automatic
    choice (``FIMFAST_BACKEND``, then the order of :func:`resolve`) otherwise: ``backend="torch"``
    runs every op's reference, ``"cpp"`` every op the extension has. ``None`` or ``"auto"``:
    nothing changes. Nested steps restore the outer one's."""

    __slots__ = ("backend", "saved")

    def __init__(self, backend: str | None) -> None:
        self.backend = None if backend == "auto" else backend

    def __enter__(self) -> None:
        self.saved = current_step_backend()
        _STEP.backend = self.backend

    def __exit__(self, *exc) -> None:
        _STEP.backend = self.saved


def _auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    """The backends tried, in order, for the automatic choice of ``op`` on ``device``."""
    return _AUTO_CUDA if device.type == "cuda" else _AUTO_CPU.get(op, ("torch",))


def _auto(op: str, impls: dict[str, str], device: torch.device) -> tuple[str, Callable]:
    for name in _auto_order(op, device):
        if name in impls and backend_status(name, device)[0]:
            try:
                return name, _load(impls[name])
            except Exception:  # a backend whose module fails to import is skipped
                continue
    return "torch", _load(impls["torch"])


def check_backend(backend: str | None, device: torch.device | None = None) -> None:
    """Raise early (naming ``backend``) when an explicit backend cannot run at all here."""
    if backend in (None, "auto"):
        return
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}; got {backend!r}")
    ok, why = backend_status(backend, device)
    if not ok:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {why}")


def available_backends(device: torch.device | str | None = None) -> dict[str, dict]:
    """Status of every backend on ``device`` (CPU by default).

    Returns:
        ``{backend: {"available": bool, "reason": str, "ops": [ops it implements]}}``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = {}
    for b in BACKENDS:
        ok, why = backend_status(b, dev)
        out[b] = {
            "available": ok,
            "reason": why,
            "ops": sorted(op for op, impls in _IMPLS.items() if b in impls),
        }
    return out
