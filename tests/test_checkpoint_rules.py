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
import torch.nn.functional as F
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
        # (dropout draws its mask in memory order: the rule's output has torch's layout)
        h = self.norm(h + self.drop(a))
        return h + torch.tanh(self.ff(self.drop(h)))


class Net(nn.Module):
    """Input projection, two layers, mean over positions, head; ``ck`` (a :data:`VARIANTS` key or
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
        return self.o(_segments(self.ck, self.layers, self.inp(x)).mean(1))


def _segments(ck: str | None, layers, h):
    """``h`` through ``layers`` (an ``nn.Sequential``), checkpointed as ``ck`` says."""
    kw = VARIANTS.get(ck)
    if ck is None:
        return layers(h)
    if kw == "sequential":
        return ckpt.checkpoint_sequential(layers, 2, h, use_reentrant=False)
    if kw is None:  # nested: an outer segment around the inner ones
        def inner(t):
            for m in layers:
                t = ckpt.checkpoint(m, t, use_reentrant=False)
            return t

        return ckpt.checkpoint(inner, h, use_reentrant=False)
    for m in layers:
        h = ckpt.checkpoint(m, h, use_reentrant=False, **kw)
    return h


class Last(nn.Module):
    """A recurrent layer's output sequence (``nn.RNN``/``LSTM``/``GRU``, batch first), or the
    hidden states of a cell looped over the steps (``nn.GRUCell``/``LSTMCell``)."""

    def __init__(self, rnn: nn.Module, packed: bool = False):
        super().__init__()
        self.rnn, self.packed = rnn, packed

    def forward(self, x):
        if isinstance(self.rnn, nn.RNNCellBase):
            h, out = None, []
            for t in range(x.shape[1]):
                h = self.rnn(x[:, t], h)
                out.append(h if isinstance(h, torch.Tensor) else h[0])
            return torch.stack(out, 1)
        if self.packed:  # sample n keeps its first T - n % 2 steps
            lengths = [x.shape[1] - n % 2 for n in range(x.shape[0])]
            p = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                  enforce_sorted=False)
            return nn.utils.rnn.pad_packed_sequence(self.rnn(p)[0], batch_first=True)[0]
        return self.rnn(x)[0]


RECURRENT = {
    "gru_2_layers": lambda: Last(nn.GRU(D, D, num_layers=2, batch_first=True, dropout=0.3)),
    "lstm_bidir_proj": lambda: Last(nn.LSTM(D, D, batch_first=True, bidirectional=True,
                                            proj_size=D // 2)),
    "rnn_packed": lambda: Last(nn.RNN(D, D, batch_first=True), packed=True),
    "gru_cell_loop": lambda: Last(nn.GRUCell(D, D)),
    "lstm_cell_loop": lambda: Last(nn.LSTMCell(D, D)),
}


class RecNet(nn.Module):
    """Input projection, two recurrent layers of :data:`RECURRENT` (tanh between), mean over
    positions, head; ``ck`` as :class:`Net`'s."""

    def __init__(self, kind: str, ck: str | None = "each"):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.o = nn.Linear(4, D), nn.Linear(D, C)
        self.layers = nn.Sequential(RECURRENT[kind](), nn.Tanh(), RECURRENT[kind]())
        self.ck = ck

    def forward(self, x):
        return self.o(_segments(self.ck, self.layers, self.inp(x)).mean(1))


def _batches(k: int = 2, ids: bool = False):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, C, (N, T), generator=g) if ids else
             torch.randn(N, T, 4, generator=g, dtype=torch.float64),
             torch.randint(0, C, (N,), generator=g)) for _ in range(k)]


def _run(model: Net, fim_type: str, batches=None, generic: frozenset = frozenset(), **kw):
    """``(estimator, oracle)`` after stepping the batches; the oracle of each step is the model's
    without checkpointing, from the random state the step started from. The per-sample types
    must put exactly the parameters named in ``generic`` on the generic path."""
    batches = batches or _batches(ids=isinstance(model, FnNet))
    est = fimfast.DiagFisher(model, fim_type, seed=7, **kw)
    ref: dict = {}
    for b in batches:
        rng, offset = torch.get_rng_state(), est.offset
        est.step(b)
        if fim_type in PER_SAMPLE:
            plan = est._persample.last_plan
            assert {est.names[i] for i in plan.generic} == generic, plan.reasons
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


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("kind", sorted(RECURRENT))
def test_checkpointed_recurrent_layers_keep_their_rules(kind, fim_type):
    """In train mode: the GRU's dropout between its layers is drawn again, from the same state,
    by every recomputation."""
    est, ref = _run(RecNet(kind, "each").double().train(), fim_type)
    assert max_rel(est, ref) <= DET_REL_F64


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("variant", ["nested", "no_check", "no_rng", "sequential"])
@pytest.mark.parametrize("kind", ["gru_2_layers", "lstm_cell_loop"])
def test_checkpointed_recurrent_variants(kind, variant, fim_type):
    model = RecNet(kind, variant).double()
    model.train(variant != "no_rng")  # without the random state replayed: no dropout
    est, ref = _run(model, fim_type)
    assert max_rel(est, ref) <= DET_REL_F64
    _no_instance_forward(model)


class FnNet(nn.Module):
    """Token table, a Linear, then a functional use of a bare weight (``kind``: ``F.linear`` of
    its transpose, a ``F.conv1d`` kernel, or ``F.linear`` of the weight times a mask), and an
    output head tied to the table through ``F.linear``: all in one segment (``ck`` as
    :class:`Net`'s, the segment's body one "layer")."""

    def __init__(self, kind: str, ck: str | None = "each"):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin = nn.Embedding(C, D), nn.Linear(D, D)
        if kind == "conv":
            self.K = nn.Parameter(0.3 * torch.randn(D, D, 3))
        elif kind != "tied":
            self.W = nn.Parameter(0.3 * torch.randn(D, D))
            self.register_buffer("mask", (torch.rand(D, D) > 0.3).double())
        self.kind, self.ck = kind, ck
        self.layers = nn.Sequential(Fn(self._body))

    def _body(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        if self.kind == "transposed":
            h = torch.tanh(F.linear(h, self.W.t()))
        elif self.kind == "conv":
            h = torch.tanh(F.conv1d(h.transpose(1, 2), self.K, padding=1)).transpose(1, 2)
        elif self.kind == "masked":
            h = torch.tanh(F.linear(h, self.W * self.mask))
        elif self.kind == "masked_outside":
            h = torch.tanh(F.linear(h, self.masked))
        return F.linear(h.mean(1), self.emb.weight)

    def forward(self, ids):
        if self.kind == "masked_outside":  # made before the segment, used in it
            self.masked = self.W * self.mask
        return _segments(self.ck, self.layers, ids)


class Fn(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


# the parameters each kind leaves to the generic path inside a segment (a weight that is a
# function of a parameter would be made again by the capture: more saved tensors than the
# recomputation, without the capture, saves)
FN_GENERIC = {"tied": frozenset(), "transposed": frozenset(), "conv": frozenset(),
              "masked": frozenset({"W"}), "masked_outside": frozenset({"W"})}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("kind", sorted(FN_GENERIC))
def test_checkpointed_functional_calls_are_captured(kind, fim_type):
    model = FnNet(kind).double()
    est, ref = _run(model, fim_type, generic=FN_GENERIC[kind])
    assert max_rel(est, ref) <= DET_REL_F64


@pytest.mark.parametrize("variant", ["nested", "no_check", "no_early_stop"])
def test_checkpointed_functional_variants(variant):
    est, ref = _run(FnNet("transposed", variant).double(), "exact")
    assert max_rel(est, ref) <= DET_REL_F64


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag", "dense"])
def test_structured_representations_of_a_checkpointed_encoder(rep):
    """The structured Fisher's attention replay (fimfast/structured/attention.py) runs the same
    rewritten forward: the checkpointed encoder's representation is the plain encoder's."""
    out = []
    for ck in (None, "each"):
        model = Net("encoder", ck).double().eval()
        out.append(fimfast.fisher(model, _batches(1), "exact", representation=rep,
                                  reduction="sum").to_dense())
    assert float(out[0].abs().max()) > 0
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-14)
