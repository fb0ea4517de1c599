"""fimfast._lazy.once: computed on the first read, then read from the instance like an attribute."""

from __future__ import annotations

import torch

from fimfast._lazy import once
from fimfast.batch import Rows
from fimfast.persample.columns import Columns


class _Counted:
    def __init__(self) -> None:
        self.calls = 0

    @once
    def value(self) -> list:
        """The doc."""
        self.calls += 1
        return [self.calls]


def test_once_computes_once_per_instance():
    a, b = _Counted(), _Counted()
    first = a.value
    assert a.value is first and a.calls == 1 and a.__dict__["value"] is first
    assert b.value == [1] and b.value is not first and b.calls == 1
    a.value = "set"  # an attribute like any other afterwards (no __set__)
    assert a.value == "set"
    del a.value
    assert a.value == [2] and a.calls == 2  # read again after a delete: computed again
    assert isinstance(_Counted.value, once) and _Counted.value.__doc__ == "The doc."


def test_step_objects_use_it():
    assert isinstance(Rows.__dict__["flat"], once) and isinstance(Rows.__dict__["detached"], once)
    z = torch.randn(4, 3)
    cols = Columns.__new__(Columns)
    cols._flat, cols.dtype, cols.categorical, cols.block = z, torch.float32, True, None
    p = cols.p
    # (p by fimfast.ops.softmax_rest: torch's softmax to rounding)
    assert cols.p is p and torch.allclose(p, torch.softmax(z, -1), rtol=1e-6, atol=0)
    assert torch.equal(cols.sp, p.sqrt())
