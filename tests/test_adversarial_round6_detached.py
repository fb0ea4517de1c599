"""Adversarial checks, sixth round: a model whose output is detached from its parameters (a
stop-gradient on the logits, ``model(x).detach()``). Autograd sees no parameter, so no Fisher can
be formed: the HUTCHINSON types raised torch's own ``element 0 of tensors does not require grad``,
the per-sample types a message about modules run without gradients (which they were not). Every
type now refuses it naming the output; the state and the random stream are kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg", "hutchinson_rankk"]


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.f(x).detach()


@pytest.mark.parametrize("how", ["model", "forward_fn"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_a_detached_output_is_refused_naming_it(fim_type, how):
    torch.manual_seed(0)
    if how == "model":
        model, kw = Detached(), {}
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        kw = {"forward_fn": lambda m, b: m(b[0]).detach()}
    good = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    est = fimfast.DiagFisher(model, fim_type, seed=1, **kw)
    offset = est.offset
    with pytest.raises(fimfast.UnsupportedModelError, match="output.*detached|detached.*output"):
        est.step(good)
    assert est.state.steps == 0 and est.offset == offset
