"""Mixed precision: bf16/fp16 models and ``torch.autocast`` give float32 states that match the
float32 model's estimate within the precision's error (the same probes are drawn in both runs, so
only rounding separates them)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import make_case
from tolerances import BF16_REL, FP16_REL

import fimfast

# MONTE_CARLO is left out: its sampled labels are a discontinuous function of the logits, so a
# bf16 rounding may flip a draw, which is a different sample, not a rounding error
TYPES = ["exact", "empirical", "hutchinson", "hutchinson_sqrt", "hutchinson_dg",
         "hutchinson_rankk", "hutchinson_rank1"]
MODELS = ["relu_mlp", "encoder", "token_lm"]


def rel_err(d, ref) -> float:
    a = torch.cat([d[k].double().reshape(-1) for k in ref])
    b = torch.cat([ref[k].double().reshape(-1) for k in ref])
    return float((a - b).norm() / b.norm())


def estimate(model, batch, fim_type, train=False):
    est = fimfast.DiagFisher(model, fim_type, seed=11, num_probes=2)
    if train:
        est.train_step(batch)
    else:
        est.step(batch)
    return est.result()


def _fp16_matmul_ok() -> str | None:
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
    except RuntimeError as exc:
        return f"float16 matmul is not supported on this CPU build ({exc})"
    return None


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", MODELS)
def test_bf16_model_matches_float32(name, fim_type):
    case = make_case(name)
    ref = estimate(case.model, case.batch, fim_type)
    low = case.to(torch.bfloat16)
    got = estimate(low.model, low.batch, fim_type)
    for k, v in got.items():
        assert v.dtype == torch.float32, k  # float32 state whatever the parameter dtype
    assert rel_err(got, ref) <= BF16_REL


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson", "hutchinson_rankk"])
@pytest.mark.parametrize("name", MODELS)
def test_autocast_bf16_matches_float32(name, fim_type):
    case = make_case(name)
    ref = estimate(case.model, case.batch, fim_type)
    model = copy.deepcopy(case.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = estimate(model, case.batch, fim_type)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert rel_err(got, ref) <= BF16_REL


def test_autocast_train_step_matches_float32():
    case = make_case("encoder")
    ref_model = copy.deepcopy(case.model)
    ref = estimate(ref_model, case.batch, "hutchinson", train=True)
    model = copy.deepcopy(case.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = estimate(model, case.batch, "hutchinson", train=True)
    assert rel_err(got, ref) <= BF16_REL
    g = {n: p.grad for n, p in model.named_parameters()}
    g_ref = {n: p.grad for n, p in ref_model.named_parameters()}
    assert all(v.dtype == torch.float32 for v in g.values())
    assert rel_err(g, g_ref) <= BF16_REL


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson"])
def test_fp16_model_matches_float32(fim_type):
    why = _fp16_matmul_ok()
    if why:
        pytest.skip(why)
    case = make_case("relu_mlp")
    ref = estimate(case.model, case.batch, fim_type)
    low = case.to(torch.float16)
    got = estimate(low.model, low.batch, fim_type)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert rel_err(got, ref) <= FP16_REL
