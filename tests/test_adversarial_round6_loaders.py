"""Adversarial checks, sixth round: the one-shot entry points that take an iterable of batches
(``fimfast.diag_fisher``, ``fimfast.fisher``, ``FisherAccumulator.add``) given one batch instead.
Iterating a tuple ``(inputs, targets)`` steps the inputs, then the targets, as two batches of
inputs: with ``(N, C)`` regression targets the answer was the Fisher at the inputs plus the
Fisher at the targets (98% off, silently). Iterating a tensor steps each sample without its
batch axis. Both are refused, naming ``loader``; a list of batches (tuples or tensors) is
estimated as before, against the float64 oracle."""

from __future__ import annotations

import adversarial as adv
import pytest
import torch
from torch import nn

import fimfast


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def _xy():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randn(8, 4, generator=g, dtype=torch.float64))


def _one_shot(kind, model, loader, fim_type, **kw):
    if kind == "diag_fisher":
        return fimfast.diag_fisher(model, loader, fim_type, **kw)
    if kind == "fisher":
        return fimfast.fisher(model, loader, fim_type, representation="block_diag", **kw)
    acc = fimfast.structured.FisherAccumulator(model, fim_type, representation="block_diag", **kw)
    return acc.add(loader).result()


KINDS = ["diag_fisher", "fisher", "accumulator"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fim_type", ["exact", "hutchinson"])
def test_one_batch_given_as_the_loader_is_refused(kind, fim_type):
    x, y = _xy()
    model = _model()
    for loader, what in [((x, y), "tuple"), (x, "tensor"), ({"input": x}, "mapping")]:
        with pytest.raises(TypeError, match="loader") as info:
            _one_shot(kind, model, loader, fim_type, likelihood="gaussian", seed=1)
        assert what in str(info.value)


@pytest.mark.parametrize("kind", ["diag_fisher", "accumulator"])
def test_a_list_of_batches_is_estimated(kind):
    x, y = _xy()
    model = _model()
    got = _one_shot(kind, model, [(x, y), x[:3]], "exact", likelihood="gaussian",
                    reduction="sum")
    names, shapes, J, _ = adv.jacobian_rows(model, (torch.cat([x, x[:3]]),))
    ref = torch.einsum("rcp,rcp->p", J, J)  # gaussian, sigma2 = 1: diag sum_r J_r^T J_r
    vec = got.to_vector() if kind == "diag_fisher" else got.to_dense().diagonal()
    assert float(ref.abs().min()) > 0
    assert float((vec.double() - ref).norm() / ref.norm()) < 1e-12
