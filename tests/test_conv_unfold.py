"""The windows of a convolution's kernel formed by the extension in one pass (``unfold_windows``
of csrc/cpu/unfold_windows.cpp, :func:`fimfast.rules.windows.host_unfold`): equal, element for
element, to the strided view of the input padded by ``F.pad`` that the torch path copies
(fimfast/rules/windows.py, ``_unfold_view``), for every dim count, kernel, stride, dilation,
padding, window count and input layout; and the transposed convolutions' unfolded output
gradient (fimfast/rules/conv.py, ``_unfold_output_grad``) equal with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_conv_transpose_phases import NAMES, _module

from fimfast.rules import conv, windows

HOST = windows.host_unfold(torch.zeros(1, 1, 3), (1,), (1,), (1,), (0,), (3,)) is not None
needs_ext = pytest.mark.skipif(not HOST, reason="the extension (fimfast._C) has no unfold_windows")

# (input shape, kernel, dilation, stride, padding, windows kept: None = all)
CASES = {
    "1d_s2_p1": ((3, 4, 11), (4,), (1,), (2,), (1,), None),
    "1d_d2_p3_fewer": ((2, 3, 9), (3,), (2,), (1,), (3,), (5,)),
    "1d_pad_past_windows": ((2, 2, 4), (3,), (1,), (3,), (4,), None),
    "1d_lead3": ((2, 3, 2, 10), (2,), (3,), (2,), (0,), None),
    "2d_s2_p1": ((2, 3, 7, 6), (4, 3), (1, 1), (2, 1), (1, 1), None),
    "2d_d2_s3": ((2, 2, 9, 8), (2, 3), (2, 1), (3, 2), (0, 2), (3, 4)),
    "3d_mixed": ((2, 2, 5, 6, 4), (3, 2, 2), (1, 2, 1), (1, 2, 2), (1, 0, 1), None),
    "3d_k1": ((1, 3, 3, 4, 5), (1, 1, 1), (1, 1, 1), (2, 1, 3), (0, 0, 0), None),
}


def _full(shape, k, d, s, p):
    return [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
            for n, kk, dd, ss, pp in zip(shape[-len(k):], k, d, s, p)]


def _reference(x, k, d, s, p, size):
    """``(*lead, *k, *size)``: the strided view of the padded input, copied."""
    n = len(k)
    lead = x.shape[:-n]
    flat = x.reshape(-1, 1, *x.shape[-n:])
    xp = F.pad(flat, [q for pp in reversed(p) for q in (pp, pp)])
    v = windows._unfold_view(xp, k, d, s, size)  # (B, 1, *k, *L)
    return v.reshape(*lead, *v.shape[2:]).contiguous()


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_host_windows_equal_the_strided_view(name, dtype, layout):
    shape, k, d, s, p, size = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "strided":  # every other element of the last spatial dim
        x = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64).to(dtype)[..., ::2]
    size = _full(shape, k, d, s, p) if size is None else list(size)
    got = windows.host_unfold(x, k, d, s, p, size)
    ref = _reference(x, k, d, s, p, size)
    assert got.is_contiguous() and got.dtype == dtype
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


@needs_ext
def test_host_windows_of_a_transposed_lead():
    """Leading dims in any order of strides (the output gradient ``(M, N, ...)`` read as ``(N, g,
    M, ...)``, no copy first)."""
    torch.manual_seed(0)
    G = torch.randn(3, 4, 2, 5, 12, dtype=torch.float64)  # (M, N, g, O/g, L)
    x = G.permute(1, 2, 0, 3, 4)
    got = windows.host_unfold(x, (4,), (1,), (2,), (1,), (6,))
    assert torch.equal(got, _reference(x, (4,), (1,), (2,), (1,), [6]))


def test_host_windows_leave_graphs_and_other_tensors_to_torch():
    """A tensor whose copy autograd must record, an integer or a meta tensor: the torch path
    (``None``)."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert windows.host_unfold(x, (3,), (1,), (1,), (1,), (8,)) is None
    with torch.no_grad():
        assert (windows.host_unfold(x, (3,), (1,), (1,), (1,), (8,)) is not None) == HOST
    assert windows.host_unfold(torch.ones(2, 3, 8, dtype=torch.int64), (3,), (1,), (1,), (0,),
                               (6,)) is None
    assert windows.host_unfold(torch.empty(2, 3, 8, device="meta"), (3,), (1,), (1,), (0,),
                               (6,)) is None


@needs_ext
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_output_grad_unfolded_equal_without_the_extension(name, M, monkeypatch):
    monkeypatch.setattr(conv, "HOST_DIMS", (1, 2, 3))  # the extension for every dim count
    m, x = _module(name)
    torch.manual_seed(1)
    G = torch.randn(M, *m(x).shape, dtype=torch.float64)
    got = conv._unfold_output_grad(m, G, x.shape[2:])
    monkeypatch.setattr(windows, "_HOST", [None])
    ref = conv._unfold_output_grad(m, G, x.shape[2:])
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


@needs_ext
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_patches_equal_without_the_extension(dims, padded, monkeypatch):
    """A convolution's patches (with the extension for every dim count), zero padding uneven as
    ``padding="same"`` pads it, written with the windows."""
    monkeypatch.setattr(windows, "HOST_DIMS", (1, 2, 3))
    torch.manual_seed(0)
    x = torch.randn(3, 4, *(7, 9, 5)[:dims], dtype=torch.float64)
    k, d, s = (3, 2, 2)[:dims], (2, 1, 1)[:dims], (1, 3, 2)[:dims]
    pad = [0, 1, 2, 1, 1, 0][: 2 * dims] if padded else None
    got = windows._unfold(x, k, d, s, pad=pad)
    monkeypatch.setattr(windows, "_HOST", [None])
    ref = windows._unfold(x, k, d, s, pad=pad)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


@needs_ext
@pytest.mark.parametrize("dims", [2, 3])
def test_strided_patches_by_the_extension(dims, monkeypatch):
    """With a stride above 1 the patches of every dim count are the extension's (faster than
    torch's copy, which computes an index per element), equal to torch's."""
    windows.host_unfold(torch.zeros(1, 1, 3), (1,), (1,), (1,), (0,), (3,))  # looked up
    seen = []
    fn = windows._HOST[0]
    monkeypatch.setattr(windows, "_HOST", [lambda *a: seen.append(1) or fn(*a)])
    x = torch.randn(3, 4, *(8, 9, 6)[:dims], dtype=torch.float64)
    k, s = (3, 3, 2)[:dims], (2, 1, 2)[:dims]
    got = windows._unfold(x, k, (1,) * dims, s, pad=[1] * (2 * dims))
    assert seen
    monkeypatch.setattr(windows, "_HOST", [None])
    assert torch.equal(got, windows._unfold(x, k, (1,) * dims, s, pad=[1] * (2 * dims)))
