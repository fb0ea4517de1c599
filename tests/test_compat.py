"""fimfast.compat: torch-secorder's signatures, true per-sample quantities.

torch-secorder squares the gradient of the batch loss; these tests rebuild that formula inline
(torch-secorder is not a dependency) to show the difference on a 2-sample batch.
"""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from oracle import oracle_flat, row_jacobians
from tolerances import DET_REL_F64
from torch import nn

from fimfast.compat import empirical_fisher_diagonal, generalized_fisher_diagonal


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, generator=g, dtype=torch.float64), torch.tensor([0, 2])


def _per_sample_grads(model, loss_fn, x, y) -> list[list[torch.Tensor]]:
    out = []
    for n in range(x.shape[0]):
        loss = loss_fn(model(x[n : n + 1]), y[n : n + 1])
        out.append(list(torch.autograd.grad(loss, list(model.parameters()))))
    return out


def _secorder_style(model, loss) -> list[torch.Tensor]:
    """What torch-secorder returns: the squared gradient of the batch loss."""
    return [g.pow(2) for g in torch.autograd.grad(loss, list(model.parameters()))]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empirical_is_per_sample_squares_not_squared_batch_gradient(reduction):
    model = _net()
    x, y = _batch()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    ours = empirical_fisher_diagonal(model, loss_fn, x, y)
    (g1, g2) = _per_sample_grads(model, loss_fn, x, y)
    assert len(ours) == len(list(model.parameters()))
    for o, a, b, p in zip(ours, g1, g2, model.parameters()):
        assert o.shape == p.shape
        assert torch.allclose(o, a * a + b * b, rtol=1e-12)  # the empirical Fisher
    batch = _secorder_style(model, loss_fn(model(x), y))
    scale = 1.0 if reduction == "sum" else 0.25  # a mean loss divides the gradient by N = 2
    for o, s, a, b in zip(ours, batch, g1, g2):
        # torch-secorder = (g1 + g2)^2 * scale = (ours + 2 g1 g2) * scale: the cross term
        assert torch.allclose(s, scale * (o + 2 * a * b), rtol=1e-12, atol=1e-15)
    diff = max(float((o - s).abs().max()) for o, s in zip(ours, batch))
    assert diff > 1e-3


def test_generalized_is_the_fisher_not_squared_observed_score():
    case = make_case("sigmoid_mlp").to(torch.float64)
    model = case.model
    x, y = case.batch_double()
    ours = generalized_fisher_diagonal(model, model(x), y)
    rj = row_jacobians(case)
    ref = oracle_flat(rj, "categorical", "exact")
    flat = torch.cat([t.reshape(-1) for t in ours])
    assert float((flat - ref).norm() / ref.norm()) <= DET_REL_F64
    # torch-secorder: squared gradient of the summed observed-label log-likelihood
    logp = -nn.functional.nll_loss(torch.log_softmax(model(x), -1), y, reduction="sum")
    theirs = torch.cat([t.reshape(-1) for t in _secorder_style(model, logp)])
    assert float((theirs - ref).norm() / ref.norm()) > 0.1


def test_generalized_two_samples_and_targets_do_not_matter():
    model = _net()
    x, y = _batch()
    a = generalized_fisher_diagonal(model, model(x), y)
    b = generalized_fisher_diagonal(model, model(x), torch.tensor([1, 1]))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # by hand: sum over samples and classes of p_c (d log p_c / d theta)^2
    hand = [torch.zeros_like(p) for p in model.parameters()]
    for n in range(2):
        logp = torch.log_softmax(model(x[n : n + 1]), -1)[0]
        for c in range(3):
            g = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True)
            for h, gi in zip(hand, g):
                h += logp[c].exp().detach() * gi * gi
    assert all(torch.allclose(u, h, rtol=1e-12) for u, h in zip(a, hand))


@pytest.mark.parametrize("loss_type,name", [("bce", "multilabel"), ("mse", "regression")])
def test_generalized_other_likelihoods(loss_type, name):
    case = make_case(name).to(torch.float64)
    x, y = case.batch_double()
    ours = generalized_fisher_diagonal(case.model, case.model(x), y, loss_type=loss_type)
    ref = oracle_flat(row_jacobians(case), case.likelihood, "exact")
    flat = torch.cat([t.reshape(-1) for t in ours])
    assert float((flat - ref).norm() / ref.norm()) <= DET_REL_F64


class _Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot batch it (the per-sample loop takes over)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.a(x)
        return torch.tanh(h) if bool(h.sum() > 0) else self.frozen(h)


def test_empirical_fallback_and_frozen_parameters():
    torch.manual_seed(1)
    model = _Branchy().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    loss_fn = nn.CrossEntropyLoss()
    ours = empirical_fisher_diagonal(model, loss_fn, x, y)
    assert [o.shape for o in ours] == [p.shape for p in model.parameters()]
    assert all(float(o.abs().max()) == 0.0 for o in ours[2:])  # frozen: zeros
    hand = [torch.zeros_like(p) for p in model.parameters()][:2]
    for n in range(4):
        loss = loss_fn(model(x[n : n + 1]), y[n : n + 1])
        g = torch.autograd.grad(loss, [model.a.weight, model.a.bias])
        for h, gi in zip(hand, g):
            h += gi * gi
    assert all(torch.allclose(o, h, rtol=1e-12) for o, h in zip(ours[:2], hand))


def test_errors():
    model = _net()
    x, y = _batch()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        generalized_fisher_diagonal(model, model(x), y, loss_type="hinge")
    with pytest.raises(ValueError, match="create_graph"):
        generalized_fisher_diagonal(model, model(x), y, create_graph=True)
    with pytest.raises(ValueError, match="attached"):
        generalized_fisher_diagonal(model, model(x).detach(), y)
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        generalized_fisher_diagonal(model, model(x), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets must have 2 samples"):
        empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), x, torch.tensor([0]))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        empirical_fisher_diagonal(model, "ce", x, y)
