"""Per-sample squares of a grouped (or depthwise) convolution's weight without unfolded patches.

A convolution of ``g`` groups applied to ``N`` samples is one convolution of ``N g`` groups
applied to the samples side by side as channels (input ``(1, N I, *spatial)``): the gradient of
that convolution's weight, ``(N O, I/g, *kernel)``, is the per-sample gradient of the layer's
weight, which torch's convolution backward forms without the ``prod(kernel)``-times larger
unfolded input. One such backward per column of output gradients; the squares add up over
columns and samples (docs/math.md §4, "Grouped convolutions").

Measured against the unfolded patches and one product per (sample, group) (1 thread, 16 x 16
inputs, medians of 25 interleaved calls, benchmarks/bench_conv_grouped.py; see
benchmarks/results/conv_persample_2026-12-07b.md), one column: ``Conv2d(16, 16, 3, padding=1,
groups=16)`` 0.32 vs 0.37 ms for 16 samples, 0.59 vs 1.31 ms for 64; ``Conv2d(32, 32, 3,
stride=2, padding=1, groups=32)`` 0.31 vs 0.42 and 0.66 vs 1.57 ms. Slower elsewhere, where
torch's backward of so many groups runs slowly: 4 samples (0.23 vs 0.15 ms), two columns (0.48
vs 0.40 ms), two output channels a group (0.39 vs 0.24 ms), a 5 x 5 kernel (1.80 vs 0.96 ms), a
dilation of 2 (0.81 vs 0.45 ms), ``Conv1d`` (0.21 vs 0.11 ms), ``Conv3d`` (1.91 vs 1.89 ms for 16
samples, 7.3 vs 9.4 ms for 64), grouped convolutions of several input channels a group
(``Conv2d(16, 32, 3, stride=2, groups=4)`` 0.45 vs 0.36 ms). So it serves (:func:`takes`)
depthwise 2-D convolutions of one output channel a group, kernels up to 3 x 3 without dilation,
in steps of :data:`MAX_COLUMNS` column in all (EMPIRICAL, MONTE_CARLO with one draw) of at least
:data:`MIN_SAMPLES` samples; the patches serve everything else. The arithmetic is general
(every dim, stride, dilation, padding mode, groups): the tests run it on all of them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fimfast import chunks
from fimfast.dtypes import compute_dtype
from fimfast.rules.base import Patches

# columns in a whole step (columns of a chunk times chunks) up to which the backward serves
MAX_COLUMNS = 1
# samples from which the backward serves (4 samples: 0.23 vs 0.15 ms for the patches)
MIN_SAMPLES = 16
# per-sample gradients of one column formed at most this many elements at once (by samples)
MAX_ELEMENTS = 1 << 22


class GroupedInput(Patches):
    """The input side of a grouped convolution's weight ``Outer`` whose squares the squares
    (fimfast/persample/squares.py, ``_outer_sq``) form by :meth:`sq`, a backward per column
    (see the module). As a :class:`~fimfast.rules.base.Patches` it unfolds the patches for any
    other consumer (shared weights, pullbacks)."""

    def __init__(self, make, shape, dtype, chunk, module, x: torch.Tensor) -> None:
        super().__init__(make, shape, dtype, chunk)
        from fimfast.rules.conv import input_padding, ntuple  # the rule imports this module

        pad = input_padding(module)
        n = len(module.kernel_size)
        lo, hi = pad[0::2][::-1], pad[1::2][::-1]  # first spatial dim first
        if module.padding_mode != "zeros" or lo != hi:  # padded once, by its mode
            x = F.pad(x, pad, mode=module.padding_mode if module.padding_mode != "zeros"
                      else "constant")
            lo = [0] * n
        self.x, self.pad, self.groups = x.contiguous(), lo, module.groups
        self.kernel = tuple(module.kernel_size)
        self.stride = ntuple(module.stride, n)
        self.dilation = ntuple(module.dilation, n)

    def sq(self, P: torch.Tensor) -> torch.Tensor:
        """``sum_{m,n}`` of the squared per-sample gradients, ``(g, O/g, I/g prod(kernel))``,
        from ``P`` ``(M, N, L, g, O/g)`` (a view of the output gradient ``(M, N, O, *out)``)."""
        M, N, L, g, Og = P.shape
        x = self.x
        I, S = x.shape[1], x.shape[2:]
        G = P.permute(0, 1, 3, 4, 2)  # (M, N, g, O/g, L): the output gradient's own layout
        dt = compute_dtype(P.dtype, x.dtype)
        per = g * Og * (I // g) * math.prod(self.kernel)
        step = max(1, min(N, MAX_ELEMENTS // max(1, per)))
        out = torch.zeros(g, Og, per // (g * Og), dtype=dt, device=x.device)
        for m in range(M):
            for n0 in range(0, N, step):
                n = min(step, N - n0)
                go = G[m, n0 : n0 + n].reshape(1, n * g * Og, *self.out_size(S))
                xi = x[n0 : n0 + n].reshape(1, n * I, *S)
                w = x.new_empty(()).expand(n * g * Og, I // g, *self.kernel)  # its shape
                gw = torch.ops.aten.convolution_backward(
                    go.to(x.dtype), xi, w, None, list(self.stride), list(self.pad),
                    list(self.dilation), False, [0] * len(S), n * g, [False, True, False],
                )[1]
                out.add_(gw.to(dt).view(n, g, Og, -1).square().sum(0))
        return out

    def out_size(self, S) -> list[int]:
        """The output size of the convolution on spatial size ``S`` (after the padding)."""
        return [(L + 2 * p - d * (k - 1) - 1) // s + 1 for L, p, d, k, s in
                zip(S, self.pad, self.dilation, self.kernel, self.stride)]


def grouped_input(module, x: torch.Tensor, patches, L: int, columns: int) -> GroupedInput | None:
    """A :class:`GroupedInput` for ``module`` (``nn.Conv1d/2d/3d``) applied to ``x``, or ``None``
    where the patches serve instead: a module :func:`takes` does not take, more than
    :data:`MAX_COLUMNS` columns in the step, fewer than :data:`MIN_SAMPLES` samples, not a
    float32/float64 CPU tensor (only measured there), or an unbatched input.
    ``patches(x)`` unfolds ``(N, L, g, I/g prod(kernel))``, for other consumers."""
    if (columns > MAX_COLUMNS or x.shape[0] < MIN_SAMPLES or x.device.type != "cpu"
            or not takes(module)
            or x.dtype not in (torch.float32, torch.float64) or x.dim() != module.weight.dim()):
        return None
    g = module.groups
    N, I = x.shape[:2]
    IK = I * math.prod(module.kernel_size)

    def make(a: int, b: int) -> torch.Tensor:
        return patches(x[a:b])

    chunk = chunks.patch_samples(IK * L * x.element_size())
    return GroupedInput(make, (N, L, g, IK // g), x.dtype, chunk, module, x)


def takes(module) -> bool:
    """Whether the backward serves ``module`` (see the module): several groups of one input and
    one output channel each, two spatial dims, a kernel of at most 3 x 3, no dilation."""
    from fimfast.rules.conv import ntuple  # the rule imports this module

    n, g = len(module.kernel_size), module.groups
    return (g > 1 and module.in_channels == g and module.out_channels == g and n == 2
            and max(module.kernel_size) <= 3 and max(ntuple(module.dilation, n)) == 1)
