"""Layer rules that rewrite a module's forward, inside non-reentrant checkpoint segments.

``nn.MultiheadAttention`` runs a rewritten forward (tapped projections) during the capture; a
non-reentrant ``torch.utils.checkpoint`` recomputes its segment in every backward, after the
capture is gone. :mod:`fimfast.recompute` makes each recomputation run the rewritten forward
again, recording nothing. Every test compares a checkpointed float64 model with the float64
oracle of the same model without checkpointing (tests/adversarial.py's step oracle: every
row's Jacobian, the same dropout masks and draws), for every checkpoint option that changes
what the recomputation does; the per-sample types must keep the rules (no parameter on the
generic path).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint as ckpt
from adversarial import max_rel, nonzero, step_oracle
from tolerances import DET_REL_F64
from torch import nn

import fimfast

N, T, D, C = 5, 4, 8, 3
# the types the step oracle forms (HUTCHINSON's other kinds draw through the same backward)
TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
PER_SAMPLE = {"exact", "empirical", "monte_carlo"}


def _sac():
    """Selective activation checkpointing: matrix products kept, the rest recomputed."""
    policy = functools.partial(_keep_mm)
    return ckpt.create_selective_checkpoint_contexts(policy)


def _keep_mm(ctx, op, *args, **kwargs):
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return ckpt.CheckpointPolicy.MUST_SAVE
    return ckpt.CheckpointPolicy.PREFER_RECOMPUTE


# how the layers are checkpointed: name -> keyword arguments of checkpoint (None: nested,
# "sequential": checkpoint_sequential)
VARIANTS = {
    "each": {},
    "no_rng": {"preserve_rng_state": False},
    "no_check": {"determinism_check": "none"},
    "selective": {"context_fn": _sac},
    "no_early_stop": {"early_stop": False},
    "nested": None,
    "sequential": "sequential",
}


class Block(nn.Module):
    """Attention (``key is value`` cross-attention to the block's input when ``cross``, weights
    averaged when ``weights``), dropout, a residual LayerNorm and a tanh feed-forward."""

    def __init__(self, p: float = 0.0, cross: bool = False, weights: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.drop, self.norm, self.ff = nn.Dropout(p), nn.LayerNorm(D), nn.Linear(D, D)
        self.cross, self.weights = cross, weights

    def forward(self, h):
        kv = torch.tanh(h) if self.cross else h
        a = self.attn(h, kv, kv, need_weights=self.weights)[0]
        # dropout draws its mask in memory order: torch's batch-first attention returns a
        # transposed view, the rule's forward a contiguous tensor (the oracle's model is plain)
        h = self.norm(h + self.drop(a.contiguous()))
        return h + torch.tanh(self.ff(self.drop(h)))


class Net(nn.Module):
    """Input projection, two layers, mean-pooled head; ``ck`` (a :data:`VARIANTS` key or
    ``None``) checkpoints the layers. ``layer``: ``"encoder"`` (``nn.TransformerEncoderLayer``)
    or keyword arguments of :class:`Block`."""

    def __init__(self, layer="encoder", ck: str | None = "each"):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.o = nn.Linear(4, D), nn.Linear(D, C)
        if layer == "encoder":
            self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(
                D, 2, 16, dropout=0.0, batch_first=True) for _ in range(2)])
        else:
            self.layers = nn.Sequential(*[Block(**layer) for _ in range(2)])
        self.ck = ck

    def forward(self, x):
        h = self.inp(x)
        kw = VARIANTS.get(self.ck)
        if self.ck is None:
            h = self.layers(h)
        elif kw == "sequential":
            h = ckpt.checkpoint_sequential(self.layers, 2, h, use_reentrant=False)
        elif kw is None:  # nested: an outer segment around the inner ones
            def inner(t):
                for m in self.layers:
                    t = ckpt.checkpoint(m, t, use_reentrant=False)
                return t

            h = ckpt.checkpoint(inner, h, use_reentrant=False)
        else:
            for m in self.layers:
                h = ckpt.checkpoint(m, h, use_reentrant=False, **kw)
        return self.o(h.mean(1))


def _batches(k: int = 2):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(N, T, 4, generator=g, dtype=torch.float64),
             torch.randint(0, C, (N,), generator=g)) for _ in range(k)]


def _run(model: Net, fim_type: str, batches=None, **kw):
    """``(estimator, oracle)`` after stepping the batches; the oracle of each step is the model's
    without checkpointing, from the random state the step started from."""
    batches = batches or _batches()
    est = fimfast.DiagFisher(model, fim_type, seed=7, **kw)
    ref: dict = {}
    for b in batches:
        rng, offset = torch.get_rng_state(), est.offset
        est.step(b)
        if fim_type in PER_SAMPLE:
            plan = est._persample.last_plan
            assert not plan.generic, {est.names[i]: plan.reasons[i] for i in plan.generic}
        after, ck = torch.get_rng_state(), model.ck
        torch.set_rng_state(rng)
        model.ck = None
        try:
            one = step_oracle(model, b, fim_type, est.seed, offset, kw.get("num_probes", 1))
        finally:
            model.ck = ck
        torch.set_rng_state(after)
        for n, v in one.items():
            ref[n] = ref[n] + v if n in ref else v
    assert nonzero(ref)
    return est, ref


def _no_instance_forward(model: nn.Module) -> None:
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpointed_transformer_keeps_the_attention_rule(variant, fim_type):
    model = Net("encoder", variant).double().eval()
    if variant == "selective" and fim_type in PER_SAMPLE:
        # torch's selective checkpointing allows one backward through a region; the per-sample
        # types run several (with or without the rules): torch refuses, the state is kept
        est = fimfast.DiagFisher(model, fim_type, seed=7)
        with pytest.raises(RuntimeError, match="selective activation checkpoint"):
            est.step(_batches(1)[0])
        assert est.state.steps == 0
        _no_instance_forward(model)
        return
    est, ref = _run(model, fim_type)
    assert max_rel(est, ref) <= DET_REL_F64
    _no_instance_forward(model)


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("variant", ["each", "nested", "no_check"])
def test_dropout_in_the_segment_is_the_sampled_subnetwork(variant, fim_type):
    """The recomputation replays the forward's random state: the rewritten attention must draw
    nothing, so that the dropout after it gets the same masks."""
    model = Net({"p": 0.3}, variant).double().train()
    est, ref = _run(model, fim_type)
    assert max_rel(est, ref) <= DET_REL_F64


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("layer", [{"cross": True}, {"weights": True}],
                         ids=["cross_key_is_value", "need_weights"])
def test_other_attention_calls(layer, fim_type):
    est, ref = _run(Net(layer, "each").double().eval(), fim_type)
    assert max_rel(est, ref) <= DET_REL_F64


def test_checkpointed_more_columns_and_a_second_structure():
    """A step with several columns per backward chunk (EXACT, the attention's folded node off
    inside a segment) after one with one column (EMPIRICAL), on one estimator each way."""
    model = Net({"p": 0.0}, "each").double().eval()
    est, ref = _run(model, "exact", class_chunk=2)
    assert max_rel(est, ref) <= DET_REL_F64


@pytest.mark.parametrize("fim_type", ["exact", "hutchinson"])
def test_train_step_gradients_and_fisher(fim_type):
    batch = _batches(1)[0]
    model, plain = Net("encoder", "each").double(), Net("encoder", None).double()
    est = fimfast.DiagFisher(model, fim_type, seed=7)
    loss = est.train_step(batch)
    plain_loss = nn.functional.cross_entropy(plain(batch[0]), batch[1])
    plain_loss.backward()
    torch.testing.assert_close(loss, plain_loss.detach(), rtol=1e-12, atol=0)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=n)
    model.ck = None
    ref = step_oracle(model, batch, fim_type, est.seed, 0)
    assert max_rel(est, ref) <= DET_REL_F64
    _no_instance_forward(model)


def test_recomputation_adds_no_call_and_leaves_the_model():
    """The plan of a checkpointed step holds the calls of the plain model's step, and the
    model's own checkpointed backward runs torch's forward afterwards."""
    batch = _batches(1)[0]
    counts = []
    for ck in (None, "each"):
        model = Net("encoder", ck).double().eval()
        est = fimfast.DiagFisher(model, "exact")
        est.step(batch)
        counts.append(len(est._persample.last_plan.calls))
    assert counts[0] == counts[1] > 0
    _no_instance_forward(model)
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    g = torch.autograd.grad(loss, list(model.parameters()))
    model.ck = None
    loss2 = nn.functional.cross_entropy(model(batch[0]), batch[1])
    g2 = torch.autograd.grad(loss2, list(model.parameters()))
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


class Offloaded(Net):
    """The layers under saved-tensor hooks that are not a checkpoint's (offloading)."""

    def forward(self, x):
        with torch.autograd.graph.save_on_cpu():
            return super().forward(x)


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_other_saved_tensor_hooks_leave_attention_generic_and_exact(fim_type):
    model = Offloaded("encoder", None).double().eval()
    est = fimfast.DiagFisher(model, fim_type, seed=7)
    b = _batches(1)[0]
    est.step(b)
    generic = {est.names[i] for i in est._persample.last_plan.generic}
    assert generic and all(".self_attn." in n for n in generic)
    ref = step_oracle(model, b, fim_type, est.seed, 0)
    assert nonzero(ref) and max_rel(est, ref) <= DET_REL_F64
