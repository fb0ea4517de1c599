"""The functional API's per-batch cycle (zero, step, get) keeps the engines' caches and gives what
a new estimator would."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fimfast
from fimfast import diag_fim_step, get_diag_fim, get_estimator, zero_diag_fim


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson", "monte_carlo"])
def test_zero_step_get_cycle_reuses_the_estimator(fim_type):
    m = _model()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g))
               for _ in range(3)]
    got = []
    for b in batches:
        zero_diag_fim(m, fim_type)
        with pytest.raises(RuntimeError, match="no .* step"):
            get_diag_fim(m, fim_type)
        torch.manual_seed(3)  # the seed a new estimator draws
        diag_fim_step(m, b, fim_type, {"num_probes": 2})
        got.append(get_diag_fim(m, fim_type))
        if len(got) == 1:
            est = get_estimator(m, fim_type)
        assert get_estimator(m, fim_type) is est  # same engine, caches kept
    for b, res in zip(batches, got):
        torch.manual_seed(3)
        ref = fimfast.DiagFisher(m, fim_type, num_probes=2)
        ref.step(b)
        for k, v in ref.result().items():
            torch.testing.assert_close(res[k], v, rtol=0, atol=0)


def test_zero_then_other_reduction_and_seed():
    m = _model()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    diag_fim_step(m, (x, y), "hutchinson", {"seed": 1}, reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        diag_fim_step(m, (x, y), "hutchinson", {"seed": 1}, reduction="mean")
    zero_diag_fim(m)
    diag_fim_step(m, (x, y), "hutchinson", {"seed": 1}, reduction="mean")
    ref = fimfast.DiagFisher(m, "hutchinson", reduction="mean", seed=1)
    ref.step((x, y))
    for k, v in ref.result().items():
        torch.testing.assert_close(get_diag_fim(m, "hutchinson")[k], v, rtol=0, atol=0)


def test_the_states_of_models_asked_in_turn_stay_apart():
    """The last model asked for is kept with its states (fimfast.api._model_states): another
    model, a model gone and anything but a module still find their own entry or error."""
    import gc

    from fimfast import api

    a, b = _model(), _model()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    diag_fim_step(a, (x, y), "empirical")
    diag_fim_step(b, (2 * x, y), "empirical")
    assert get_estimator(a, "empirical") is not get_estimator(b, "empirical")
    ra, rb = get_diag_fim(a, "empirical"), get_diag_fim(b, "empirical")
    assert any(not torch.equal(ra[k], rb[k]) for k in ra)
    assert api._model_states(a) is api._STATES[a] and api._model_states(b) is api._STATES[b]
    c = _model()
    with pytest.raises(RuntimeError, match="no .* step"):
        get_diag_fim(c, "empirical")  # a model the last one is not
    api._model_states(c)
    del c
    gc.collect()
    for bad in (None, "model", 3):  # the reference to the last model is dead now
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            zero_diag_fim(bad)
    assert len(api._STATES) >= 2 and api._model_states(a) is api._STATES[a]
