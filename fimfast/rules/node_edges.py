"""What a backward asks of a rule's own autograd node (:mod:`fimfast.rules.conv_node`,
:mod:`fimfast.rules.recurrent_scan`): the engine's backward to the taps wants no weight
gradient, a training backward does, and a node skips the products nobody reads."""

from __future__ import annotations

import torch


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
