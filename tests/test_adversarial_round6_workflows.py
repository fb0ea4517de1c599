"""Adversarial checks, sixth round: the Laplace posterior on a Fisher accumulated with ``ema``.
An exponential average of per-batch sums (``reduction="sum"``, ``ema``) is on the scale of one
batch; ``DiagLaplace`` took it as the sum over the data (``meta["count"]`` rows): its ``H`` was
1/4 of the data's over 4 batches, silently. It is refused, naming ``fisher``; an average of
per-batch means (``reduction="mean"``, ``ema``) is a Fisher per row, scaled by the row count or
``n_data`` as a mean is (checked against the float64 sum over the data, which the average
weights toward the last batches: equal here, the batches being the same)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast


def _setup(same: bool = False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    one = (torch.randn(8, 4, generator=g, dtype=torch.float64),
           torch.randint(0, 3, (8,), generator=g))
    B = [one if same else (torch.randn(8, 4, generator=g, dtype=torch.float64),
                           torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    return m, B


@pytest.mark.parametrize("n_data", [None, 64])
def test_an_average_of_per_batch_sums_is_refused(n_data):
    m, B = _setup()
    F = fimfast.diag_fisher(m, B, "exact", reduction="sum", ema=0.5)
    with pytest.raises(ValueError, match="fisher.*ema"):
        fimfast.DiagLaplace(m, F, prior_precision=1.0, n_data=n_data)


@pytest.mark.parametrize("n_data", [None, 64])
def test_an_average_of_per_batch_means_is_scaled_as_a_mean(n_data):
    m, B = _setup(same=True)
    S = fimfast.diag_fisher(m, B, "exact", reduction="sum")  # the sum over the 32 rows
    F = fimfast.diag_fisher(m, B, "exact", reduction="mean", ema=0.5)
    la = fimfast.DiagLaplace(m, F, prior_precision=1.0, n_data=n_data)
    ref = S.to_vector().double() * ((n_data or 32) / 32)
    assert float(ref.min()) > 0
    assert float((la.H.double() - ref).norm() / ref.norm()) < 1e-12


def test_compat_empirical_leaves_the_running_statistics_alone():
    """``fimfast.compat.empirical_fisher_diagonal`` runs the model on one sample at a time (a
    BatchNorm in train mode: its per-sample loop); each forward moved the running statistics
    (five updates for five samples). They are put back; the result is the per-sample squares."""
    import copy

    from fimfast.compat import empirical_fisher_diagonal

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                      nn.Linear(32, 3)).double().train()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hand_model = copy.deepcopy(m)
    got = empirical_fisher_diagonal(m, nn.CrossEntropyLoss(), x, y)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    hand = [torch.zeros_like(p) for p in hand_model.parameters()]
    for n in range(5):
        loss = nn.functional.cross_entropy(hand_model(x[n:n + 1]), y[n:n + 1])
        for h, g in zip(hand, torch.autograd.grad(loss, list(hand_model.parameters()))):
            h += g * g
    assert all(float(h.abs().max()) > 0 for h in hand)
    assert all(torch.allclose(o, h, rtol=1e-12, atol=0) for o, h in zip(got, hand))
