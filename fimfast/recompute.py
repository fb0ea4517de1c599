"""Rules that rewrite a module's forward, inside non-reentrant ``torch.utils.checkpoint`` segments.

A non-reentrant checkpoint keeps no activations of its segment: each backward through it runs
the segment again (the *recomputation*) and hands autograd the tensors that run saves, matched
to the first forward's by their order. A rule that replaces a module's forward by other
operations (``nn.MultiheadAttention``'s tapped projections, :mod:`fimfast.rules.attention`; the
recurrent layers' unrolled cells) makes the first forward save other tensors than torch's own
forward saves; the recomputation runs after the capture is gone, with torch's forward, and would
hand autograd tensors that do not belong to the graph (torch's count and shape check catches
most of them, and ``determinism_check="none"`` none).

:func:`follow` makes such a call consistent: it finds the checkpoint frames of the segments the
call runs in (the innermost from the saved-tensor hooks, every enclosing one from the
``torch.utils.checkpoint.checkpoint`` calls on the Python stack), and wraps each frame's
``recompute_fn`` so that every recomputation of the segment, whenever it comes, runs the
module's rewritten forward again, with the decisions of the first forward and no capture: a
:class:`Shadow` stands in for it, which taps nothing and records nothing (the recomputation
neither adds a call to the step nor hands it tensors). Torch's RNG and autocast replays apply
to the rewritten forward as to any other operation of the segment.

Where the hooks are not torch's checkpoint's (activation offloading, a library's own
checkpoint, a torch whose checkpoint module is laid out otherwise) :func:`follow` says no, and
the module runs torch's forward: its parameters take the generic path, exact.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as _ckpt

from fimfast.hooks import saved_tensor_hooks_active

_FILE = _ckpt.__file__
_FRAME = getattr(_ckpt, "_CheckpointFrame", None)
_MISSING = object()


class Shadow:
    """What a rule's rewritten forward reads of a capture, for a recomputation: active, the
    same parameter set and column count as the capture of the first forward; its taps are the
    outputs themselves and its records go nowhere."""

    active = True

    def __init__(self, cap: Any):
        self.param_ids = cap.param_ids
        self.derived = None
        self.columns = getattr(cap, "columns", 1)
        self.memo: dict = {}

    def tap(self, y: torch.Tensor, lead: int, key: Any, batch_first: bool = False):
        return None, y

    def record(self, *args: Any, **kwargs: Any) -> None:
        return None

    def uses_of(self, module, rule, tensors, build):
        return build(), None, None


def replaying(cap: Any) -> bool:
    """Whether ``cap`` is the :class:`Shadow` of a recomputation."""
    return isinstance(cap, Shadow)


def _top_frame() -> Any:
    """The checkpoint frame whose forward the current saved-tensor hooks belong to, or
    ``None`` (no hooks, another kind of hooks, or a recomputation's own)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None or _FRAME is None:
        return None
    pack = hooks[0]
    code = getattr(pack, "__code__", None)
    if (
        code is None or code.co_filename != _FILE or "frame" not in code.co_freevars
        or not getattr(pack, "__qualname__", "").startswith("_checkpoint_hook.")
    ):
        return None
    frame = pack.__closure__[code.co_freevars.index("frame")].cell_contents
    return frame if isinstance(frame, _FRAME) else None


def _enclosing() -> list[Any]:
    """The frames of the non-reentrant ``checkpoint`` calls on the Python stack, innermost
    first."""
    out = []
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code.co_name == "checkpoint" and code.co_filename == _FILE:
            gen = f.f_locals.get("gen")
            gf = getattr(gen, "gi_frame", None)
            frame = None if gf is None else gf.f_locals.get("new_frame")
            if isinstance(frame, _FRAME):
                out.append(frame)
        f = f.f_back
    return out


class _Replays:
    """A frame's ``recompute_fn``, run with the registered modules' rewritten forwards set on
    them (and their own put back after, also when the recomputation stops early)."""

    def __init__(self, fn):
        self.fn = fn
        self.mods: dict[int, tuple[torch.nn.Module, Any]] = {}

    def __call__(self, *args: Any) -> Any:
        saved = []
        try:
            for m, fwd in self.mods.values():
                saved.append((m, m.__dict__.get("forward", _MISSING)))
                m.forward = fwd
            return self.fn(*args)
        finally:
            for m, old in reversed(saved):
                if old is _MISSING:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = old


def follow(module: torch.nn.Module, cap: Any, forward) -> bool:
    """Under saved-tensor hooks: whether a call of ``module`` may run its rule's rewritten
    forward. ``forward(shadow)`` gives that forward for a :class:`Shadow` (a function of the
    module's call arguments); it is set on ``module`` for every recomputation of the checkpoint
    segments enclosing the call. ``False`` (torch's forward) where the hooks are not a
    non-reentrant checkpoint's forward, or in a backward run inside the forward; a call that
    is itself a recomputation (``cap`` a :class:`Shadow`) replays whatever it finds."""
    shadow = replaying(cap)
    top = _top_frame()
    if top is None:
        return shadow  # the recomputation's own hooks, or not a checkpoint's
    if not shadow and torch._C._current_graph_task_id() != -1:
        return False
    frames = _enclosing()
    if not frames or frames[0] is not top:
        return shadow
    if not shadow:
        cap = getattr(cap, "shadow", None) or _shadow_of(cap)
    fwd = forward(cap)
    for frame in frames:
        r = frame.recompute_fn
        if not isinstance(r, _Replays):
            r = frame.recompute_fn = _Replays(r)
        r.mods[id(module)] = (module, fwd)
    return True


def _shadow_of(cap: Any) -> Shadow:
    s = cap.shadow = Shadow(cap)
    return s


def hooked() -> bool:
    """Whether the forward runs under saved-tensor hooks, outside a ``torch.compile`` trace
    (which traces the functional capture's mode: ``is_compiling`` first, a constant there)."""
    return not torch.compiler.is_compiling() and saved_tensor_hooks_active()


_SAME: dict = {}  # the functional handlers that run a call's own operations (filled once)


def functional(mode: Any, func, args: tuple, kwargs: dict) -> Any:
    """A call that :class:`fimfast.functional.FunctionalMode` sees under saved-tensor hooks
    (a non-reentrant checkpoint's forward, whose recomputation runs without the capture): only
    ``F.linear``'s, the convolutions' and the views' handlers record it, whose operations are
    the call's own, the weight the parameter or a view of it made again (a view op saves
    nothing), with weights that are functions of a parameter (``W * mask``, computed weights)
    left as they are; in a forward, not a recomputation. Any other call runs as it is, and its
    parameters take the generic path."""
    if not _SAME:
        from fimfast import functional as fn  # it imports this module

        _SAME.update(dict.fromkeys(fn._TRANSPOSES | fn._RESHAPES, fn._view))
        _SAME.update({F.linear: fn._linear, torch.conv1d: fn._conv, torch.conv2d: fn._conv,
                      torch.conv3d: fn._conv})
    handler = _SAME.get(func)
    if (
        handler is None or torch.compiler.is_compiling() or not mode.cap.active
        or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1
    ):
        return func(*args, **kwargs)
    views = mode.views  # the views of parameters only: no function of one is made again
    mode.views = {k: v for k, v in views.items() if v[4] is None}
    try:
        return handler(mode, func, args, kwargs)
    finally:
        views.update(mode.views)
        mode.views = views
