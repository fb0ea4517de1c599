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
