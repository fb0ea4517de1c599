"""Convolutions' unfolded input patches are formed a few samples at a time, never held for the
whole batch (fimfast/rules/conv.py, ``ConvRule._input_side``; fimfast/rules/base.py,
``Patches``), and the estimate stays exact.

The peak is the tensor storage live at once (benchmarks/memory.py, ``TensorPeakMeter``).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from largest_alloc import LargestAlloc
from oracle import rel_error
from test_layers import _build, _with_oracle, run
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast import chunks
from fimfast.rules import conv
from fimfast.rules.base import Patches

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.memory import TensorPeakMeter  # noqa: E402

CONVS = ["conv1d", "conv1d_groups_reflect", "conv2d_stride_dilation", "conv2d_depthwise_circular",
         "conv2d_same_replicate", "conv2d_n1"]


def _keep_whole(self, module, x, L, chunks_):
    """The defect: the patches of the whole batch, kept for the step."""
    return self._patches(module, x)


@pytest.mark.parametrize("class_chunk", [None, 1])
@pytest.mark.parametrize("name", CONVS)
def test_patches_one_sample_at_a_time_match_oracle_f64(monkeypatch, name, class_chunk):
    """One sample per piece, with one backward of every column and with one column per backward
    (patches unfolded again per chunk), in float64 against the oracle."""
    monkeypatch.setattr(chunks, "PATCH_BYTES", 1)
    monkeypatch.setattr(conv, "PATCHES_LAZY_FROM", 0)
    seen = []
    make = conv.ConvRule._input_side

    def spy(self, *a):
        out = make(self, *a)
        seen.append(out)
        return out

    monkeypatch.setattr(conv.ConvRule, "_input_side", spy)
    lc, ref = _with_oracle(name, "exact")
    got, _ = run(lc.case.to(torch.float64), "exact", class_chunk=class_chunk)
    assert rel_error(got, ref) <= DET_REL_F64
    assert seen and all(isinstance(q, Patches) and q.chunk == 1 for q in seen)


def test_small_patches_are_kept_when_the_step_has_several_chunks(monkeypatch):
    """Under ``PATCHES_LAZY_FROM`` with several chunks of columns: unfolded once, kept; with
    one chunk, formed by pieces (no extra unfold)."""
    seen = []
    make = conv.ConvRule._input_side
    monkeypatch.setattr(conv.ConvRule, "_input_side",
                        lambda self, *a: seen.append(make(self, *a)) or seen[-1])
    lc = _build("conv2d_stride_dilation")
    run(lc.case.to(torch.float64), "exact", class_chunk=1)
    assert isinstance(seen[-1], torch.Tensor)
    run(lc.case.to(torch.float64), "exact", class_chunk=10**6)  # one backward of every column
    assert isinstance(seen[-1], Patches)


@pytest.mark.parametrize("name", ["conv2d_depthwise_circular", "conv1d_groups_reflect"])
def test_grouped_patches_up_to_twice_the_bound_are_kept(monkeypatch, name):
    """A grouped convolution (no windows) whose patches are over ``PATCHES_LAZY_FROM`` but at most
    twice it: unfolded once and kept with several chunks of columns, by pieces over twice it or
    with one chunk; EXACT in float64 against the oracle either way."""
    seen = []
    make = conv.ConvRule._input_side

    def spy(self, module, x, L, chunks_):
        seen.append((module, x, L, make(self, module, x, L, chunks_)))
        return seen[-1][-1]

    monkeypatch.setattr(conv.ConvRule, "_input_side", spy)
    lc, ref = _with_oracle(name, "exact")
    case = lc.case.to(torch.float64)
    run(case, "exact", class_chunk=10**6)  # one backward of every column: by pieces
    module, x, L, q = next(s for s in seen if s[0].groups > 1)
    assert isinstance(q, Patches)
    whole = x.shape[0] * x.shape[1] * math.prod(module.kernel_size) * L * x.element_size()
    for bound, kept in ((whole * 3 // 4, True), (whole // 3, False)):
        monkeypatch.setattr(conv, "PATCHES_LAZY_FROM", bound)
        seen.clear()
        got, _ = run(case, "exact", class_chunk=1)
        assert rel_error(got, ref) <= DET_REL_F64
        q = next(s for s in seen if s[0].groups > 1)[-1]
        assert isinstance(q, torch.Tensor) == kept and isinstance(q, Patches) != kept


def test_patches_take_slices_of_samples():
    x = torch.arange(12.0).view(4, 3)
    q = Patches(lambda a, b: x[a:b] * 2, (4, 3), x.dtype, 0)
    assert q.chunk == 1 and q.dim() == 2
    assert torch.equal(q[1:3], 2 * x[1:3]) and torch.equal(q.full(), 2 * x)
    with pytest.raises(TypeError, match="slice of samples"):
        q[0]
    with pytest.raises(TypeError, match="slice of samples"):
        q[::2]


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 10))
    x = torch.randn(32, 8, 28, 28)
    y = torch.randint(0, 10, (32,))
    return model, x, y


def _largest(est, x, y) -> float:
    """MB of the largest tensor storage a step (after a warm one) creates."""
    est.step((x, y))
    est.reset()
    with LargestAlloc() as m:
        est.step((x, y))
    return m.bytes / 2**20


def _step_peak(est, x, y) -> float:
    for _ in range(2):  # warm: plans, probes and direct taps settle
        est.reset()
        est.step((x, y))
    est.reset()
    peaks = []
    for _ in range(2):
        m = TensorPeakMeter()
        m.begin()
        est.step((x, y))
        peaks.append(m.end())
        est.reset()
    return max(peaks)


@pytest.mark.parametrize("fim_type,class_chunk", [("empirical", None), ("exact", 1)])
def test_step_does_not_hold_the_whole_batch_patches(monkeypatch, fim_type, class_chunk):
    """A conv layer whose patches (25 times its input) are most of the step: the peak of an
    EMPIRICAL step and of an EXACT step of one column per backward stays under the input, the
    output and its gradient (a few times each), the tapped gradients and one piece of patches,
    well under the patches of the whole batch; with the patches kept whole it is over."""
    monkeypatch.setattr(conv, "PATCHES_LAZY_FROM", 0)
    monkeypatch.setattr(conv, "windows", lambda *a: None)  # by pieces (test_conv_windows.py)
    model, x, y = _cnn()
    conv_layer = model[0]
    L = 24 * 24
    patches = x.shape[0] * x.shape[1] * math.prod(conv_layer.kernel_size) * L * 4 / 2**20
    out = x.shape[0] * conv_layer.out_channels * L * 4 / 2**20
    inp = x.numel() * 4 / 2**20
    bound = inp + 4 * out + chunks.PATCH_BYTES / 2**20 + 1.0  # 1 MB: parameters, head, squares
    assert bound < 0.6 * patches  # the bound can tell the two apart
    kw = dict(reduction="sum", class_chunk=class_chunk)
    peak = _step_peak(fimfast.DiagFisher(model, fim_type, **kw), x, y)
    assert peak <= bound, (peak, bound, patches)
    # no single tensor of the step comes near the whole batch's patches (a deterministic probe:
    # every aten output storage), while the kept-whole patches are one such tensor
    assert _largest(fimfast.DiagFisher(model, fim_type, **kw), x, y) < patches / 4
    monkeypatch.setattr(conv.ConvRule, "_input_side", _keep_whole)
    held = _largest(fimfast.DiagFisher(model, fim_type, **kw), x, y)
    assert held >= patches > bound, (held, patches)


def test_step_estimates_agree_with_patches_kept(monkeypatch):
    """The same model, patches by pieces against kept whole, EXACT of one column per backward
    in float64 (same estimate to rounding)."""
    model, x, y = _cnn()
    model, x = model.double(), x.double()
    monkeypatch.setattr(chunks, "PATCH_BYTES", 3 * 200 * 576 * 8)  # 3 samples, then 2
    monkeypatch.setattr(conv, "PATCHES_LAZY_FROM", 0)
    monkeypatch.setattr(conv, "windows", lambda *a: None)
    est = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=1)
    est.step((x[:5], y[:5]))
    got = dict(est.result().items())
    monkeypatch.setattr(conv.ConvRule, "_input_side", _keep_whole)
    ref = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=1)
    ref.step((x[:5], y[:5]))
    assert rel_error(got, dict(ref.result().items())) <= DET_REL_F64
