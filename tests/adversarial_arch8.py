"""Checks of the eighth adversarial round (hand-written architectures): every diagonal type and
the ``dense`` / ``block_diag`` representations against the float64 oracle, on one model.

:func:`check` steps every type over the batches (tests/adversarial.py, tests/adversarial_bounds.py:
each step's draws replayed), and asks each parameter tensor of the oracle to be nonzero, except
the ones named in ``zero`` (a Fisher that vanishes by construction, e.g. a bias below a
normalization over the batch: both sides then hold rounding only). ``rules=True`` pins the
per-sample types to the layer rules (no parameter on the generic path); ``generic`` names the
parameters that must take the generic path (the others take the rules).
"""

from __future__ import annotations

import adversarial as adv
import adversarial_bounds as ab
import torch
from adversarial import jacobian_rows
from oracle import core_matrix

import fimfast

DT = torch.float64
PER_SAMPLE = ("exact", "empirical", "monte_carlo")
RANDOM = ("hutchinson", "hutchinson_sqrt", "hutchinson_dg", "hutchinson_rankk",
          "hutchinson_rank1")
TYPES = PER_SAMPLE + RANDOM
TOL = 1e-10


def batches(shape: tuple, k: int = 2, n: int = 3, C: int = 4, seed: int = 1) -> list:
    """``k`` float64 batches ``(x (n, *shape), labels (n,))``."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, C, (n,), generator=g))
            for _ in range(k)]


def _diag(make, data, fim_type, logits_fn, zero, generic):
    kw = {"top_k": 2} if fim_type == "hutchinson_rankk" else {}
    if logits_fn is not None:
        kw["forward_fn"] = logits_fn
    runner = adv if fim_type in PER_SAMPLE else ab
    est, ref = runner.run(make(), data, fim_type, logits_fn=logits_fn, **kw)
    got = dict(est.result().items())
    for n in zero:
        assert float(ref.pop(n).norm()) < 1e-20 and float(got[n].norm()) < 1e-20, n
    assert adv.nonzero(ref), [n for n, v in ref.items() if float(v.abs().max()) <= 1e-12]
    err = ab.max_rel(est, ref)
    assert err < TOL, (fim_type, err)
    if fim_type in PER_SAMPLE and generic is not None:
        plan = est._persample.last_plan
        names = [n for n, p in est.model.named_parameters() if p.requires_grad]
        assert {names[i] for i in plan.generic} == set(generic), plan.reasons


def _structured(make, data, rep, logits_fn):
    model = make()
    kw = {"forward_fn": logits_fn} if logits_fn is not None else {}
    state = torch.get_rng_state()  # a forward drawing masks (dropout): the same draws below
    got = fimfast.fisher(model, data, "exact", representation=rep, reduction="sum", seed=3, **kw)
    torch.set_rng_state(state)
    full = 0.0
    for b in data:
        _, _, J, z = jacobian_rows(model, b, logits_fn)
        full = full + torch.einsum("rcp,rcd,rdq->pq", J, core_matrix(z, "categorical"), J)
    if rep == "block_diag":
        mask = torch.zeros_like(full, dtype=torch.bool)
        for i, j in got.ranges():
            mask[i:j, i:j] = True
        full = full * mask
    err = float((got.to_dense().double() - full).norm() / full.norm())
    assert float(full.norm()) > 0 and err < TOL, (rep, err)


def check(make, data, types=TYPES, reps=("dense", "block_diag"), logits_fn=None,
          zero=(), generic=None) -> None:
    """Every type of ``types`` and representation of ``reps`` on ``make()`` over ``data``
    equals the float64 oracle (relative error per parameter tensor below 1e-10)."""
    for t in types:
        _diag(make, data, t, logits_fn, zero, generic)
    for rep in reps:
        _structured(make, data, rep, logits_fn)
