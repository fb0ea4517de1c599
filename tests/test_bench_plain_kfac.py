"""The plain-torch KFAC references of benchmarks/kfac_cputime.py compute the factors fimfast
computes (up to each factor's scale), so the floor they time is that of the same products."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fimfast  # noqa: E402
from benchmarks import kfac_cputime as kc  # noqa: E402
from benchmarks.workloads import build  # noqa: E402


@pytest.mark.parametrize("key", ["a", "c"])
def test_plain_kfac_has_fimfast_factors_up_to_scale(key, monkeypatch):
    w = build(key, "tiny")
    model, X, y = w.model.double(), w.inputs.double(), w.labels
    plain = kc._plain_of(model)
    assert plain is (kc.plain_kfac_conv if key == "c" else kc.plain_kfac)

    def empirical(h):  # the labels of the batch instead of a draw: EMPIRICAL's factors
        h = h.detach()
        return torch.nn.functional.one_hot(y, h.shape[-1]).to(h.dtype) - torch.softmax(h, -1)

    monkeypatch.setattr(kc, "_mc_cotangent", empirical)
    A, G = plain(model, X)
    F = fimfast.fisher(model, [(X, y)], "empirical", "kfac", reduction="sum")
    ours = list(F.A) + list(F.G)
    assert len(ours) == len(A) + len(G)
    for mine, theirs in zip(A + G, ours):
        full = torch.triu(mine) + torch.triu(mine, 1).T  # upper block rows, mirrored
        scale = theirs.diagonal().sum() / full.diagonal().sum()
        assert scale > 0
        torch.testing.assert_close(full * scale, theirs, rtol=1e-10, atol=1e-12)


def test_plain_kfac_skips_models_it_does_not_cover():
    assert kc._plain_of(build("e", "tiny").model) is None
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 16, 3))
    assert kc._plain_of(conv) is None  # padded convolutions: not the strided copy's case


def test_conv_floors_alternatives_compute_the_same_products():
    """benchmarks/conv_floors.py times alternatives that must form the same per-sample weight
    gradients and input gradients (its own assertions), on every shape it reports."""
    from benchmarks import conv_floors

    table = conv_floors.per_sample(1)
    assert table.count("\n") == len(conv_floors._SHAPES) + 1
