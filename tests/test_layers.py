"""Every layer rule of the per-sample engine against the float64 oracle and the generic path.

Each case is a tiny model around one rule (alone and stacked, with awkward shapes: batch 1, one
token, odd channel counts, padding masks, repeated token ids), run in float64. The fast engine must
equal the oracle (tests/oracle.py) and the generic path to rounding, and its plan must put exactly
the expected parameters on the generic path (so a rule that silently fell back would fail).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from cases import Case, TiedNet, make_case
from oracle import oracle
from oracle import rel_error as _rel
from tolerances import DET_REL_F64
from torch import nn

from fimfast import DiagFisher
from fimfast.rules.conv import _unfold


# --------------------------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------------------------- #
class SeqHead(nn.Module):
    """``body`` on ``(N, T, d)`` (or ``(T, N, d)`` when ``seq_first``), tanh, mean over tokens."""

    def __init__(self, body: nn.Module, d: int, C: int, seq_first: bool = False):
        super().__init__()
        self.body, self.head, self.seq_first = body, nn.Linear(d, C), seq_first

    def forward(self, x):
        if self.seq_first:
            return self.head(torch.tanh(self.body(x.transpose(0, 1))).mean(0))
        return self.head(torch.tanh(self.body(x)).mean(1))


class ConvHead(nn.Module):
    """``body`` (convolutions, norms), tanh, flatten, Linear head (sized on first use)."""

    def __init__(self, body: nn.Module, x: torch.Tensor, C: int):
        super().__init__()
        self.body = body
        with torch.no_grad():
            n = body(x[:1]).numel()
        self.head = nn.Linear(n, C)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


class EmbedHead(nn.Module):
    def __init__(self, emb: nn.Embedding, C: int):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(emb.embedding_dim, C)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h.mean(1) if h.dim() == 3 else h)


class AttnHead(nn.Module):
    """MultiheadAttention in several configurations, then mean pooling and a head."""

    def __init__(self, mha: nn.MultiheadAttention, mode: str, C: int = 3):
        super().__init__()
        self.mha, self.mode = mha, mode
        self.head = nn.Linear(mha.embed_dim, C)

    def forward(self, x, ctx=None, mask=None):
        m = self.mha
        bf = m.batch_first
        if not bf:
            x = x.transpose(0, 1)
            ctx = None if ctx is None else ctx.transpose(0, 1)
        L = x.shape[1 if bf else 0]
        kw: dict = {}
        if self.mode == "self_kpm":
            a, _ = m(x, x, x, key_padding_mask=mask == 0, need_weights=False)
        elif self.mode == "weights_float_mask":
            am = torch.triu(torch.full((L, L), -1.5, dtype=x.dtype), 1)
            a, w = m(x, x, x, attn_mask=am, need_weights=True, average_attn_weights=False)
        elif self.mode == "cross":
            S = ctx.shape[1 if bf else 0]
            am = torch.zeros(L, S, dtype=torch.bool)
            am[0, -1] = True
            a, _ = m(x, ctx, ctx, attn_mask=am, key_padding_mask=mask == 0)
        elif self.mode == "separate":
            k = ctx[..., :5]
            v = ctx[..., 5:8]
            a, _ = m(x, k, v, need_weights=False)
        elif self.mode == "causal":
            am = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            a, _ = m(x, x, x, attn_mask=am, is_causal=True, need_weights=False, **kw)
        elif self.mode == "mask3d":
            am = torch.randn(x.shape[0 if bf else 1] * m.num_heads, L, L,
                             generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            a, _ = m(x, x, x, attn_mask=am.to(x.dtype), need_weights=False)
        else:
            raise KeyError(self.mode)
        return self.head(a.mean(1 if bf else 0))


class EncoderHead(nn.Module):
    def __init__(self, batch_first: bool, layers: int = 1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.bf = batch_first
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        pad = mask == 0
        if self.bf:
            return self.head(self.enc(x, src_key_padding_mask=pad).mean(1))
        return self.head(self.enc(x.transpose(0, 1), src_key_padding_mask=pad).mean(0))


class TokenModel(nn.Module):
    """Token-level: embedding, causal attention with padding, LayerNorm, head (untied)."""

    def __init__(self, vocab: int = 7, d: int = 6, C: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, C)

    def forward(self, ids, attention_mask):
        x = self.emb(ids)
        T = ids.shape[1]
        am = torch.ones(T, T, dtype=torch.bool).triu(1)
        a, _ = self.attn(x, x, x, attn_mask=am, key_padding_mask=attention_mask == 0,
                         need_weights=False)
        return self.head(self.norm(x + a))


class Scale(nn.Module):
    """A module without a rule whose parameter is used through a function of it that mixes its
    elements (``cumsum``), which the functional capture (fimfast/functional.py) does not follow:
    generic path."""

    def __init__(self, d: int):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * torch.sigmoid(self.s).cumsum(0)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.scale, self.head = nn.Linear(5, 4), Scale(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.scale(self.lin(x))))


class Functional(nn.Module):
    """``lin.weight`` is used by its module and again functionally outside it (captured: one
    group of both uses)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h + 0.3 * F.linear(h, self.lin.weight))


class InPlace(nn.Module):
    """Layer outputs modified in place afterwards (ReLU(inplace=True), residual ``+=``)."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b, self.head = (
            nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.Linear(5, 3)
        )

    def forward(self, x):
        h = self.act(self.a(x))
        y = self.b(h)
        y += x
        return self.head(torch.tanh(y))


class BatchCoupled(nn.Module):
    """Samples mixed by a functional op (batch centring) between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(h - h.mean(0, keepdim=True))


# --------------------------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------------------------- #
@dataclass
class LayerCase:
    """A case for the oracle plus the parameters expected on the generic path."""

    case: Case
    generic: set[str] = field(default_factory=set)


def _plain(model, batch):
    return model(batch[0])


def _kw(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "labels"})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _simple(name, model, x, C, N=None) -> Case:
    N = x.shape[0] if N is None else N
    y = torch.randint(0, C, (N,), generator=_gen(1))
    return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y, "categorical", C)


def _mapping(name, model, inputs: dict, C, N) -> Case:
    y = torch.randint(0, C, (N,), generator=_gen(1))
    batch = {**inputs, "labels": y}
    return Case(name, model, batch, _kw, torch.ones(N, dtype=torch.bool), y, "categorical", C)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def _bn_stats(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.3, 0.4, bn.num_features))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, bn.num_features))
        bn.weight.copy_(torch.linspace(0.7, 1.3, bn.num_features))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, bn.num_features))
    return bn


def _build(name: str) -> LayerCase:
    torch.manual_seed(0)
    if name == "linear_n1":
        return LayerCase(_simple(name, nn.Linear(5, 3), _rand(1, 5), 3))
    if name == "mlp_stack":
        m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Sigmoid(),
                          nn.Linear(6, 3))
        return LayerCase(_simple(name, m, _rand(4, 5), 3))
    if name == "linear_seq_t1":
        return LayerCase(_simple(name, SeqHead(nn.Linear(4, 5), 5, 3), _rand(3, 1, 4), 3))
    if name == "linear_seq_t3_nobias":
        m = SeqHead(nn.Linear(4, 5, bias=False), 5, 3)
        return LayerCase(_simple(name, m, _rand(4, 3, 4), 3))
    if name == "linear_seq_first":
        m = SeqHead(nn.Linear(4, 5), 5, 3, seq_first=True)
        return LayerCase(_simple(name, m, _rand(3, 5, 4), 3))
    if name == "linear_seq_first_t_eq_n":  # (T, N, d) with T == N: the probe picks the batch dim
        m = SeqHead(nn.Linear(4, 5), 5, 3, seq_first=True)
        return LayerCase(_simple(name, m, _rand(3, 3, 4), 3))
    if name == "conv1d":
        body = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2)
        x = _rand(3, 3, 11)
        return LayerCase(_simple(name, ConvHead(body, x, 3), x, 3))
    if name == "conv1d_groups_reflect":
        body = nn.Conv1d(6, 9, 3, groups=3, padding=2, padding_mode="reflect")
        x = _rand(2, 6, 7)
        return LayerCase(_simple(name, ConvHead(body, x, 3), x, 3))
    if name == "conv2d_stride_dilation":
        body = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        x = _rand(3, 3, 7, 6)
        return LayerCase(_simple(name, ConvHead(body, x, 4), x, 4))
    if name == "conv2d_depthwise_circular":
        body = nn.Conv2d(3, 6, 3, groups=3, padding=1, padding_mode="circular", bias=False)
        x = _rand(2, 3, 5, 5)
        return LayerCase(_simple(name, ConvHead(body, x, 3), x, 3))
    if name == "conv2d_same_replicate":
        body = nn.Sequential(
            nn.Conv2d(2, 3, 4, padding="same", padding_mode="replicate"), nn.Tanh(),
            nn.Conv2d(3, 3, 3, padding="valid"),
        )
        x = _rand(3, 2, 6, 5)
        return LayerCase(_simple(name, ConvHead(body, x, 3), x, 3))
    if name == "conv2d_n1":
        body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2))
        x = _rand(1, 1, 7, 7)
        return LayerCase(_simple(name, ConvHead(body, x, 3), x, 3))
    if name == "embedding_repeats_padding":
        ids = torch.tensor([[1, 3, 3, 0], [2, 2, 2, 2], [0, 0, 5, 1], [6, 1, 6, 3]])
        m = EmbedHead(nn.Embedding(7, 4, padding_idx=0), 3)
        return LayerCase(_simple(name, m, ids, 3))
    if name == "embedding_1d_maxnorm":
        ids = torch.tensor([4, 1, 4, 0, 2])
        m = EmbedHead(nn.Embedding(5, 3, max_norm=1.0), 3)
        return LayerCase(_simple(name, m, ids, 3))
    if name == "layernorm_2d_shape":
        m = nn.Sequential(nn.LayerNorm((3, 4)), nn.Flatten(), nn.Linear(12, 3))
        return LayerCase(_simple(name, m, _rand(4, 3, 4), 3))
    if name == "layernorm_nobias_seq":
        body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, bias=False))
        return LayerCase(_simple(name, SeqHead(body, 4, 3), _rand(3, 5, 4), 3))
    if name == "rmsnorm":
        body = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.Tanh(), nn.Linear(4, 4),
                             nn.RMSNorm(4, eps=1e-3))
        return LayerCase(_simple(name, SeqHead(body, 4, 3), _rand(3, 2, 4), 3))
    if name == "rmsnorm_2d_shape":
        m = nn.Sequential(nn.RMSNorm((2, 3)), nn.Flatten(), nn.Linear(6, 3))
        return LayerCase(_simple(name, m, _rand(3, 2, 3), 3))
    if name == "groupnorm":
        body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4))
        x = _rand(3, 2, 5, 5)
        return LayerCase(_simple(name, ConvHead(body, x, 3), x, 3))
    if name == "batchnorm_eval":
        m = nn.Sequential(nn.Linear(5, 6), _bn_stats(nn.BatchNorm1d(6)), nn.Tanh(),
                          nn.Linear(6, 3))
        m.eval()
        return LayerCase(_simple(name, m, _rand(4, 5), 3))
    if name == "batchnorm2d_eval":
        body = nn.Sequential(nn.Conv2d(2, 3, 3), _bn_stats(nn.BatchNorm2d(3)))
        x = _rand(3, 2, 5, 5)
        m = ConvHead(body, x, 3)
        m.eval()
        return LayerCase(_simple(name, m, x, 3))
    if name == "batchnorm_train":  # batch statistics couple the samples below the norm
        m = nn.Sequential(nn.Linear(5, 6), _bn_stats(nn.BatchNorm1d(6)), nn.Tanh(),
                          nn.Linear(6, 3))
        m.train()
        return LayerCase(_simple(name, m, _rand(4, 5), 3), {"0.weight", "0.bias"})
    if name == "batch_coupled_functional":
        return LayerCase(_simple(name, BatchCoupled(), _rand(4, 5), 3), {"a.weight", "a.bias"})
    if name == "mha_self_kpm":
        m = AttnHead(nn.MultiheadAttention(6, 2, batch_first=True), "self_kpm")
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
        return LayerCase(_mapping(name, m, {"x": _rand(3, 4, 6), "mask": mask}, 3, 3))
    if name == "mha_seq_first_weights":
        m = AttnHead(nn.MultiheadAttention(6, 3, batch_first=False), "weights_float_mask")
        return LayerCase(_mapping(name, m, {"x": _rand(3, 4, 6)}, 3, 3))
    if name == "mha_cross_bool_masks":
        m = AttnHead(nn.MultiheadAttention(6, 2, batch_first=True), "cross")
        mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
        inputs = {"x": _rand(3, 4, 6), "ctx": _rand(3, 5, 6, seed=1), "mask": mask}
        return LayerCase(_mapping(name, m, inputs, 3, 3))
    if name == "mha_kdim_vdim_nobias":
        mha = nn.MultiheadAttention(6, 2, batch_first=False, kdim=5, vdim=3, bias=False)
        m = AttnHead(mha, "separate")
        inputs = {"x": _rand(2, 3, 6), "ctx": _rand(2, 4, 8, seed=1)}
        return LayerCase(_mapping(name, m, inputs, 3, 2))
    if name == "mha_causal":
        m = AttnHead(nn.MultiheadAttention(4, 2, batch_first=True), "causal")
        return LayerCase(_mapping(name, m, {"x": _rand(3, 5, 4)}, 3, 3))
    if name == "mha_mask3d_n1":
        m = AttnHead(nn.MultiheadAttention(4, 2, batch_first=True), "mask3d")
        return LayerCase(_mapping(name, m, {"x": _rand(1, 3, 4)}, 3, 1))
    if name in ("encoder_batch_first", "encoder_seq_first"):
        m = EncoderHead(name == "encoder_batch_first", layers=2 if "batch" in name else 1)
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
        return LayerCase(_mapping(name, m, {"x": _rand(3, 4, 8), "mask": mask}, 3, 3))
    if name == "tied_linear":
        return LayerCase(_simple(name, TiedNet(5, 3), _rand(4, 5), 3))
    if name == "inplace_after_layers":
        return LayerCase(_simple(name, InPlace(), _rand(3, 5), 3))
    if name == "frozen_weight":
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        m[0].weight.requires_grad_(False)
        return LayerCase(_simple(name, m, _rand(3, 5), 3))
    if name == "unknown_module":
        return LayerCase(_simple(name, Unknown(), _rand(4, 5), 3), {"scale.s"})
    if name == "functional_use":
        return LayerCase(_simple(name, Functional(), _rand(3, 4), 3), set())
    if name == "token_level":
        ids = torch.tensor([[1, 4, 4, 2, 0], [3, 3, 1, 0, 0], [5, 6, 2, 2, 1]])
        mask = (ids != 0).long()
        labels = torch.randint(0, 5, ids.shape, generator=_gen(2))
        labels[mask == 0] = -100
        labels[1, 1] = -100
        batch = {"ids": ids, "attention_mask": mask, "labels": labels}
        valid = (mask != 0) & (labels != -100)
        case = Case(name, TokenModel(), batch, _kw, valid, labels, "categorical", 5)
        return LayerCase(case)
    if name == "token_lm_tied":
        return LayerCase(make_case("token_lm", N=3))
    raise KeyError(name)


NAMES = [
    "linear_n1", "mlp_stack", "linear_seq_t1", "linear_seq_t3_nobias", "linear_seq_first",
    "linear_seq_first_t_eq_n", "conv1d", "conv1d_groups_reflect", "conv2d_stride_dilation",
    "conv2d_depthwise_circular", "conv2d_same_replicate", "conv2d_n1",
    "embedding_repeats_padding", "embedding_1d_maxnorm", "layernorm_2d_shape",
    "layernorm_nobias_seq", "rmsnorm", "rmsnorm_2d_shape", "groupnorm", "batchnorm_eval",
    "batchnorm2d_eval", "batchnorm_train", "batch_coupled_functional", "mha_self_kpm",
    "mha_seq_first_weights", "mha_cross_bool_masks", "mha_kdim_vdim_nobias", "mha_causal",
    "mha_mask3d_n1", "encoder_batch_first", "encoder_seq_first", "tied_linear",
    "inplace_after_layers", "frozen_weight", "unknown_module", "functional_use", "token_level",
    "token_lm_tied",
]



def run(case: Case, fim_type: str, rules: bool = True, **opts) -> tuple[dict, DiagFisher]:
    """One step of ``fim_type`` on ``case`` (as given; cast it first for float64). Every case's
    logits are ``(N, C)`` or token-level ``(N, T, C)`` (``class_dim=-1``)."""
    opts.setdefault("class_dim", -1)
    est = DiagFisher(case.model, fim_type, likelihood=case.likelihood, seed=7, **opts)
    est._persample.use_rules = rules
    est.step(case.batch)
    return dict(est.result().items()), est


_CACHE: dict[str, tuple[LayerCase, dict]] = {}


def _with_oracle(name: str, quantity: str) -> tuple[LayerCase, dict]:
    key = f"{name}/{quantity}"
    if key not in _CACHE:
        lc = _build(name)
        _CACHE[key] = (lc, oracle(lc.case, quantity))
    return _CACHE[key]


def _plan_names(est: DiagFisher) -> tuple[set[str], set[str]]:
    plan = est._persample.last_plan
    return {est.names[i] for i in plan.fast}, {est.names[i] for i in plan.generic}


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_rule_exact_matches_oracle_f64(name):
    lc, ref = _with_oracle(name, "exact")
    got, est = run(lc.case.to(torch.float64), "exact")
    assert _rel(got, ref) <= DET_REL_F64
    fast, generic = _plan_names(est)
    assert generic == lc.generic, est._persample.last_plan.reasons
    assert fast | generic | {est.names[i] for i in est._persample.last_plan.unused} == set(
        est.names
    )


EMP = ["mlp_stack", "conv2d_stride_dilation", "embedding_repeats_padding", "layernorm_nobias_seq",
       "batchnorm_train", "mha_cross_bool_masks", "encoder_seq_first", "token_level",
       "token_lm_tied", "tied_linear"]


@pytest.mark.parametrize("name", EMP, ids=EMP)
def test_rule_empirical_matches_oracle_f64(name):
    lc, ref = _with_oracle(name, "empirical")
    got, _ = run(lc.case.to(torch.float64), "empirical")
    assert _rel(got, ref) <= DET_REL_F64


MC = ["conv1d_groups_reflect", "rmsnorm", "groupnorm", "mha_kdim_vdim_nobias", "token_level",
      "unknown_module"]


@pytest.mark.parametrize("name", MC, ids=MC)
def test_rule_monte_carlo_matches_generic_f64(name):
    lc = _build(name)
    c64 = lc.case.to(torch.float64)
    got, _ = run(c64, "monte_carlo", num_probes=3)
    ref, est = run(c64, "monte_carlo", rules=False, num_probes=3)
    assert not est._persample.last_plan.groups  # the reference really is the generic path
    assert _rel(got, ref) <= DET_REL_F64


def test_hooks_removed_after_failing_forward():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            h = self.lin(x)
            self.attn(h, h, h)
            raise RuntimeError("boom")

    m = Boom()
    est = DiagFisher(m, "exact")
    with pytest.raises(RuntimeError, match="boom"):
        est.step((torch.randn(2, 3, 4), torch.tensor([0, 1])))
    assert all(not mod._forward_hooks for mod in m.modules())
    assert "forward" not in m.attn.__dict__


@pytest.mark.parametrize("chunk", [1, 2, None], ids=["chunk1", "chunk2", "auto"])
def test_class_chunk_token_level_same_result(chunk):
    lc = _build("token_level")
    c64 = lc.case.to(torch.float64)
    got, _ = run(c64, "exact", class_chunk=chunk)
    ref, _ = run(c64, "exact", rules=False)
    assert _rel(got, ref) <= DET_REL_F64


def test_probe_cache_reused_and_mode_change_reprobed():
    lc = _build("batchnorm_train")
    m = lc.case.model.double()
    x, y = lc.case.batch_double()
    est = DiagFisher(m, "exact")
    est.step((x, y))
    assert {est.names[i] for i in est._persample.last_plan.generic} == {"0.weight", "0.bias"}
    m.eval()  # running statistics: no coupling any more
    est.step((x, y))
    assert not est._persample.last_plan.generic
    assert len(est._persample._probe_cache) == 2


def _unused_case() -> Callable:
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    return Partial


def test_parameters_not_reaching_logits_are_zero():
    """A layer called in the forward whose output is dropped has a zero Fisher; the layer that
    makes the logits has the single-Linear closed form F_W = sum_n (p_n(1-p_n)) x x_n^2."""
    torch.manual_seed(0)
    m = _unused_case()().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    est = DiagFisher(m, "exact")
    est.step((x, y))
    res = est.result()
    assert float(res["unused.weight"].abs().sum()) == 0.0
    assert float(res["unused.bias"].abs().sum()) == 0.0
    with torch.no_grad():
        p = torch.softmax(m.used(x), -1)
    coef = p * (1 - p)
    ref = {"used.weight": coef.T @ x**2, "used.bias": coef.sum(0)}
    assert _rel({k: res[k] for k in ref}, ref) <= DET_REL_F64


class Switch(nn.Module):
    """Modifies a layer output (and the logits) in place only when ``inplace`` is set."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 4), nn.Linear(4, 3)
        self.inplace = False

    def forward(self, x):
        h = self.a(x)
        if self.inplace:
            h.mul_(torch.tanh(h))
            z = self.head(h)
            return z.clamp_(-0.2, 0.2)
        return self.head(h * torch.tanh(h))


def test_direct_taps_fall_back_when_an_output_is_modified_in_place():
    """Outputs seen unmodified are tapped directly in later steps; if one is then modified in
    place, its parameters take the generic path for that step and the result stays exact."""
    torch.manual_seed(0)
    m = Switch().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    # columns in one batched backward (one column per backward taps every output by an add)
    est = DiagFisher(m, "exact", class_chunk=10**6)
    est.step((x, y))
    assert not est._persample.last_plan.generic
    assert est._persample._direct  # learned: both outputs were left alone
    m.inplace = True
    est.reset()
    est.step((x, y))
    plan = est._persample.last_plan
    assert set(est.names) == {est.names[i] for i in plan.generic}  # both outputs changed
    assert plan.head is None  # the clamped logits are not the head's output any more
    case = Case("switch", m, (x, y), _plain, torch.ones(4, dtype=torch.bool), y, "categorical",
                3)
    assert _rel(dict(est.result().items()), oracle(case, "exact")) <= DET_REL_F64
    est.reset()
    est.step((x, y))  # back to add-taps: everything fast again
    assert not est._persample.last_plan.generic
    assert _rel(dict(est.result().items()), oracle(case, "exact")) <= DET_REL_F64


class Transient(nn.Module):
    """The first layer's output is used once by ops that keep nothing of it (a residual-style
    sum), so it is gone before the engine checks it; ``inplace`` first modifies it in place."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.inplace = False

    def forward(self, x):
        h = self.a(x)
        if self.inplace:
            h.mul_(3.0)
        return self.head(torch.tanh(h * 2.0 + x))


@pytest.mark.parametrize("inplace", [False, True])
def test_outputs_gone_before_the_check_are_held_once_then_decided(inplace):
    torch.manual_seed(0)
    m = Transient().double()
    m.inplace = inplace
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    case = Case("transient", m, (x, y), _plain, torch.ones(6, dtype=torch.bool), y,
                "categorical", 3)
    ref = oracle(case, "exact")
    est = DiagFisher(m, "exact", class_chunk=10**6)  # batched columns: direct taps are learned
    key = (id(m.a), 0)
    for step in range(3):
        est.reset()
        est.step((x, y))
        assert not est._persample.last_plan.generic
        assert _rel(dict(est.result().items()), ref) <= DET_REL_F64
        if step == 0:  # gone: held alive in the next step
            assert key in est._persample._hold and key not in est._persample._direct
    eng = est._persample
    assert (key in eng._direct) is (not inplace)
    assert (key in eng._hold) is False
    assert all(t.keep is None for c in eng.last_plan.calls for t in c.taps)


class Sometimes(nn.Module):
    """Uses its first weight outside the layer call as well when ``extra`` is set, and mixes the
    samples when ``center`` is set."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 4), nn.Linear(4, 3)
        self.extra = self.center = False

    def forward(self, x):
        h = self.a(x)
        if self.extra:
            h = h + x[:, :4] * self.a.weight[:, 0]
        if self.center:
            h = h - h.mean(0, keepdim=True)
        return self.head(torch.tanh(h))


def test_plans_are_reused_per_structure_and_rebuilt_when_it_changes():
    """A step with the structure of an earlier one reuses its plan, bound to this step's calls; a
    parameter used outside its layer in some steps only, or a batch that can show coupling after a
    batch of one (nothing to probe), changes the structure; the result stays exact in every step.
    (The coupling verdict itself is kept per structure of the captured calls: a forward that mixes
    the samples in some steps only is not supported, hence one estimator per phase here.)"""
    gen = torch.Generator().manual_seed(1)
    for center, phases in (
        (False, [(False, 4, set()), (True, 4, {"a.weight"}), (False, 4, set()),
                 (False, 3, set())]),
        (True, [(False, 1, set()), (False, 6, {"a.weight", "a.bias"})]),
    ):
        torch.manual_seed(0)
        m = Sometimes().double()
        m.center = center
        est = DiagFisher(m, "exact")
        eng = est._persample
        prev: list = []
        for k, (extra, N, expect) in enumerate(phases):
            m.extra = extra
            x = torch.randn(N, 5, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (N,), generator=gen)
            est.reset()
            est.step((x, y))
            plan = eng.last_plan
            assert {est.names[i] for i in plan.generic} == expect, (center, k, plan.reasons)
            if extra:
                assert plan.reasons[est.names.index("a.weight")] == (
                    "used outside the captured layer calls"
                )
            for g in plan.groups:  # bound to this step's calls, not those of the cached step
                assert g.members[0][0].data["x"].shape[0] == N
            if plan.head is not None:
                assert plan.head.data["x"].shape[0] == N
            calls = [c for g in plan.groups for c, _ in g.members]
            assert not any(c is p for c in calls for p in prev)
            prev = calls
            case = Case("sometimes", m, (x, y), _plain, torch.ones(N, dtype=torch.bool), y,
                        "categorical", 3)
            assert _rel(dict(est.result().items()), oracle(case, "exact")) <= DET_REL_F64, k
        # plain and extra (the 3-sample batch reuses the plain plan); batch of 1, then of 6
        assert len(eng._plans) == 2


def test_generic_parameters_are_logged_once_with_reasons(caplog):
    lc = _build("unknown_module")
    est = DiagFisher(lc.case.model, "exact")
    with caplog.at_level("INFO", logger="fimfast.persample"):
        est.step(lc.case.batch)
        est.step(lc.case.batch)
    lines = [r.getMessage() for r in caplog.records if r.name == "fimfast.persample"]
    assert len(lines) == 1
    assert "scale.s: no rule for its module" in lines[0]


@pytest.mark.parametrize("hw", [(7, 9), (5, 5), (1, 6)])
@pytest.mark.parametrize("k", [(1, 1), (3, 2), (1, 3)])
@pytest.mark.parametrize("d", [(1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("s", [(1, 1), (2, 3)])
def test_unfold_view_equals_torch_unfold(hw, k, d, s):
    H, W = hw
    if (k[0] - 1) * d[0] + 1 > H or (k[1] - 1) * d[1] + 1 > W:
        pytest.skip("kernel larger than the input")
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = _unfold(x, k, d, s)
    assert torch.equal(got, torch.nn.functional.unfold(x, k, dilation=d, stride=s))
