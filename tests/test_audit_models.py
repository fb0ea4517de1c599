"""Exact or refused, on models built the way users build them: instance forwards, attributes set
after construction, labels in the wrong layout, forwards that write into parameters,
encoder-decoder batches, gradient hooks, complex parameters, unusual output heads (``lm_head``),
parameters registered again.

Each case either equals the float64 reference of ``tests/test_exactness.py`` (every row's Jacobian
taken from the whole batch's graph) to 1e-10, or raises an error whose message names the module
or the argument. MONTE_CARLO is checked against the same model written plainly, with the same
seed (its draws depend on the logits, the seed and the step counter only).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cases import GRADIENT_HOOKS, MHAHead
from test_exactness import assert_matches, reference

import fimfast

TYPES = ("exact", "empirical")
N, D, C = 6, 5, 4


def _data(n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, C, (n,), generator=g)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, C)).double()


def _run(model, batches, kind, **opts):
    est = fimfast.DiagFisher(model, kind, reduction="sum", seed=3, **opts)
    for b in batches:
        est.step(b)
    return dict(est.result().items())


def _ref(model, batches, kind):
    out = {}
    for x, y in batches:
        part = reference(model, lambda x=x: model(x), y, kind)
        out = {k: out.get(k, 0) + v for k, v in part.items()}
    return out


# -- a forward set on the instance --------------------------------------------------------- #
def _scaled_head(model):
    """``model[2].forward`` replaced on the instance: the head uses twice its weight."""
    lin = model[2]
    lin.forward = lambda h: F.linear(h, 2 * lin.weight, lin.bias)


def _patched_mha(model):
    a = model.a
    a.forward = lambda q, k, v, **kw: nn.MultiheadAttention.forward(a, 0.5 * q, k, v, **kw)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("when", ["before", "after_first_step"])
@pytest.mark.parametrize(
    "build,patch", [(_mlp, _scaled_head), (partial(MHAHead, D, C), _patched_mha)],
    ids=["linear", "mha"])
def test_forward_set_on_the_instance_is_what_runs(kind, when, build, patch):
    """A module whose ``forward`` was replaced on the instance (``module.forward = fn``, as
    wrapping libraries do) computes something its class's rule was not written for: its
    parameters take the generic path, also when the forward is replaced after a first step."""
    model = build()
    b1, b2 = _data(), _data(seed=1)
    est = fimfast.DiagFisher(model, kind, reduction="sum", seed=3)
    if when == "before":
        patch(model)
    est.step(b1)
    ref = _ref(model, [b1], kind)
    if when != "before":
        patch(model)
    est.step(b2)
    ref = {k: ref[k] + v for k, v in _ref(model, [b2], kind).items()}
    assert_matches(dict(est.result().items()), ref)


# -- convolution attributes set after construction ----------------------------------------- #
def _set_padding(conv):
    conv.padding = (0, 1)  # (5, 3) outputs become (3, 5): as many positions, other windows


def _set_same(conv):
    conv.padding = "same"


def _set_ints(conv):
    conv.padding, conv.stride, conv.dilation = 1, 2, 1


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("change", [_set_padding, _set_same, _set_ints],
                         ids=["padding", "same", "ints"])
def test_convolution_reads_its_padding_as_torch_does(kind, change):
    """torch's forward reads ``padding`` (zero padding), ``stride`` and ``dilation`` on every
    call, so a value set after construction is the one the model computes with; the rule takes
    the same (not the constructor's ``_reversed_padding_repeated_twice``)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=(1, 0)).double()
    change(conv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    L = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(L, C)).double()
    assert_matches(_run(model, [(x, y)], kind), _ref(model, [(x, y)], kind))


# -- labels laid out against the logits ---------------------------------------------------- #
class _SeqFirst(nn.Module):
    """``(T, N, D)`` in, ``(T, N, C)`` token logits out (sequence first)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(3, 6).double(), nn.Linear(6, C).double()

    def forward(self, x):
        return self.o(torch.tanh(self.a(x)).cumsum(0))


@pytest.mark.parametrize("kind", ("exact", "empirical", "monte_carlo", "hutchinson"))
def test_sequence_first_labels_in_the_batch_first_layout_are_refused(kind):
    """With ``batch_dim=1`` the labels of ``(T, N, C)`` logits are ``(T, N)``; batch-first
    ``(N, T)`` labels have as many elements and were once permuted and reshaped into scrambled
    labels (EMPIRICAL then estimated with the wrong label of every token)."""
    T, n = 5, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (T, n), generator=g)
    model = _SeqFirst()
    est = fimfast.DiagFisher(model, kind, reduction="sum", seed=3, batch_dim=1, class_dim=-1)
    with pytest.raises(ValueError, match=r"labels must have shape \(5, 4\).*got \(4, 5\)"):
        est.step((x, y.t().contiguous()))
    est.step((x, y))  # the labels as the logits lay them out
    if kind == "empirical":  # rows in any order: the reference needs each token's own label
        ref = reference(model, lambda: model(x), y, kind)
        assert_matches(dict(est.result().items()), ref)


# -- forwards that write into parameters ---------------------------------------------------- #
V, E = 11, 6


class _Renormed(nn.Module):
    """A lookup table with ``max_norm``: its forward renormalises the rows it reads in place."""

    def __init__(self, bag: bool):
        super().__init__()
        torch.manual_seed(0)
        cls = nn.EmbeddingBag if bag else nn.Embedding
        self.e = cls(V, E, max_norm=1.0).double()
        self.o = nn.Linear(E, C).double()
        self.bag = bag

    def forward(self, ids):
        h = self.e(ids) if self.bag else self.e(ids).mean(1)
        return self.o(torch.tanh(h))


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (N, 4), generator=g), torch.randint(0, C, (N,), generator=g)


@pytest.mark.parametrize("kind", ("exact", "empirical", "monte_carlo", "hutchinson"))
@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "bag"])
def test_max_norm_table_is_left_as_it_was(kind, bag):
    """A step measures the renormalised table (what the model's forward computes with) and puts
    the rows the forward renormalised back: the parameters are left as they were."""
    model = _Renormed(bag)
    ids, y = _ids()
    before = model.e.weight.detach().clone()
    got = _run(model, [(ids, y)], kind, num_probes=2)
    assert torch.equal(model.e.weight, before), "the step renormalised the table"
    if kind in TYPES:
        ref = reference(model, lambda: model(ids), y, kind)  # renormalises, as the step's forward
        assert_matches(got, ref)
    else:  # the same draws on the renormalised table, which a second step leaves alone
        assert_matches(got, _run(model, [(ids, y)], kind, num_probes=2))


class _BareRenormed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(V, E, dtype=torch.float64))
        self.o = nn.Linear(E, C).double()

    def forward(self, ids):
        return self.o(torch.tanh(F.embedding(ids, self.table, max_norm=1.0).mean(1)))


@pytest.mark.parametrize("kind", ("exact", "empirical", "monte_carlo", "hutchinson"))
def test_forward_writing_into_a_bare_parameter_is_refused(kind):
    """``F.embedding(..., max_norm=)`` on a bare parameter writes into it in place: the step
    cannot put it back, and refuses, naming the parameter, with the state unchanged."""
    model = _BareRenormed()
    ids, y = _ids()
    est = fimfast.DiagFisher(model, kind, seed=3)
    with pytest.raises(fimfast.UnsupportedModelError, match="trainable parameter.* table in place"):
        est.step((ids, y))
    assert est.state.count == 0 and est.state.steps == 0


# -- encoder-decoder batches ---------------------------------------------------------------- #
class _EncDec(nn.Module):
    """Decoder token logits conditioned on a masked mean of the encoder's tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.o = nn.Embedding(V, E).double(), nn.Linear(E, C).double()

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        ctx = (self.e(input_ids) * attention_mask.unsqueeze(-1)).mean(1, keepdim=True)
        return {"logits": self.o(torch.tanh(self.e(decoder_input_ids) + ctx))}


@pytest.mark.parametrize("kind", TYPES)
def test_encoder_mask_does_not_mask_the_decoder_logits(kind):
    """A batch with decoder inputs: its ``attention_mask`` is the encoder's, and must not drop
    decoder tokens whose positions it happens to mark as padding (sequences of equal lengths)."""
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(0, V, (N, 5), generator=g), torch.randint(0, V, (N, 5), generator=g)
    mask = torch.ones(N, 5, dtype=torch.long)
    mask[1, 3:] = 0
    y = torch.randint(0, C, (N, 5), generator=g)
    model = _EncDec()
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": y}
    ref = reference(model, lambda: model(ids, mask, dec)["logits"], y, kind)
    assert_matches(_run(model, [batch], kind), ref)


@pytest.mark.parametrize("kind", TYPES)
def test_hugging_face_encoder_decoder_decodes_its_labels(kind):
    """A Hugging Face encoder-decoder given labels and no decoder inputs builds them from the
    labels (shifted right), as in training; called without its labels it would decode the
    encoder's input ids instead. The batch's ``attention_mask`` masks the encoder only."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BartConfig(
        vocab_size=13, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(3, 13, (2, 4), generator=g), torch.randint(3, 13, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    ref = reference(model, lambda: model(input_ids=ids, attention_mask=mask, labels=y).logits,
                    y, kind)
    assert_matches(_run(model, [batch], kind), ref)


# -- gradient hooks, complex parameters ------------------------------------------------------ #
@pytest.mark.parametrize("kind", ("exact", "empirical", "monte_carlo", "hutchinson"))
@pytest.mark.parametrize("hook", GRADIENT_HOOKS,
                         ids=["tensor", "module", "global"])
def test_gradient_hooks_do_not_change_the_fisher(kind, hook):
    """Hooks that rescale gradients (``Tensor.register_hook``, module backward hooks, global
    ones) change what autograd reports, not the model: every type estimates the Fisher of the
    model as if they were not there (the layer rules never saw them; a backward to the
    parameters did), and the hooks work again after the step."""
    x, y = _data()
    model, plain = _mlp(), _mlp()
    ref = (reference(plain, lambda: plain(x), y, kind) if kind in TYPES
           else _run(plain, [(x, y)], kind, num_probes=2))  # the same draws without hooks
    handles = hook(model)
    try:
        assert_matches(_run(model, [(x, y)], kind, num_probes=2), ref)
        (g,) = torch.autograd.grad(model(x).sum(), model[0].weight)
    finally:
        for h in handles:
            h.remove()
    (g0,) = torch.autograd.grad(model(x).sum(), model[0].weight)
    assert not torch.allclose(g, g0), "the hooks were not put back"
    for h in handles:
        h.remove()


def test_complex_parameters_are_refused():
    class Cx(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(7, D, dtype=torch.complex128))
            self.o = nn.Linear(7, C).double()

        def forward(self, x):
            return self.o((x.to(torch.complex128) @ self.w.t()).abs())

    with pytest.raises(fimfast.UnsupportedModelError, match="parameter.* w are complex"):
        fimfast.DiagFisher(Cx(), "exact")


# -- the fused output head (lm_head) ---------------------------------------------------------- #
class _LM(nn.Module):
    def __init__(self, post=None):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.lm_head = nn.Embedding(V, E).double(), nn.Linear(E, V).double()
        self.post = post

    def forward(self, ids):
        z = self.lm_head(torch.tanh(self.e(ids).cumsum(1)))
        return z if self.post is None else self.post(z)


class _CappedHead(nn.Linear):
    def forward(self, h):
        return 30 * torch.tanh(super().forward(h) / 30)


def _instance_capped(model):
    head = model.lm_head
    head.forward = lambda h: 30 * torch.tanh(F.linear(h, head.weight, head.bias) / 30)


def _class_capped(model):
    torch.manual_seed(0)
    model.lm_head = _CappedHead(E, V).double()


@pytest.mark.parametrize("when", ["before", "after_first_step"])
@pytest.mark.parametrize("change", [_instance_capped, _class_capped], ids=["instance", "class"])
def test_lm_head_with_another_forward_is_refused(when, change):
    """The fused head computes ``h W^T + b``: a head whose forward is another (soft-capping set
    on the instance, a subclass) was once replaced by the placeholder and estimated as a plain
    Linear."""
    model = _LM()
    ids = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(0))
    if when == "before":
        change(model)
        with pytest.raises(ValueError, match=r"lm_head.*runs a forward other than nn.Linear's"):
            fimfast.DiagFisher(model, "hutchinson", lm_head="lm_head", class_dim=-1)
        return
    est = fimfast.DiagFisher(model, "hutchinson", lm_head="lm_head", class_dim=-1, seed=3)
    est.step(ids)
    change(model)
    # a new head module: the estimator's head (resolved when it was made) is no longer called
    msg = "head was not called" if change is _class_capped else "runs a forward other than"
    with pytest.raises(ValueError, match=msg):
        est.step(ids)
    assert est.state.steps == 1


def _div_(z):
    return z.div_(2.0)


def _mask_(z):
    z[..., -2:] = float("-inf")
    return z


@pytest.mark.parametrize("post", [_div_, _mask_], ids=["temperature", "vocabulary-mask"])
def test_lm_head_logits_written_in_place_name_the_option(post):
    model = _LM(post)
    ids = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(0))
    est = fimfast.DiagFisher(model, "hutchinson", lm_head="lm_head", class_dim=-1, seed=3)
    with pytest.raises(ValueError, match=r"lm_head.*writes into the logits in place"):
        est.step(ids)
    assert est.state.steps == 0
    assert "forward" not in model.lm_head.__dict__


# -- parameters registered again -------------------------------------------------------------- #
class _Reregistered(nn.Module):
    """A forward that swaps a Linear's weight for a scaled copy and registers it again (so the
    weight moves after the bias in ``named_parameters()``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.o = nn.Linear(D, 7).double(), nn.Linear(7, C).double()

    def forward(self, x):
        w = self.l.weight
        del self.l.weight
        self.l.weight = w * 2
        try:
            h = self.l(x)
        finally:
            del self.l.weight
            self.l.weight = w
        return self.o(torch.tanh(h))


def test_parameters_in_another_order_say_so():
    est = fimfast.DiagFisher(_Reregistered(), "exact")
    with pytest.raises(ValueError, match="the same parameters in another order"):
        for _ in range(2):
            est.step(_data())


# -- lookup attributes set after construction ------------------------------------------------ #
class _Lookup(nn.Module):
    def __init__(self, bag: bool, mode: str = "mean"):
        super().__init__()
        torch.manual_seed(0)
        self.e = (nn.EmbeddingBag(V, E, mode=mode) if bag else nn.Embedding(V, E)).double()
        self.o = nn.Linear(E, C).double()
        self.bag = bag

    def forward(self, ids):
        h = self.e(ids) if self.bag else self.e(ids).mean(1)
        return self.o(torch.tanh(h))


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("bag,mode", [(False, None), (True, "mean"), (True, "sum"), (True, "max")],
                         ids=["embedding", "bag-mean", "bag-sum", "bag-max"])
def test_negative_padding_idx_set_after_construction(kind, bag, mode):
    """``padding_idx = -1`` set on a lookup after construction: torch's lookups count it from
    the end of the table (its row gets no gradient); the rule reads it the same way."""
    model = _Lookup(bag, mode)
    model.e.padding_idx = -1
    ids, y = _ids()
    ids[:, 0] = V - 1
    assert_matches(_run(model, [(ids, y)], kind), reference(model, lambda: model(ids), y, kind))


@pytest.mark.parametrize("kind", ("exact", "hutchinson"))
def test_a_tuple_output_led_by_a_scalar_says_which_element_is_read(kind):
    class LossFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            z = self.net(x)
            return z.logsumexp(1).mean(), z

    est = fimfast.DiagFisher(LossFirst(), kind, seed=3)
    with pytest.raises(ValueError, match="tuple whose first element.*is a scalar"):
        est.step(_data())
    assert est.state.steps == 0
