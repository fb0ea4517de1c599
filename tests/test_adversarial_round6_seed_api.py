"""Adversarial checks, sixth round: the seed API over many steps against the float64 oracle of
the accumulated value. Token batches of different sizes with ignored labels, ``zero_diag_fim`` of
one type mid-way (that type restarts; the others keep accumulating), another type stepped on the
same model between the steps, a second model stepped in turn, the same module under two names
(``self.a = self.b = inner``, one called through ``torch.func.functional_call``), ``reduction``
"sum"/"mean", ``ema`` with bias correction, and ``get_diag_fim(local=True)``."""

from __future__ import annotations

import adversarial as adv
import adversarial_bounds as ab
import pytest
import torch
from torch import nn
from torch.func import functional_call

import fimfast


def _inner(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


class TwoNames(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.a = inner
        self.b = inner

    def forward(self, x):
        return self.a(x) + 0.5 * functional_call(self.b, dict(self.b.named_parameters()), (x,))


def _batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, ign in [(2, 0.3), (5, 0.3), (1, 0.3), (3, 0.0), (4, 0.5)]:
        ids = torch.randint(0, 9, (n, 4), generator=g)
        lab = torch.randint(0, 3, (n, 4), generator=g)
        lab[torch.rand(n, 4, generator=g) < ign] = -100
        lab[0, 0] = 1  # at least one valid token per batch
        out.append((ids, lab))
    return out


def _step_ref(model, b, fim_type, seed, offset, probes):
    if fim_type in ("exact", "empirical", "monte_carlo"):
        return adv.step_oracle(model, b, fim_type, seed, offset, probes)
    return ab.step_oracle(model, b, fim_type, seed, offset, num_probes=probes, top_k=2)


def _combine(steps, counts, reduction, ema):
    ref = {}
    for n in steps[-1]:
        if ema is None:
            ref[n] = sum(s[n] for s in steps) / (sum(counts) if reduction == "mean" else 1)
        else:
            m = 0
            for s, c in zip(steps, counts):
                m = ema * m + (1 - ema) * (s[n] / c if reduction == "mean" else s[n])
            ref[n] = m / (1 - ema ** len(steps))
    return ref


@pytest.mark.parametrize("fim_type,reduction,ema,probes", [
    ("exact", "mean", 0.6, 1), ("monte_carlo", "sum", 0.5, 3), ("hutchinson", "mean", None, 2),
    ("hutchinson_dg", "sum", None, 1), ("empirical", "mean", 0.3, 1)])
@pytest.mark.parametrize("two_names", [False, True], ids=["plain", "two-names"])
def test_many_steps_against_the_accumulated_oracle(fim_type, reduction, ema, probes, two_names):
    m1 = TwoNames(_inner()) if two_names else _inner()
    m2 = _inner(1)
    B = _batches()
    opts = {"seed": 9, "num_probes": probes, "class_dim": -1}
    other = "hutchinson" if fim_type != "hutchinson" else "exact"
    fimfast.zero_diag_fim(m1)
    fimfast.zero_diag_fim(m2)
    offsets, used, other_used = [], [], []
    for i, b in enumerate(B):
        if i == 2:  # one type restarts; the other keeps its sum
            fimfast.zero_diag_fim(m1, fim_type)
            offsets, used = [], []
        est = fimfast.get_estimator(m1, fim_type)
        offsets.append(0 if est is None or getattr(est, "_restart", False) else est.offset)
        if i == 2:  # the random stream restarts with the type
            assert offsets[-1] == 0 and fimfast.get_estimator(m1, other).offset > 0
        fimfast.diag_fim_step(m1, b, other, {"class_dim": -1, "seed": 4}, reduction="sum")
        fimfast.diag_fim_step(m1, b, fim_type, opts, ema=ema, reduction=reduction)
        fimfast.diag_fim_step(m2, B[-1 - i], fim_type, opts, ema=ema, reduction=reduction)
        used.append(b)
        other_used.append(b)
    steps = [_step_ref(m1, b, fim_type, 9, o, probes) for b, o in zip(used, offsets)]
    counts = [int((b[1] != -100).sum()) for b in used]
    ref = _combine(steps, counts, reduction, ema)
    assert adv.nonzero(ref)
    for local in (False, True):
        got = fimfast.get_diag_fim(m1, fim_type, local=local)
        assert sorted(got) == sorted(ref)
        for n, r in ref.items():
            assert float((got[n].double() - r).norm() / r.norm()) < 1e-10, (n, local)
    # the other type: never zeroed after the first call, every batch summed
    est = fimfast.get_estimator(m1, other)
    assert est.state.steps == len(B)
