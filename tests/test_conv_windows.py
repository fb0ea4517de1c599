"""A convolution's input side as strided windows of its input (fimfast/rules/windows.py): the
squares of a convolution of stride 1 along its first spatial dim, tap by tap of that dim, from
the input unfolded along the other dims only, kept for a step of several chunks of columns
instead of its patches (fimfast/rules/conv.py, ``ConvRule._input_side``).

The peak is the tensor storage live at once (benchmarks/memory.py, ``TensorPeakMeter``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle, rel_error
from test_layers import ConvHead, _rand, _simple, run
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast import chunks
from fimfast.rules import conv, windows
from fimfast.rules.windows import Windows

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.memory import TensorPeakMeter  # noqa: E402


def _case(name: str):
    torch.manual_seed(0)
    if name == "conv1d_dilation":
        body, x = nn.Conv1d(3, 4, 3, padding=1, dilation=2), _rand(3, 3, 11)
    elif name == "conv2d_stride_second_dilation_first":
        body = nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1))
        x = _rand(3, 3, 7, 8)
    elif name == "conv2d_same_replicate":
        body = nn.Sequential(nn.Conv2d(2, 3, 4, padding="same", padding_mode="replicate"),
                             nn.Tanh(), nn.Conv2d(3, 3, 3, padding="valid"))
        x = _rand(3, 2, 6, 5)
    elif name == "conv2d_n1_pool":
        body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2))
        x = _rand(1, 1, 7, 7)
    else:  # conv3d: stride 2 along the second dim, dilation along the first, circular padding
        body = nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1),
                         padding_mode="circular")
        x = _rand(2, 2, 5, 7, 4)
    return _simple(name, ConvHead(body, x, 4), x, 4)


CASES = ["conv1d_dilation", "conv2d_stride_second_dilation_first", "conv2d_same_replicate",
         "conv2d_n1_pool", "conv3d"]


def _spy(monkeypatch) -> list:
    seen: list = []
    make = conv.ConvRule._input_side

    def spy(self, *a):
        seen.append(make(self, *a))
        return seen[-1]

    monkeypatch.setattr(conv.ConvRule, "_input_side", spy)
    return seen


@pytest.mark.parametrize("by_taps,class_chunk,backend", [
    (True, 1, "auto"), (True, 2, "auto"), (True, 1, "torch"), (False, 1, "auto"),
])
@pytest.mark.parametrize("name", CASES)
def test_windows_match_oracle_f64(monkeypatch, name, by_taps, class_chunk, backend):
    """EXACT (3 columns) by chunks of 1 and of 2 columns (2 + 1), every convolution read as
    windows tap by tap, in float64 against the oracle; also with the torch reference ops, and
    with the patches formed from the windows by pieces of one sample."""
    monkeypatch.setattr(windows, "WINDOW_ROWS_FROM", 1 if by_taps else 10**9)
    monkeypatch.setattr(conv, "PATCHES_LAZY_FROM", 0)
    monkeypatch.setattr(chunks, "PATCH_BYTES", 1)
    seen = _spy(monkeypatch)
    case = _case(name).to(torch.float64)
    got, _ = run(case, "exact", class_chunk=class_chunk, backend=backend)
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    assert seen and all(isinstance(q, Windows) and q.by_taps == by_taps for q in seen)


def _module_input(name: str):
    body = _case(name).model.body
    m = body[0] if isinstance(body, nn.Sequential) else body
    return m, _rand(5, m.in_channels, *([9] * (m.weight.dim() - 2)), seed=3)


@pytest.mark.parametrize("name", ["conv1d_dilation", "conv2d_stride_second_dilation_first",
                                  "conv2d_same_replicate", "conv3d"])
def test_windows_slices_are_the_patches(monkeypatch, name):
    """A slice of samples of the windows forms exactly the rule's unfolded patches; each tap is
    a view of the kept tensor, which is a fraction of the patches."""
    monkeypatch.setattr(windows, "WINDOW_ROWS_FROM", 1)
    m, x = _module_input(name)
    with torch.no_grad():
        L = m(x)[0, 0].numel()
    want = conv.ConvRule()._patches(m, x)[:, :, 0]  # (N, L, I * prod(kernel))
    w = windows.windows(m, x, L, 2)
    assert w is not None and w.shape == want.shape and w.chunk == 2
    assert torch.equal(w[1:4], want[1:4]) and torch.equal(w.full(), want)
    assert w.tap(1).untyped_storage().data_ptr() == w.A.untyped_storage().data_ptr()
    assert w.A.numel() * m.kernel_size[0] <= 2 * want.numel()


def test_windows_by_taps_or_pieces(monkeypatch):
    """A stride along the first spatial dim, or windows over ``WINDOWS_KEEP_MAX`` bytes:
    ``None`` (the rule unfolds its patches by pieces); fewer rows per tap than
    ``WINDOW_ROWS_FROM``: windows whose patches the squares form by pieces."""
    x = torch.randn(2, 16, 9, 9)
    assert windows.WINDOW_ROWS_FROM == 32
    assert windows.windows(nn.Conv2d(16, 4, 3, stride=(2, 1)), x, 4 * 7, 1) is None
    assert windows.windows(nn.Conv2d(16, 4, 3), x, 49, 1).by_taps  # 48 rows per tap
    assert not windows.windows(nn.Conv2d(8, 4, 3), x[:, :8], 49, 1).by_taps  # 24 rows
    # 2 x 48 x 9 x 7 floats: kept up to WINDOWS_KEEP_MAX bytes
    monkeypatch.setattr(windows, "WINDOWS_KEEP_MAX", 4 * 2 * 48 * 9 * 7)
    assert windows.windows(nn.Conv2d(16, 4, 3), x, 49, 1) is not None
    monkeypatch.setattr(windows, "WINDOWS_KEEP_MAX", 4 * 2 * 48 * 9 * 7 - 1)
    assert windows.windows(nn.Conv2d(16, 4, 3), x, 49, 1) is None


def test_cnn_step_within_twice_a_training_step():
    """The CNN of workload (c) (benchmarks/workloads.py), 64 samples, one column per backward:
    its second convolution read as windows tap by tap, its first (5 rows per tap) formed from
    its windows by pieces, so the step stays within twice a training step's peak (1.96x; with
    both layers' patches kept, 2.8x); the estimate is the one of one backward of every
    column."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def peak(fn) -> float:
        for _ in range(2):
            fn()
        m = TensorPeakMeter()
        m.begin()
        fn()
        return m.end()

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    t = peak(train)
    model.zero_grad(set_to_none=True)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")

    def exact():
        est.reset()
        est.step((x, y))

    assert peak(exact) <= 2.0 * t
    inputs = [c.data["Q"] for c in est._persample.last_plan.calls if "Q" in c.data]
    assert [(type(q), q.by_taps) for q in inputs] == [(Windows, False), (Windows, True)]
    one = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=9)
    one.step((x, y))
    assert rel_error(dict(est.result().items()), dict(one.result().items())) <= 1e-5
