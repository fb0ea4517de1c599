"""Gradient checkpointing and ``torch.compile`` under the one-backward estimators.

The checkpointed / compiled model must give the estimate of the plain model with the same probes
(checkpointing recomputes the same forward; compilation may reorder float32 sums), leave ``.grad``
untouched in ``step`` and give the plain model's training gradients in ``train_step``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tolerances import COMPILE_REL
from torch import nn
from torch.utils.checkpoint import checkpoint

import fimfast

ONE_BACKWARD = [t.value for t in fimfast.FIMType if not t.is_per_sample]


class Blocks(nn.Module):
    """Two tanh blocks and a head; ``reentrant`` None (plain) or the checkpoint variant."""

    def __init__(self, reentrant: bool | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.b1 = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.b2 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant:
            # reentrant checkpointing back-propagates into a segment only when one of its inputs
            # requires grad (what Hugging Face's enable_input_require_grads arranges)
            x = x.detach().requires_grad_(True)
        for b in (self.b1, self.b2):
            if self.reentrant is None:
                x = b(x)
            else:
                x = checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(x)


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(7, 6, generator=g), torch.randint(0, 5, (7,), generator=g)


def run(model, fim_type, train=False, num_probes=2):
    est = fimfast.DiagFisher(model, fim_type, seed=5, num_probes=num_probes)
    if train:
        est.train_step(batch())
    else:
        est.step(batch())
    return est.result()


def rel_err(a, b) -> float:
    x = torch.cat([a[k].double().reshape(-1) for k in b])
    y = torch.cat([b[k].double().reshape(-1) for k in b])
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("fim_type", ONE_BACKWARD)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_torch_checkpoint_equals_plain(reentrant, fim_type):
    ref = run(Blocks(None), fim_type)
    model = Blocks(reentrant)
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    got = run(model, fim_type)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=0, msg=n)
    for n, p in model.named_parameters():  # the user's gradients are left as they were
        assert torch.equal(p.grad, sentinel[n]), n


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_torch_checkpoint_train_step(reentrant):
    plain, model = Blocks(None), Blocks(reentrant)
    ref = run(plain, "hutchinson", train=True)
    got = run(model, "hutchinson", train=True)
    assert rel_err(got, ref) <= 1e-6
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fim_type", ["hutchinson", "hutchinson_rankk"])
def test_hf_gradient_checkpointing(fim_type):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    conf = transformers.GPT2Config(vocab_size=24, n_embd=8, n_layer=2, n_head=2, n_positions=8,
                                   bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0)
    plain = transformers.GPT2LMHeadModel(conf).train()  # HF checkpoints only in training mode
    model = copy.deepcopy(plain)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    ids = torch.randint(1, 24, (2, 6), generator=torch.Generator().manual_seed(1))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    outs = []
    for m in (plain, model):
        est = fimfast.DiagFisher(m, fim_type, seed=2)
        est.train_step(b)
        outs.append(est.result())
    assert rel_err(outs[1], outs[0]) <= 1e-6
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def _compiled(model, backend):
    compiled = torch.compile(model, backend=backend)
    try:
        compiled(batch()[0])
    except Exception as exc:  # no working compiler toolchain, inductor import failure, ...
        pytest.skip(f"torch.compile(backend={backend!r}) cannot run here: "
                    f"{type(exc).__name__}: {str(exc)[:300]}")
    return compiled


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    """Two probes (the compiled graph's backward runs twice with retain_graph) and train_step."""
    torch._dynamo.reset()
    plain = Blocks(None)
    compiled = _compiled(copy.deepcopy(plain), backend)
    for fim_type in ("hutchinson", "hutchinson_dg") if backend == "aot_eager" else ("hutchinson",):
        ref = run(plain, fim_type)
        got = run(compiled, fim_type)
        assert list(got) == ["_orig_mod." + n for n in ref]
        got = {k.removeprefix("_orig_mod."): v for k, v in got.items()}
        assert rel_err(got, ref) <= COMPILE_REL
    plain.zero_grad(set_to_none=True)
    ref = run(plain, "hutchinson", train=True)
    got = run(compiled, "hutchinson", train=True)
    got = {k.removeprefix("_orig_mod."): v for k, v in got.items()}
    assert rel_err(got, ref) <= COMPILE_REL
    for p, q in zip(compiled.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=COMPILE_REL, atol=1e-7)
