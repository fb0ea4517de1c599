"""The streamed backward of the fast path: squares formed while the backward of a chunk runs.

A batched backward that returns every tap's gradient (:func:`fimfast.persample.generic.
_batched_grads`) holds all of them until it ends: ``M`` columns of every layer output at once. Here
a hook on every tap receives its gradient as soon as the backward reaches it; once every tap of a
call has its gradient, the groups whose calls are all complete are squared and the gradients of
calls no other group waits for are dropped, so only the layers between two completions hold their
column gradients at once.

Several columns run in one backward batched by ``is_grads_batched`` (torch's batching of the
backward, ``torch._vmap_internals``): inside it a tap's hook sees one column's gradient, a
batched tensor whose ``M`` physical columns :func:`unbatch` reads (``torch._remove_batch_dim`` at
the batching level of the call, :func:`batched_grads`). :func:`batched_hooks_work` checks once
per process that this gives the gradients a plain batched backward returns; where it does not,
the engine does not stream chunks of several columns.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch

try:  # the engine call of torch.autograd.grad and torch._vmap_internals' batching
    from torch.autograd.graph import _engine_run_backward as _run_backward

    _RAW = all(hasattr(torch, n) for n in ("_add_batch_dim", "_remove_batch_dim")) and hasattr(
        torch._C, "_vmapmode_increment_nesting"
    )
except ImportError:  # pragma: no cover - other torch versions: autograd.grad itself
    _RAW = False


class Unbatched(RuntimeError):
    """A batched backward with hooks failed: the step runs again without streaming batches."""


def batched_grads(flat: torch.Tensor, inputs: list, cot: torch.Tensor, retain: bool,
                  on_level: Callable[[int], None] | None = None) -> list:
    """``torch.autograd.grad(flat, inputs, cot, is_grads_batched=True, allow_unused=True)``
    without its Python wrappers (argument checks and tree handling: about 0.1 ms a call, as
    much as the whole backward of a small layer): the columns ``cot`` (``(M, R, C)``, the shape
    and dtype of ``flat``, as the engine forms them) batched at a new level of
    ``torch._vmap_internals``' batching (told to ``on_level`` before the backward runs), the
    engine run once, the gradients unbatched (``None`` where an input is unused)."""
    M = cot.shape[0]
    if not _RAW:  # pragma: no cover - no hooks can be unbatched either (batched_hooks_work)
        return list(torch.autograd.grad(flat, inputs, cot, retain_graph=retain,
                                        allow_unused=True, is_grads_batched=True))
    level = torch._C._vmapmode_increment_nesting()
    try:
        if on_level is not None:
            on_level(level)
        grads = _run_backward(
            (flat,), (torch._add_batch_dim(cot, 0, level),), retain, False, tuple(inputs), True,
            False,
        )
        return [None if g is None else torch._remove_batch_dim(g, level, M, 0) for g in grads]
    finally:
        torch._C._vmapmode_decrement_nesting()


def unbatch(g: torch.Tensor, level: int | None, M: int) -> torch.Tensor:
    """The ``(M, ...)`` columns of a tap gradient seen by a hook (``level`` ``None``: one column,
    not batched)."""
    if level is None:
        return g.unsqueeze(0)
    return torch._remove_batch_dim(g, level, M, 0)


def backward(flat: torch.Tensor, handles: list, cot: torch.Tensor, retain: bool,
             on_grad: Callable) -> None:
    """The backward of the columns ``cot`` (``(M, R, C)``) from ``flat``, hooks on ``handles``:
    ``on_grad(k, g)`` receives the ``(M, ...)`` gradient at ``handles[k]`` as it arrives, and
    returns what the hook returns (``None``, or a replacement gradient). ``M > 1`` batches the
    columns in one backward (the graph is retained: a caller may run it again); its failure
    raises :class:`Unbatched`, the squares of that backward then partly added."""
    M = cot.shape[0]
    level: list[int | None] = [None]

    def hook_for(k):
        def hook(g: torch.Tensor):
            return on_grad(k, unbatch(g, level[0], M))

        return hook

    removers = [h.register_hook(hook_for(k)) for k, h in enumerate(handles)]
    try:
        if not handles:
            return
        if M == 1:
            torch.autograd.grad(flat, handles, grad_outputs=cot[0], retain_graph=retain,
                                allow_unused=True)
        else:
            try:
                batched_grads(flat, handles, cot, True, lambda lv: level.__setitem__(0, lv))
            except RuntimeError as e:  # an operator torch cannot batch, say
                raise Unbatched(str(e)) from e
    finally:
        for r in removers:
            r.remove()


@functools.cache
def batched_hooks_work() -> bool:
    """Whether hooks inside a batched backward see the gradients a batched backward returns
    (checked once, on a two-layer graph with a shared weight and an elementwise op)."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(3, 4, generator=g, requires_grad=True)
        x = torch.randn(5, 3, generator=g)
        h = x @ w
        z = torch.tanh(h) @ w.t()
        cot = torch.randn(2, 5, 3, generator=g)
        seen: dict[int, torch.Tensor] = {}

        def keep(k, gk):
            seen[k] = gk.clone()

        backward(z, [h], cot, True, keep)
        (want,) = torch.autograd.grad(z, [h], cot, is_grads_batched=True)
        return 0 in seen and seen[0].shape == want.shape and torch.equal(seen[0], want)
    except Exception:  # noqa: BLE001 - any failure: do not stream batched chunks
        return False


def stream(rows, calls, groups, cot, retain: bool, head, squares: Callable,
           head_grad: Callable) -> None:
    """The backward of the chunk ``cot`` (``(M, R, C)``) with the squares of ``groups`` formed
    as the gradients arrive (``squares(ready, gmap)``, :func:`fimfast.persample.engine._chunk`).

    The hook of an add tap (:meth:`fimfast.hooks.Capture.tap`) hands the engine a zero of no
    storage in place of its gradient, which flows nowhere else; a direct tap's gradient is the
    layer output's and flows on, so the backward keeps it to the end. Groups with a gradient that
    never arrives are squared after the backward, as with ``None``."""
    gmap: dict[int, torch.Tensor | None] = {}
    waiting = {id(c): len(c.taps) for c in calls}
    users: Counter = Counter(id(c) for g in groups for c, _ in g.members)
    if head is not None:
        gmap[id(head.taps[0].handle)] = head_grad(rows, cot)
        waiting[id(head)] = 0
    # per group, how many of its calls still wait for a gradient; a call's completion readies
    # the groups it was the last of (no scan of every group per completion)
    left: list[int] = []
    of_call: dict[int, list[int]] = {}
    for gi, g in enumerate(groups):
        ids = {id(c) for c, _ in g.members if waiting.get(id(c), 0) > 0}
        left.append(len(ids))
        for i in ids:
            of_call.setdefault(i, []).append(gi)
    ready = [gi for gi, n in enumerate(left) if n == 0]  # squared at the first completion
    done = [False] * len(groups)

    def flush(final: bool = False) -> None:
        idx = [gi for gi in range(len(groups)) if not done[gi]] if final else sorted(ready)
        ready.clear()
        if not idx:
            return
        for gi in idx:
            done[gi] = True
        now = [groups[gi] for gi in idx]
        squares(now, gmap)
        for g in now:
            for c, _ in g.members:
                users[id(c)] -= 1
                if users[id(c)] == 0:
                    for t in c.taps:
                        gmap.pop(id(t.handle), None)

    owners = [(t, c) for c in calls for t in c.taps]

    def on_grad(k: int, g: torch.Tensor):
        t, c = owners[k]
        gmap[id(t.handle)] = g
        waiting[id(c)] -= 1
        if waiting[id(c)] == 0:
            for gi in of_call.get(id(c), ()):
                left[gi] -= 1
                if left[gi] == 0:
                    ready.append(gi)
            flush()
        if not t.direct:
            return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape[1:])
        return None

    backward(rows.flat, [t.handle for t, _ in owners], cot, retain, on_grad)
    flush(final=True)
