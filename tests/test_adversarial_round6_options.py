"""Adversarial checks, sixth round: every ``fim_opts`` option against every type. An option a
type does not read leaves its estimate the same bit for bit (docs/estimators.md, "Options": one
``fim_opts`` serves every type); an option it reads changes it; ``num_probes`` 1, odd and large,
``lr_power_itrs`` 1 and large, ``top_k`` from 1 to C - 1 (C and more refused, naming the option)
agree with the float64 per-step oracle; the same seed gives the same draws on every backend."""

from __future__ import annotations

import adversarial as adv
import adversarial_bounds as ab
import pytest
import torch
from torch import nn

import fimfast

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_sqrt", "hutchinson_dg",
         "hutchinson_rankk", "hutchinson_rank1"]
# (option, value, the types that read it, with categorical logits)
UNUSED = {
    "num_probes": (5, {"monte_carlo", "hutchinson", "hutchinson_sqrt", "hutchinson_dg",
                       "hutchinson_rankk", "hutchinson_rank1"}),
    "top_k": (3, {"hutchinson_rankk"}),
    "rankk_solver": ("power", {"hutchinson_rankk", "hutchinson_rank1"}),
    "lr_power_itrs": (3, set()),  # read with rankk_solver="power" only
    "class_chunk": (1, set()),  # the per-sample types' chunks: the same numbers up to rounding
    "sigma2": (3.0, set()),  # gaussian only
}


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(dtype)


def _batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g))
            for n in (6, 3)]


def _estimate(fim_type, **opts):
    est = fimfast.DiagFisher(_model(), fim_type, seed=11, **opts)
    for b in _batches():
        est.step(b)
    return torch.cat([v.reshape(-1) for v in est.result().values()])


@pytest.mark.parametrize("fim_type", TYPES)
def test_an_option_a_type_does_not_read_leaves_its_estimate_bit_for_bit(fim_type):
    base = _estimate(fim_type)
    for name, (value, readers) in UNUSED.items():
        got = _estimate(fim_type, **{name: value})
        if fim_type in readers:
            assert not torch.equal(got, base), (name, "read but changed nothing")
        elif name == "class_chunk" and fim_type in ("exact", "empirical", "monte_carlo"):
            assert float((got - base).norm() / base.norm()) < 1e-14  # another chunking
        else:
            assert torch.equal(got, base), (name, "an unused option changed the estimate")


def test_rank1_keeps_one_eigenpair_whatever_top_k():
    one = _estimate("hutchinson_rank1")
    assert torch.equal(_estimate("hutchinson_rank1", top_k=4), one)
    assert torch.equal(_estimate("hutchinson_rankk", top_k=1), one)


def test_power_iterations_are_read_by_the_power_solver_only():
    assert torch.equal(_estimate("hutchinson_rankk", lr_power_itrs=2),
                       _estimate("hutchinson_rankk"))
    assert not torch.equal(_estimate("hutchinson_rankk", rankk_solver="power", lr_power_itrs=1),
                           _estimate("hutchinson_rankk", rankk_solver="power", lr_power_itrs=40))


@pytest.mark.parametrize("k", [0, 5, 6, 50])
def test_top_k_outside_1_to_c_minus_1_is_refused_naming_it(k):
    with pytest.raises(ValueError, match="top_k"):
        _estimate("hutchinson_rankk", top_k=k)


@pytest.mark.parametrize("fim_type,opts", [
    ("hutchinson_rankk", {"top_k": 1, "num_probes": 1}),
    ("hutchinson_rankk", {"top_k": 4, "num_probes": 7}),
    ("hutchinson_rankk", {"top_k": 2, "rankk_solver": "power", "lr_power_itrs": 1}),
    ("hutchinson_rankk", {"top_k": 4, "rankk_solver": "power", "lr_power_itrs": 500}),
    ("hutchinson_rank1", {"rankk_solver": "power", "lr_power_itrs": 1, "num_probes": 3}),
    ("hutchinson_sqrt", {"num_probes": 65}),
    ("hutchinson_dg", {"num_probes": 1, "class_chunk": 2}),
    ("hutchinson", {"num_probes": 4, "likelihood": "gaussian", "sigma2": 0.25}),
    ("hutchinson_rankk", {"top_k": 4, "likelihood": "bernoulli", "num_probes": 3}),
])
def test_options_against_the_per_step_oracle(fim_type, opts):
    batches = _batches()
    if opts.get("likelihood") in ("gaussian", "bernoulli"):
        batches = [(x,) for x, _ in batches]  # targets are not read: every row counts
    est, ref = ab.run(_model(), batches, fim_type, reduction="mean", **opts)
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10


@pytest.mark.parametrize("num_probes", [1, 3, 33])
def test_monte_carlo_probes_against_the_oracle(num_probes):
    est, ref = adv.run(_model(), _batches(), "monte_carlo", num_probes=num_probes,
                       class_chunk=2)
    assert adv.nonzero(ref) and adv.max_rel(est, ref) < 1e-10


@pytest.mark.parametrize("fim_type", ["monte_carlo", "hutchinson", "hutchinson_rankk",
                                      "hutchinson_rank1", "hutchinson_dg", "hutchinson_sqrt"])
def test_the_same_seed_draws_the_same_on_every_backend(fim_type):
    outs = {}
    for backend in [b for b, v in fimfast.available_backends().items() if v["available"]]:
        est = fimfast.DiagFisher(_model(torch.float32), fim_type, seed=5, backend=backend,
                                 num_probes=3, top_k=3)
        for b in _batches(torch.float32):
            est.step(b)
        outs[backend] = torch.cat([v.reshape(-1) for v in est.result().values()])
    ref = outs["torch"]
    for backend, got in outs.items():  # float32 rounding only: another draw would be O(1)
        assert float((got - ref).norm() / ref.norm()) < 1e-5, backend


def test_an_unavailable_backend_is_refused_naming_it():
    if fimfast.available_backends()["cuda"]["available"]:
        pytest.skip("the cuda backend is available here")
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        _estimate("hutchinson", backend="cuda")


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
def test_sequence_rows_count_the_valid_tokens(fim_type):
    """docs/math.md §3: with ``sequence_rows`` the count of ``reduction="mean"`` stays the
    number of valid tokens (MONTE_CARLO's mean is then the token-level mean Fisher)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 3)).double()
    ids = torch.randint(0, 9, (4, 5))
    lab = torch.randint(0, 3, (4, 5))
    lab[0, :3] = -100
    est = fimfast.DiagFisher(m, fim_type, reduction="mean", class_dim=-1, sequence_rows=True,
                             seed=1)
    est.step((ids, lab))
    assert est.state.count == 17
