"""fimfast.distributed.forward_module: DDP's wrapped module (subclasses too), else the model; and
fimfast.batch's layouts with their Mapping checks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.nn.parallel import DistributedDataParallel

from fimfast import batch as batchlib
from fimfast.distributed import forward_module


class _Wrapper(DistributedDataParallel):
    pass


def _ddp(cls, inner):
    w = cls.__new__(cls)  # no process group: only the attribute the function reads
    w.__dict__["module"] = inner
    return w


def test_forward_module_by_class_every_call():
    inner = torch.nn.Linear(2, 2)
    for _ in range(2):  # the first call and a cached one
        assert forward_module(inner) is inner
        assert forward_module(_ddp(DistributedDataParallel, inner)) is inner
        assert forward_module(_ddp(_Wrapper, inner)) is inner
        assert forward_module(torch.nn.Sequential(inner)) is not inner


def test_split_and_labels_of_tell_mappings_from_sequences():
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    assert batchlib.split((x, y))[:2] == (x, y)
    assert batchlib.split([x, y])[:2] == (x, y)
    got = batchlib.split(OrderedDict(input_ids=x, labels=y))
    assert got[0].keys() == {"input_ids"} and got[1] is y
    inputs, labels, _ = batchlib.split(({"input_ids": x}, y))
    assert inputs.keys() == {"input_ids"} and labels is y
    assert batchlib.labels_of({"input_ids": x, "labels": y})[0] is y
    assert batchlib.labels_of((x, y))[0] is y
