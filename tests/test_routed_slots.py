"""The padded places of routed rows (fimfast/rules/routed.py, ``_slots``): both ways of ranking
a row among its sample's rows agree, each row gets a place of its own in its sample's span, and
an expert's later layers reuse the places its first layer formed; a MoE block on the ranking by
sorting (the one large batches take) against the float64 oracle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from adversarial import max_rel, nonzero, run

from fimfast.rules import routed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_models import MoEClassifier  # noqa: E402


class _Cap:
    """The one attribute of a capture that ``_slots`` keeps its places in."""


def _check(sample: torch.Tensor, N: int, flat: torch.Tensor, S: int) -> None:
    counts = torch.bincount(sample, minlength=N)
    assert S == int(counts.max())
    assert torch.equal(flat // S, sample)  # in its sample's span
    slot = flat % S
    for n in range(N):  # the rows of a sample take its first places, in their order
        assert torch.equal(slot[sample == n], torch.arange(int(counts[n])))


@pytest.mark.parametrize("M,N", [(1, 1), (7, 3), (40, 5), (200, 17), (64, 64)])
def test_both_rankings_agree(M, N, monkeypatch):
    g = torch.Generator().manual_seed(M * 31 + N)
    sample = torch.randint(0, N, (M,), generator=g)
    flat, S = routed._slots(_Cap(), sample, N)
    _check(sample, N, flat, S)
    monkeypatch.setattr(routed, "_ONEHOT", 0)  # by sorting
    flat2, S2 = routed._slots(_Cap(), sample, N)
    assert S2 == S and torch.equal(flat2, flat)


def test_no_rows_and_reuse():
    cap = _Cap()
    empty = torch.zeros(0, dtype=torch.int64)
    flat, S = routed._slots(cap, empty, 4)
    assert S == 0 and flat.numel() == 0
    sample = torch.tensor([2, 0, 2, 2, 1])
    a = routed._slots(cap, sample, 3)
    assert routed._slots(cap, sample, 3)[0] is a[0]  # the same rows: formed once
    other = sample.clone()  # equal values, another tensor: formed again, the same places
    b = routed._slots(cap, other, 3)
    assert b[0] is not a[0] and torch.equal(b[0], a[0]) and b[1] == a[1] == 3


def test_expert_layers_share_places():
    """A step of an MLP expert (two Linear layers on the same rows) forms the places once per
    expert, not once per layer."""
    torch.manual_seed(2)
    model = MoEClassifier(E=3, k=2).double()
    formed = []
    real = routed._slots

    def counting(cap, sample, N):
        before = len(cap.__dict__.get("slots", {}))
        out = real(cap, sample, N)
        formed.append(len(cap.__dict__["slots"]) > before)
        return out

    ids = torch.randint(0, 11, (5, 6))
    y = torch.randint(0, 3, (5,))
    import fimfast

    est = fimfast.DiagFisher(model, "empirical")
    routed._slots = counting
    try:
        est.step((ids, y))
    finally:
        routed._slots = real
    assert len(formed) == 6 and sum(formed) == 3  # 3 experts x 2 layers, placed once each


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_sorted_ranking_matches_oracle(fim_type, monkeypatch):
    monkeypatch.setattr(routed, "_ONEHOT", 0)
    torch.manual_seed(1)
    model = MoEClassifier(E=3, k=2, kind="swiglu").double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g))
               for _ in range(2)]
    est, ref = run(model, batches, fim_type)
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    assert est._persample.last_plan.generic == []
