"""How the trainable parameters of the Kronecker layers reach the logits, checked on every batch
(:func:`fimfast.structured.capture.check_calls`, :func:`fimfast.structured.engine._kron_sums`).

The Kronecker and quasi-diagonal representations build a layer's block from its calls: the
input of each call and the gradient at its output. That is the layer's whole gradient only when
its parameters reach the logits through those calls and nowhere else:

* every call's output reaches the logits (:func:`check_reached`): a call whose output is
  detached or computed under ``torch.no_grad()`` would put its inputs into the factors with no
  gradient, and next to a functional use of the weight (``F.linear(x, m.weight, m.bias)``) it
  made the count of the weight's uses equal its calls (the quasi-diagonal off by 0.18);
* the weight is used by the calls only (its edges into the autograd graph counted against the
  calls, in ``check_calls``), and so is the bias (:func:`check_bias_uses`: a bias also added
  elsewhere, ``h + m.bias``, left the quasi-diagonal off by 0.64 of its largest entry).
"""

from __future__ import annotations

from typing import Any

import torch


def unreached(layer: Any) -> str:
    """The refusal of a layer with a call whose output does not reach the logits."""
    return (f"a call of module {layer.name!r} ({type(layer.module).__name__}) does not reach "
            "the logits (its output detached, or computed under torch.no_grad()): the Kronecker "
            "and quasi-diagonal representations take a layer's weight to reach the logits "
            "through its calls only, so such a call's inputs would enter its factors and another "
            "use of its weight would be left out; freeze the module, or use "
            "representation='dense', 'block_diag', 'low_rank' or 'diag'")


def check_reached(layers: list, grads: list, where: dict) -> None:
    """Refuse, naming the module, a layer with a call whose output the gradient of the logits
    does not reach (``grads``: the first backward's, ``None`` for a tap not in the graph of the
    logits, whatever the cotangents). ``check_calls`` compared the uses of each weight with its
    calls; a detached call next to a functional use (``F.linear(x, m.weight)``) has as many of
    both."""
    for layer in layers:
        if any(grads[where[id(z)]] is None for _, z, _ in layer.calls):
            raise ValueError(unreached(layer))


def bias_params(layers: list) -> list[torch.Tensor]:
    """The bias tensor of each layer that has one (an attention's shared ``in_proj_bias``
    once per projection)."""
    rel = {"": "bias", "out": "out_proj.bias"}  # attention's q, k, v: "in_proj_bias"
    return [layer.module.get_parameter(rel.get(layer.part, "in_proj_bias")) for layer in layers
            if layer.bias is not None]


def check_bias_uses(layers: list, biases: list[torch.Tensor], edges) -> None:
    """Refuse, naming the module, a layer whose bias reaches the logits through another number
    of uses than its weight (each call uses both once; an attention's packed projections slice
    both once per call): a bias also used outside the module's forward."""
    it = iter(biases)
    for layer in layers:
        if layer.bias is None:
            continue
        b = next(it)
        nb, nw = edges.get(id(b), 0), edges.get(id(layer.param), 0)
        if nb != nw:
            raise ValueError(
                f"the bias of module {layer.name!r} reaches the logits through {nb} uses but its "
                f"weight through {nw} (the module's calls): the bias is also used outside its "
                "forward, which the Kronecker and quasi-diagonal representations cannot "
                "represent; use representation='dense', 'block_diag', 'low_rank' or 'diag'")
