"""A BatchNorm that normalises with its running statistics (eval mode) as one autograd node whose
input gradient takes a batch of backward columns in one product.

The engine's batched backward (``autograd.grad(..., is_grads_batched=True)``, batched by
``torch._vmap_internals``) has no batching rule for ``native_batch_norm_backward``: it runs the op
once per column and stacks the results (one more pass over the columns' gradients). With
running statistics the layer is a per-channel affine map, ``y = (x - mean) * s + b`` with
``s = weight / sqrt(var + eps)``, so its input gradient is ``g * s`` for any number of columns:
one multiply, which the batching handles as it is. Measured on the CPU (1 thread, 9 columns of
16 samples, ``BatchNorm2d(16)`` on 16 x 16 inputs): 0.58 ms batched by the per-column loop,
0.31 ms folded (median CPU time of interleaved runs).

:func:`fold` replaces the output of a call (torch's ``NativeBatchNormBackward0`` node in eval
mode: the input, weight, running variance and ``eps`` are read from it, so the node computes what
the call did) by :class:`Node`, with the same values. Its backward is torch's
``native_batch_norm_backward`` for a gradient that is not batched (a training backward, one
column) and wherever the weight's or bias's gradient is wanted; the product for a batched
gradient to the input only (the engine's backward to the taps).
"""

from __future__ import annotations

import torch

from fimfast.rules.node_edges import input_wanted

_is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def fold(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y`` (the output of an eval-mode batch norm of ``x``, ``bias`` its bias or ``None``) as
    the output of a :class:`Node`, or ``y`` itself where that does not apply: no batching in this
    torch, ``x`` without a gradient, an output that is not ``native_batch_norm`` of ``x`` itself
    with running statistics, a weight or statistics of another dtype, autocast."""
    node = y.grad_fn
    if (
        _is_batched is None or not x.requires_grad or node is None
        or node.name() != "NativeBatchNormBackward0" or node._saved_training
        or node._saved_input is not x or torch.is_autocast_enabled(y.device.type)
    ):
        return y
    w, mean, var = node._saved_weight, node._saved_running_mean, node._saved_running_var
    if mean is None or var is None or any(
        t is not None and t.dtype != x.dtype for t in (w, mean, var, bias)
    ):
        return y
    # copies: the running statistics may change before the backward runs
    stats = (mean.detach().clone(), var.detach().clone(), float(node._saved_eps))
    return Node.apply([y.detach()], stats, x, w, bias)


class Node(torch.autograd.Function):
    """``apply([y], (mean, var, eps), x, w, b)``: ``y`` (``native_batch_norm`` of ``x`` with the
    running statistics ``mean``, ``var``, weight ``w`` and bias ``b``, either ``None``, computed
    already) as a node whose backward multiplies a batched input gradient by the per-channel
    scale (see the module docstring). ``y`` comes in a list, not as an input: an output that is
    an input is a view, and a view may not be modified in place (``nn.ReLU(inplace=True)``
    after the layer)."""

    @staticmethod
    def forward(ctx, box, stats, x, w, b):
        ctx.stats = stats
        ctx.save_for_backward(x, w)
        return box[0]

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        mean, var, eps = ctx.stats
        want = [ctx.needs_input_grad[2], input_wanted(ctx, 3, 2), input_wanted(ctx, 4, 2)]
        if not want[0] or want[1] or want[2] or not _is_batched(g):
            # a training backward, one column, or a backward to the parameters: torch's own
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, x, w, mean, var, None, None, False, eps, want)
            return None, None, gx, gw if want[1] else None, gb if want[2] else None
        if not hasattr(ctx, "scale"):  # formed once for the step's chunks
            s = torch.rsqrt(var + eps)
            ctx.scale = (s if w is None else s * w).view(-1, *([1] * (x.dim() - 2)))
        return None, None, g * ctx.scale, None, None
