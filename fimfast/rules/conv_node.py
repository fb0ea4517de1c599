"""A transposed convolution as one autograd node whose input gradient takes a batch of backward
columns in one convolution.

The engine's batched backward (``autograd.grad(..., is_grads_batched=True)``, batched by
``torch._vmap_internals``) has no batching rule for ``convolution_backward``: it runs the op
once per column and stacks the results. A transposed convolution's input gradient is an ordinary
convolution of the output gradient with the same weight (stride, padding, dilation and groups of
the transposed one), so the columns can go through it as a larger batch: one ``conv2d`` of
``M N`` samples. Measured on the CPU (1 thread, 9 columns of 16 samples, median CPU time):
``ConvTranspose2d(16, 8, 4, stride=2, padding=1)`` on 14 x 14 inputs 3.7 ms batched by vmap,
2.2 ms folded; ``ConvTranspose2d(8, 4, 3, padding=1, groups=2)`` on 28 x 28, 8.8 ms and 4.2 ms.

:func:`fold` replaces the output of a call (torch's ``ConvolutionBackward0`` node: the spec and
tensors are read from it, so the node computes exactly what the call did) by :class:`Node`,
with the same values. Its backward is torch's ``convolution_backward`` for a gradient that is not
batched (a training backward, one column), and for a batched one the folded convolution for the
input and, where the backward wants them (never in the engine's backward to the taps), the
weight's and bias's gradients by torch's per-column loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fimfast.rules.node_edges import batch_level as _level
from fimfast.rules.node_edges import input_wanted

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def fold(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y`` (the output of a transposed convolution of ``x``, ``bias`` its bias or ``None``) as
    the output of a :class:`Node`, or ``y`` itself where that does not apply: no batching to
    unwrap in this torch, ``x`` without a gradient, an output that is not a transposed
    convolution of ``x`` itself (``ConvolutionBackward0`` with ``x`` saved), autocast."""
    node = y.grad_fn
    if (
        _is_batched is None or not x.requires_grad or node is None
        or node.name() != "ConvolutionBackward0" or not node._saved_transposed
        or node._saved_input is not x or torch.is_autocast_enabled(y.device.type)
    ):
        return y
    w = node._saved_weight
    sizes = node._saved_bias_sym_sizes_opt  # (0,) without a bias
    if w.dtype != x.dtype or (bias is not None and tuple(sizes or ()) != tuple(bias.shape)):
        return y
    spec = (tuple(node._saved_stride), tuple(node._saved_padding), tuple(node._saved_dilation),
            tuple(node._saved_output_padding), node._saved_groups)
    return Node.apply([y.detach()], spec, x, w, bias)


class Node(torch.autograd.Function):
    """``apply([y], spec, x, w, b)``: ``y`` (the transposed convolution of ``x`` by ``w``, ``b``
    with ``spec = (stride, padding, dilation, output_padding, groups)``, computed already), as a
    node whose backward folds batched columns into one convolution (see the module
    docstring). ``y`` comes in a list, not as an input: an output that is an input is a view, and
    a view may not be modified in place (``nn.ReLU(inplace=True)`` after the layer)."""

    @staticmethod
    def forward(ctx, box, spec, x, w, b):
        ctx.spec, ctx.bias = spec, None if b is None else b.shape
        ctx.save_for_backward(x, w)
        return box[0]

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, out_pad, groups = ctx.spec
        want = [ctx.needs_input_grad[2], input_wanted(ctx, 3, 2), input_wanted(ctx, 4, 2)]
        level = _level(g) if want[0] else None
        if level is None and (want[1] or want[2] or not want[0] or not single_gain(w, groups)):
            # a training backward, or one column where torch's own input gradient is as fast
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w, ctx.bias, stride, padding, dilation, True, out_pad, groups, want)
            return None, None, gx, gw, gb
        if not hasattr(ctx, "wx"):  # formed once for the step's chunks
            ctx.wx = (_block_diagonal(w, groups), 1) if _dense(w, groups) else (w, groups)
        p = g if level is None else torch._remove_batch_dim(g, level, 1, 0)  # (M, N, O, ...)
        flat = p if level is None else p.flatten(0, 1)
        gx = _CONV[w.dim() - 2](flat, ctx.wx[0], None, stride, padding, dilation, ctx.wx[1])
        if gx.shape[2:] != x.shape[2:]:  # an output padding of a stride or more: longer
            gx = gx[(slice(None), slice(None), *(slice(0, n) for n in x.shape[2:]))]
        if level is None:
            return None, None, gx, None, None
        gx = torch._add_batch_dim(gx.unflatten(0, p.shape[:2]), 0, level)
        gw = gb = None
        if want[1] or want[2]:  # a batched backward to the parameters: torch's loop
            _, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w, ctx.bias, stride, padding, dilation, True, out_pad, groups,
                [False, want[1], want[2]])
        return None, None, gx, gw, gb


def single_gain(w: torch.Tensor, groups: int) -> bool:
    """Whether one column's input gradient too is faster here than by torch's backward: a 2-D or
    3-D layer of groups of few channels (:func:`_dense`; ``ConvTranspose3d(8, 4, 3, groups=2)``
    of the convT3d workload of benchmarks/bench_layers.py: EMPIRICAL 1.26x a training step
    without the node, 1.13x with)."""
    return w.dim() >= 4 and _dense(w, groups)


def _dense(w: torch.Tensor, groups: int) -> bool:
    """Whether the input-gradient convolution runs without groups, on the block-diagonal weight
    (:func:`_block_diagonal`): on the CPU, for groups of few channels. oneDNN runs a grouped
    convolution of 2 to 4 channels per group several times slower than the dense one with
    ``groups`` times the products (``(8, 4, 3 x 3, groups 2)`` on 144 x 4 x 28 x 28: 3.7 ms
    grouped, 1.6 ms dense; on 144 x 4 x 8 x 8 x 8: 10.6 ms and 2.0 ms; 16 x 4 x 28 x 28:
    0.46 and 0.23 ms); from 4 x 8 channels per group on, no faster."""
    return groups > 1 and w.device.type == "cpu" and w.shape[0] // groups * w.shape[1] <= 16


def _block_diagonal(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight ``(I, O/g, *K)`` of a transposed convolution of ``g`` groups as that of one
    group, ``(I, O, *K)``, zero outside the groups' blocks."""
    I, Og = w.shape[:2]
    Ig = I // groups
    dense = w.new_zeros(groups, Ig, groups, Og, *w.shape[2:])
    dense.diagonal(0, 0, 2).copy_(w.view(groups, Ig, Og, *w.shape[2:]).movedim(0, -1))
    return dense.view(I, groups * Og, *w.shape[2:])
