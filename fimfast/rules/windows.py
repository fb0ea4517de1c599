"""A convolution's input side kept as strided windows instead of unfolded patches.

For a convolution of stride 1 along its first spatial dim, the patches of kernel tap ``j`` of
that dim are a strided view of the input unfolded along the *other* spatial dims only:
position ``l = (l_0, l_1, ...)`` of tap ``j`` reads row ``l_0 + j d_0`` of that dim, so over all
output positions the tap reads one contiguous run of ``L`` elements per (channel, other taps)
row, starting ``j d_0 prod(L_1, ...)`` elements in (docs/math.md §4, "Convolutions as
windows"). Each tap's ``(L, I prod(k_1, ...))`` matrix per sample is then a view that a batched
product takes as it is, and the squares of the weight's per-sample gradients split by tap
(their entries are disjoint): ``sum_n (P_n^T Q_n)^2`` is formed tap by tap
(fimfast/persample/squares.py, ``_outer_sq``), without the patches (``prod(kernel) /
prod(stride)`` times the input) ever existing. What is kept for the step is ``prod(k_1, ...) /
prod(s_1, ...)`` times the input: ``k`` times for a ``k x k`` kernel, against ``k^2`` for the
patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fimfast import _ext
from fimfast.rules.base import Patches

# a convolution's rows per tap (input channels times the taps of the other spatial dims) from
# which the squares read the windows tap by tap: narrower products run below the BLAS's speed
# (CNN (c) of benchmarks/workloads.py, 1 thread: 5 rows 2.8x the time of the product with the
# patches, 80 rows 1.2x, 192 rows 0.95x), so those form their patches by pieces from the windows
WINDOW_ROWS_FROM = 32

# windows above this many bytes are not kept for the step (the rule forms its patches by pieces
# from the input instead, once per chunk of columns): ``k_1 ...`` times a layer's input, summed
# over the convolutions of a deep network, would outgrow the training step's own memory
WINDOWS_KEEP_MAX = 4 << 20


class Windows(Patches):
    """The input side ``(N, L, I * prod(kernel))`` of a convolution of one group and stride 1
    along its first spatial dim, kept as ``A`` ``(N, I prod(k_1, ...), D_0 prod(L_1, ...))``:
    the (padded) input unfolded along the other spatial dims. :meth:`tap` gives kernel tap ``j``
    of the first dim as a strided view; a slice of samples forms their patches (as
    :class:`~fimfast.rules.base.Patches`, one copy of runs of ``L`` elements), for the squares
    of a narrow convolution and the consumers that need them.

    Attributes:
        taps: the kernel size ``k_0`` along the first spatial dim.
        channels: input channels ``I``.
        by_taps: whether the squares read the taps (else the patches by pieces).
    """

    def __init__(self, A: torch.Tensor, channels: int, taps: int, step: int, L: int,
                 chunk: int, by_taps: bool) -> None:
        N, R = A.shape[:2]
        self.A, self.channels, self.taps, self._step, self._L = A, channels, taps, step, L
        self.by_taps = by_taps
        super().__init__(self._patches, (N, L, R * taps), A.dtype, chunk)

    def tap(self, j: int, a: int = 0, b: int | None = None) -> torch.Tensor:
        """``(n, L, I prod(k_1, ...))``: samples ``a:b`` of the patches of tap ``j`` (a view)."""
        A = self.A[a:b]
        return A.as_strided((A.shape[0], self._L, A.shape[1]), (A.stride(0), 1, A.stride(1)),
                            A.storage_offset() + j * self._step)

    def _patches(self, a: int, b: int) -> torch.Tensor:
        A = self.A[a:b]
        n, R = A.shape[:2]
        I, k0 = self.channels, self.taps
        rest = R // I
        # (n, I, k_0, prod(k_1, ...), L): [c, j, r, l] = A[(c, r), j step + l], copied in runs of L
        v = A.as_strided((n, I, k0, rest, self._L),
                         (A.stride(0), rest * A.stride(1), self._step, A.stride(1), 1),
                         A.storage_offset())
        return v.reshape(n, I * k0 * rest, self._L).transpose(1, 2)


def windows(module, x: torch.Tensor, L: int, chunk: int) -> Windows | None:
    """The :class:`Windows` of the input ``x`` ``(N, I, *spatial)`` of ``module``, a convolution
    of one group with ``L`` output positions (``x`` padded as its forward pads it), read tap by
    tap from ``WINDOW_ROWS_FROM`` rows per tap; ``None`` for a stride along the first spatial
    dim or windows of more than ``WINDOWS_KEEP_MAX`` bytes."""
    from fimfast.rules.conv import input_padding, ntuple  # the rule imports this module

    k = tuple(module.kernel_size)
    n = len(k)
    d, s = ntuple(module.dilation, n), ntuple(module.stride, n)
    N, I = x.shape[:2]
    if s[0] != 1:
        return None
    pad = input_padding(module)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    v = x
    for dim in range(1, n):  # (N, I, D_0, L_1, ..., k_1, ...)
        v = v.unfold(2 + dim, (k[dim] - 1) * d[dim] + 1, s[dim])
        if d[dim] > 1:
            v = v[..., :: d[dim]]
    if v.numel() * v.element_size() > WINDOWS_KEEP_MAX:
        return None
    # (N, I, k_1, ..., D_0, L_1, ...), copied once
    A = v.permute(0, 1, *range(2 + n, 1 + 2 * n), *range(2, 2 + n)).contiguous()
    run = math.prod(A.shape[2 + n :])  # prod(L_1, ...): one row of the first dim
    A = A.view(N, I * math.prod(k[1:]), -1)
    if A.shape[2] < (k[0] - 1) * d[0] * run + L:  # pragma: no cover - a stride-1 conv's input
        return None
    by_taps = A.shape[1] >= WINDOW_ROWS_FROM
    return Windows(A, I, k[0], d[0] * run, L, chunk, by_taps)


# the extension's unfold_windows (csrc/cpu/unfold_windows.cpp), looked up at the first call; None
# without it (or with an extension built before it)
_HOST: list = []

# the spatial dims whose windows the rules form by the extension: torch's copy of the strided view
# forms those of 2-D and 3-D kernels as fast or faster, its loops running over rows of the last
# dim (1 thread, 16 samples: a 3 x 3 kernel with padding 1 on 16 x 16 x 16 inputs 354 us by the
# extension, 186 us by F.pad and the copy; ConvTranspose2d(16, 8, 4, stride=2, padding=1)'s output
# gradient 616 and 650 us), a 1-D kernel's at about half the speed (a kernel of 4, stride 2,
# padding 1 on 16 x 8 x 128: 30 and 59 us). With a stride above 1 in any dim, where torch's copy
# computes an index per element, the extension forms those of every dim count
# (:func:`_unfold`; 16 x 16 x 16 x 16, 3 x 3, stride 2: 147 vs 217 us, 64 samples 706 vs 1203;
# 16 x 8 x 8^3, stride 2: 329 vs 500 us; benchmarks/results/conv_persample_2026-12-07b.md)
HOST_DIMS = (1,)


def host_unfold(x: torch.Tensor, k, d, s, p, size) -> torch.Tensor | None:
    """``(*lead, *k, *size)``: the windows of the kernel ``k`` (dilation ``d``, stride ``s``, zero
    padding ``p`` before and after, the first ``size`` windows per spatial dim) over the last
    ``len(k)`` dims of ``x``, contiguous, by the extension in one pass (the padding written with
    the windows, any strides of ``x`` read as they are); ``None`` where the caller's torch path
    runs instead: no extension, a tensor that is not a plain floating CPU tensor, or one whose
    graph the copy would have to record. The rules call it for one spatial dim only
    (:data:`HOST_DIMS`)."""
    if not _HOST:
        _HOST.append(_ext.host_function("unfold_windows"))
    fn = _HOST[0]
    if (fn is None or type(x) is not torch.Tensor or not x.is_cpu or not x.is_floating_point()
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    return fn(x, list(k), list(d), list(s), list(p), list(size))


def _unfold(x: torch.Tensor, k, d, s, size=None, pad=None) -> torch.Tensor:
    """``F.unfold(x, k, dilation=d, stride=s)`` for any number of spatial dims: ``x`` ``(N, I,
    *spatial)`` gives ``(N, I*prod(k), L)``, channel-major like a convolution's weight. ``size``
    keeps the first ``size[i]`` windows along spatial dim ``i`` (default: all); ``pad`` (as
    ``F.pad`` takes it, last dim first) pads ``x`` with zeros first.

    Copied once into that layout by the extension (:func:`host_unfold`, :data:`HOST_DIMS`, or a
    stride above 1), else
    from a strided view (``Tensor.unfold`` per spatial dim, every ``d``-th tap): 2-4x faster than
    ``F.unfold`` on the CPU (64 x 16 x 12 x 12, 5 x 5 kernel: 2.5 vs 5.3 ms), and there is no
    ``F.unfold`` for volumes."""
    N, I = x.shape[:2]
    n = len(k)
    pad = [0] * (2 * n) if pad is None else pad
    lo = [pad[2 * (n - 1 - i)] for i in range(n)]  # before each spatial dim, first dim first
    full = [(L + lo[i] + pad[2 * (n - 1 - i) + 1] - d[i] * (k[i] - 1) - 1) // s[i] + 1
            for i, L in enumerate(x.shape[2:])]
    U = None
    if n in HOST_DIMS or max(s) > 1:  # the padding: zeros written with the windows
        U = host_unfold(x, k, d, s, lo, full if size is None else size)
    if U is None:
        U = _unfold_view(F.pad(x, pad) if any(pad) else x, k, d, s, size)
    return U.reshape(N, I * math.prod(k), -1)


def _unfold_view(x: torch.Tensor, k, d, s, size=None) -> torch.Tensor:
    """The windows of :func:`_unfold` as a strided view ``(N, I, *k, *L)``, no copy."""
    n = len(k)
    v = x
    for dim, (kk, dd, ss) in enumerate(zip(k, d, s)):
        v = v.unfold(2 + dim, (kk - 1) * dd + 1, ss)
        if dd > 1:
            v = v[..., ::dd]
        if size is not None:
            v = v.narrow(2 + dim, 0, size[dim])
    # (N, I, *L, *k) -> (N, I, *k, *L)
    perm = (0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return v.permute(perm)
