"""What a backward asks of a rule's own autograd node (:mod:`fimfast.rules.conv_node`,
:mod:`fimfast.rules.attention_node`, :mod:`fimfast.rules.recurrent_scan`): the engine's backward
to the taps wants no weight gradient, a training backward does, and a node skips the products
nobody reads; a node unwraps the columns of a batched gradient at their level."""

from __future__ import annotations

import torch

_is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def input_wanted(ctx, i: int, first: int) -> bool:
    """Whether this backward wants the gradient of input ``i`` of the node's ``apply``, whose
    tensor inputs (the graph's edges, ``ctx.next_functions``) start at argument ``first``.

    True when torch cannot tell (a backward outside the engine's knowledge), so that nothing
    asked for is ever left out."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i - first][0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # not in a backward this torch can tell about
        return True


def batch_level(g: torch.Tensor) -> int | None:
    """The batching level of ``g`` if it is batched once, at the innermost level of
    ``torch._vmap_internals`` open on this thread; else ``None`` (not batched, or not in a way
    that a node unwraps: then torch's own backward runs)."""
    if not _is_batched(g):
        return None
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    if level < 1:  # a backward on another thread than the one that batched it
        return None
    if _is_batched(torch._remove_batch_dim(g, level, 1, 0)):  # another level, or several
        return None
    return level
