"""Adversarial checks, sixth round: mixed precision against the float64 oracle of the same
arithmetic (the low-precision parameters and inputs, upcast; the model's own casts replaced by
float64): bf16 / fp16 parameters, a float32 body with a bf16 or float64 head, a float64 body with
a bf16 head, ``torch.autocast`` inside the model's forward or around it through ``forward_fn``,
on EXACT and two other types per case, the torch and C++ backends. Each estimate matches to the
low precision's rounding through the network (measured <= 4.7e-3 for bf16, 7.6e-4 for fp16,
1.9e-7 for float32; asserted with BF16_REL, FP16_REL, DET_REL_F32), and each state is float32
(float64 for float64 parameters). Also: a forward pre-hook that writes a parameter through ``.data``
(unseen by autograd's version counter): exact for the values the forward used, which the
parameter keeps (docs/exactness.md)."""

from __future__ import annotations

import copy

import adversarial as adv
import adversarial_bounds as ab
import pytest
import torch
from tolerances import BF16_REL, DET_REL_F32, FP16_REL
from torch import nn

import fimfast

B16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]


class Mixed(nn.Module):
    """Linear, LayerNorm, Tanh in ``body``'s dtype; the head in ``head``'s; ``auto``: the body
    under a bf16 autocast inside the forward."""

    def __init__(self, body, head, auto=False):
        super().__init__()
        self.a, self.n = nn.Linear(6, 8).to(body), nn.LayerNorm(8).to(body)
        self.h = nn.Linear(8, 4).to(head)
        self.body, self.head, self.auto = body, head, auto

    def forward(self, x):
        with torch.autocast("cpu", dtype=B16, enabled=self.auto):
            h = self.n(torch.tanh(self.a(x.to(self.body))))
        return self.h(h.to(self.head))


def _oracle(model, batch, fim_type, seed, probes):
    m = copy.deepcopy(model).double()
    m.body = m.head = F64
    m.auto = False
    b = (batch[0].double(), batch[1])
    if fim_type.startswith("hutchinson"):
        return ab.step_oracle(m, b, fim_type, seed, 0, num_probes=probes)
    return adv.step_oracle(m, b, fim_type, seed, 0, probes)


def _rel(got, ref):
    a = torch.cat([got[k].double().reshape(-1) for k in ref])
    b = torch.cat([ref[k].reshape(-1) for k in ref])
    return float((a - b).norm() / b.norm())


CASES = {  # (body, head, autocast inside, autocast around, tolerance)
    "bf16 model": (B16, B16, False, False, BF16_REL),
    "fp16 body, float32 head": (F16, F32, False, False, FP16_REL),
    "float32 body, bf16 head": (F32, B16, False, False, BF16_REL),
    "float32 body, float64 head": (F32, F64, False, False, DET_REL_F32),
    "float64 body, bf16 head": (F64, B16, False, False, BF16_REL),
    "float64 body, float32 head": (F64, F32, False, False, DET_REL_F32),
    "autocast inside the forward": (F32, F32, True, False, BF16_REL),
    "autocast through forward_fn": (F32, F32, False, True, BF16_REL),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_precision_against_the_float64_oracle(name):
    body, head, inside, around, tol = CASES[name]
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(7, 6, generator=g), torch.randint(0, 4, (7,), generator=g))
    j = list(CASES).index(name)
    for i, fim_type in enumerate(["exact", TYPES[1 + j % 4], TYPES[1 + (j + 1) % 4]]):
        torch.manual_seed(1)
        model = Mixed(body, head, inside)
        probes = 16 if fim_type.startswith("hutchinson") else 1
        kw = {}
        if around:
            def fwd(m, b):
                with torch.autocast("cpu", dtype=B16):
                    return m(b[0])
            kw["forward_fn"] = fwd
        est = fimfast.DiagFisher(model, fim_type, seed=5, num_probes=probes,
                                 backend=("torch", "cpp")[i % 2], **kw)
        est.step(batch)
        got = dict(est.result().items())
        ref = _oracle(model, batch, fim_type, est.seed, probes)
        assert adv.nonzero(ref)
        for n, p in model.named_parameters():
            assert got[n].dtype == (F64 if p.dtype == F64 else F32), n
        assert _rel(got, ref) < tol, (fim_type, _rel(got, ref))


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson"])
def test_a_parameter_written_through_data_in_a_pre_hook(fim_type):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    w0 = m[0].weight.detach().clone()

    def halve(mod, args):  # a weight constraint applied in every forward
        mod.weight.data.mul_(0.5)

    h = m[0].register_forward_pre_hook(halve)
    b = (torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,)))
    est = fimfast.DiagFisher(m, fim_type, seed=1)
    est.step(b)
    assert torch.equal(m[0].weight.detach(), w0 * 0.5)  # kept, as after any forward
    h.remove()
    ref = (adv.step_oracle(m, b, fim_type, est.seed, 0) if fim_type == "exact"
           else ab.step_oracle(m, b, fim_type, est.seed, 0))
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-12
