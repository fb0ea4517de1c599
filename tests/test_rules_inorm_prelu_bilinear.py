"""The rules of ``nn.InstanceNorm1d/2d/3d``, ``nn.PReLU`` and ``nn.Bilinear`` against the
float64 brute-force oracle (tests/oracle.py), and against the generic path for MONTE_CARLO.

Each layer appears first in the model, in the middle, reused twice, on sequences with padded
token logits ``(N, T, C)``, in train and eval mode, with a frozen weight or bias; each case also
states which parameters the plan must leave on the generic path (none, unless the case is about
a refusal), so a rule that silently stops applying fails here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from cases import Case
from oracle import oracle, rel_error
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn

import fimfast
from fimfast import DiagFisher
from fimfast.rules import BilinearRule, InstanceNormRule, PReLURule, rule_for


# --------------------------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------------------------- #
class Head(nn.Module):
    """``body`` then tanh, flatten and a Linear head sized on first use."""

    def __init__(self, body: nn.Module, x: torch.Tensor, C: int):
        super().__init__()
        self.body = body
        with torch.no_grad():
            n = body(x[:1]).numel()
        self.head = nn.Linear(n, C)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


class Twice(nn.Module):
    """``inner`` applied twice (one module, two calls) between two Linear layers."""

    def __init__(self, inner: nn.Module, d: int, C: int, chan: bool = False):
        super().__init__()
        self.a, self.inner, self.head, self.chan = nn.Linear(d, d), inner, nn.Linear(d, C), chan

    def forward(self, x):
        h = self.a(x)
        if self.chan:  # (N, d) -> (N, d, 1): InstanceNorm1d over positions of length 2
            h = torch.stack([h, h.sin()], -1)
        h = self.inner(torch.tanh(self.inner(h)))
        return self.head(h.mean(-1) if self.chan else h)


class TokenModel(nn.Module):
    """``(N, T, d)`` sequences, ``layer`` in the middle, token logits ``(N, T, C)``.

    ``how``: ``inorm`` (InstanceNorm1d over the positions, channels = features), ``prelu``,
    ``bilinear`` (the features and their sine), ``prelu_sf`` (the layer sees ``(T, N, d)``)."""

    def __init__(self, layer: nn.Module, how: str, d: int, C: int):
        super().__init__()
        self.inp, self.layer, self.how, self.head = nn.Linear(d, d), layer, how, None
        self.head = nn.Linear(layer.out_features if how == "bilinear" else d, C)

    def forward(self, x, attention_mask=None):
        h = self.inp(x)
        if self.how == "inorm":
            h = self.layer(h.transpose(1, 2)).transpose(1, 2)
        elif self.how == "bilinear":
            h = self.layer(h, h.sin())
        elif self.how == "prelu_sf":
            h = self.layer(h.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.layer(h)
        return self.head(torch.tanh(h))


class BilinearFirst(nn.Module):
    """Bilinear on two slices of the input, first layer; optionally the logits layer too."""

    def __init__(self, C: int, as_head: bool):
        super().__init__()
        self.b = nn.Bilinear(3, 2, C if as_head else 4)
        self.head = None if as_head else nn.Linear(4, C)

    def forward(self, x):
        y = self.b(x[:, :3], x[:, 3:])
        return y if self.head is None else self.head(torch.tanh(y))


class BilinearGrid(nn.Module):
    """Bilinear over ``(N, T1, T2, I)``: two shared leading dims, then mean pooling."""

    def __init__(self, C: int):
        super().__init__()
        self.b, self.head = nn.Bilinear(3, 3, 4, bias=False), nn.Linear(4, C)

    def forward(self, x):
        return self.head(torch.tanh(self.b(x, x.cos())).mean((1, 2)))


class BilinearTwice(nn.Module):
    """One Bilinear called twice: on a tensor paired with itself, then on two tensors."""

    def __init__(self, C: int):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Bilinear(4, 4, 4), nn.Linear(4, C)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h, h))
        return self.head(self.b(h, x))


class PReLUVector(nn.Module):
    """PReLU on a 1-D input ``(N,)`` (one channel, torch's semantics for fewer than 2 dims)."""

    def __init__(self, C: int):
        super().__init__()
        self.a, self.act, self.head = nn.Linear(5, 1), nn.PReLU(), nn.Linear(1, C)

    def forward(self, x):
        return self.head(self.act(self.a(x).squeeze(-1)).unsqueeze(-1))


class AllThree(nn.Module):
    """Bilinear, PReLU per channel and InstanceNorm1d over two positions, then a head."""

    def __init__(self):
        super().__init__()
        self.b, self.p = nn.Bilinear(4, 3, 5), nn.PReLU(5, init=0.3)
        self.n, self.o = nn.InstanceNorm1d(5, affine=True), nn.Linear(5, 3)

    def forward(self, x):
        h = self.p(self.b(x, x[..., :3].sin()))
        return self.o(self.n(torch.stack([h, h.cos()], -1)).mean(-1))


class PerSampleNorm(nn.Module):
    """InstanceNorm1d called on every sample's ``(C, L)`` alone (unbatched inputs)."""

    def __init__(self, C: int):
        super().__init__()
        self.norm, self.head = nn.InstanceNorm1d(3, affine=True), nn.Linear(12, C)

    def forward(self, x):
        h = torch.stack([self.norm(x[n]) for n in range(x.shape[0])])
        return self.head(torch.tanh(h).flatten(1))


# --------------------------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------------------------- #
@dataclass
class LayerCase:
    case: Case
    generic: set[str] = field(default_factory=set)  # parameters expected on the generic path


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _simple(name: str, model: nn.Module, x: torch.Tensor, C: int) -> Case:
    N = x.shape[0]
    y = torch.randint(0, C, (N,), generator=_gen(1))
    return Case(name, model, (x, y), lambda m, b: m(b[0]), torch.ones(N, dtype=torch.bool), y,
                "categorical", C)


def _token(name: str, model: nn.Module, N: int, T: int, d: int, C: int) -> Case:
    x = _rand(N, T, d)
    mask = torch.ones(N, T, dtype=torch.long)
    for n in range(N):
        mask[n, 2 + n % (T - 1):] = 0
    labels = torch.randint(0, C, (N, T), generator=_gen(2))
    labels[mask == 0] = -100
    labels[0, 1] = -100  # an ignored real token too
    batch = {"x": x, "attention_mask": mask, "labels": labels}
    valid = (mask != 0) & (labels != -100)

    def logits(m, b):
        return m(b["x"], b["attention_mask"])

    return Case(name, model, batch, logits, valid, labels, "categorical", C)


def _stats(norm: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial values."""
    with torch.no_grad():
        c = norm.num_features
        if norm.track_running_stats:
            norm.running_mean.copy_(torch.linspace(-0.3, 0.4, c))
            norm.running_var.copy_(torch.linspace(0.5, 2.0, c))
        norm.weight.copy_(torch.linspace(0.7, 1.3, c))
        norm.bias.copy_(torch.linspace(-0.2, 0.2, c))
    return norm


def _build(name: str) -> LayerCase:  # noqa: C901 - one branch per case
    torch.manual_seed(0)
    if name == "inorm2d_first_eval_stats":
        x = _rand(4, 2, 5, 5)
        body = nn.Sequential(_stats(nn.InstanceNorm2d(2, affine=True, track_running_stats=True)),
                             nn.Conv2d(2, 3, 3))
        return LayerCase(_simple(name, Head(body, x, 3).eval(), x, 3))
    if name in ("inorm2d_mid_train_stats", "inorm2d_mid_eval_stats"):
        x = _rand(4, 2, 5, 5)
        body = nn.Sequential(nn.Conv2d(2, 3, 3),
                             _stats(nn.InstanceNorm2d(3, affine=True, track_running_stats=True)))
        return LayerCase(_simple(name, Head(body, x, 3).train("train" in name), x, 3))
    if name == "inorm1d_no_stats_frozen_bias":
        x = _rand(3, 2, 6)
        norm = _stats(nn.InstanceNorm1d(4, affine=True))
        norm.bias.requires_grad_(False)
        body = nn.Sequential(nn.Conv1d(2, 4, 2), norm)
        return LayerCase(_simple(name, Head(body, x, 3).eval(), x, 3))
    if name == "inorm3d_frozen_weight":
        x = _rand(3, 2, 3, 3, 4)
        norm = _stats(nn.InstanceNorm3d(2, affine=True))
        norm.weight.requires_grad_(False)
        return LayerCase(_simple(name, Head(norm, x, 3).train(), x, 3))
    if name == "inorm1d_twice":
        m = Twice(_stats(nn.InstanceNorm1d(4, affine=True)), 4, 3, chan=True)
        return LayerCase(_simple(name, m, _rand(4, 4), 3))
    if name == "inorm1d_token":
        return LayerCase(_token(name, TokenModel(_stats(nn.InstanceNorm1d(4, affine=True)),
                                                 "inorm", 4, 3), 3, 4, 4, 3))
    if name == "inorm1d_unbatched":
        m = PerSampleNorm(3)
        return LayerCase(_simple(name, m, _rand(3, 3, 4), 3), {"norm.weight", "norm.bias"})
    if name == "prelu_first_zeros":
        x = _rand(4, 5)
        x[0, :2] = 0.0  # x == 0: the weight's gradient there is 0 (F.prelu's backward)
        x[2, 3] = 0.0
        m = nn.Sequential(nn.PReLU(init=0.3), nn.Linear(5, 4), nn.PReLU(4, init=0.2),
                          nn.Linear(4, 3))
        return LayerCase(_simple(name, m, x, 3))
    if name == "prelu_conv_channels":
        x = _rand(3, 2, 4, 4)
        body = nn.Sequential(nn.Conv2d(2, 3, 2), nn.PReLU(3, init=0.1), nn.Conv2d(3, 2, 2),
                             nn.PReLU(init=-0.2))
        return LayerCase(_simple(name, Head(body, x, 3), x, 3))
    if name == "prelu_twice":
        return LayerCase(_simple(name, Twice(nn.PReLU(5, init=0.4), 5, 3), _rand(4, 5), 3))
    if name == "prelu_token":
        return LayerCase(_token(name, TokenModel(nn.PReLU(init=0.2), "prelu", 4, 3),
                                3, 4, 4, 3))
    if name == "prelu_seq_first":  # the layer's batch dim is 1 (found by the probe)
        return LayerCase(_token(name, TokenModel(nn.PReLU(init=0.2), "prelu_sf", 4, 3),
                                3, 4, 4, 3))
    if name == "prelu_vector":
        return LayerCase(_simple(name, PReLUVector(3), _rand(4, 5), 3))
    if name == "prelu_frozen":
        m = nn.Sequential(nn.Linear(5, 4), nn.PReLU(4), nn.Linear(4, 3))
        m[1].weight.requires_grad_(False)
        return LayerCase(_simple(name, m, _rand(4, 5), 3))
    if name == "bilinear_first":
        return LayerCase(_simple(name, BilinearFirst(3, as_head=False), _rand(4, 5), 3))
    if name == "bilinear_head":
        return LayerCase(_simple(name, BilinearFirst(3, as_head=True), _rand(4, 5), 3))
    if name == "bilinear_twice_same_input":
        return LayerCase(_simple(name, BilinearTwice(3), _rand(4, 4), 3))
    if name == "bilinear_token":
        return LayerCase(_token(name, TokenModel(nn.Bilinear(4, 4, 5), "bilinear", 4, 3),
                                3, 4, 4, 3))
    if name == "bilinear_grid_nobias":
        return LayerCase(_simple(name, BilinearGrid(3), _rand(3, 2, 3, 3), 3))
    if name == "bilinear_frozen_weight":
        m = BilinearFirst(3, as_head=False)
        m.b.weight.requires_grad_(False)
        return LayerCase(_simple(name, m, _rand(4, 5), 3))
    if name == "bilinear_prelu_frozen":  # no trainable parameter in either: nothing tapped
        m = AllThree()
        for p in (*m.b.parameters(), *m.p.parameters()):
            p.requires_grad_(False)
        return LayerCase(_simple(name, m, _rand(4, 4), 3))
    raise KeyError(name)


NAMES = [
    "inorm2d_first_eval_stats", "inorm2d_mid_train_stats", "inorm2d_mid_eval_stats",
    "inorm1d_no_stats_frozen_bias", "inorm3d_frozen_weight", "inorm1d_twice", "inorm1d_token",
    "inorm1d_unbatched", "prelu_first_zeros", "prelu_conv_channels", "prelu_twice",
    "prelu_token", "prelu_seq_first", "prelu_vector", "prelu_frozen", "bilinear_first",
    "bilinear_head", "bilinear_twice_same_input", "bilinear_token", "bilinear_grid_nobias",
    "bilinear_frozen_weight", "bilinear_prelu_frozen",
]


def run(case: Case, fim_type: str, rules: bool = True, **opts) -> tuple[dict, DiagFisher]:
    est = DiagFisher(case.model, fim_type, likelihood=case.likelihood, class_dim=-1, seed=7,
                     **opts)
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


def _check_plan(est: DiagFisher, lc: LayerCase) -> None:
    plan = est._persample.last_plan
    generic = {est.names[i] for i in plan.generic}
    assert generic == lc.generic, plan.reasons
    fast = {est.names[i] for i in plan.fast}
    assert fast | generic | {est.names[i] for i in plan.unused} == set(est.names)


# --------------------------------------------------------------------------------------------- #
# exactness
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_matches_oracle_f64(name, fim_type):
    lc, ref = _with_oracle(name, fim_type)
    got, est = run(lc.case.to(torch.float64), fim_type)
    assert rel_error(got, ref) <= DET_REL_F64
    _check_plan(est, lc)


EVAL = ["inorm1d_twice", "inorm1d_token", "prelu_conv_channels", "prelu_seq_first",
        "bilinear_token", "bilinear_twice_same_input"]


@pytest.mark.parametrize("name", EVAL, ids=EVAL)
def test_eval_mode_matches_oracle_f64(name):
    """The cases above run in train mode (modules' default); the same in eval mode (InstanceNorm
    without running statistics normalises by the input's in both)."""
    lc = _build(name)
    lc.case.model.eval()
    ref = oracle(lc.case, "exact")
    got, est = run(lc.case.to(torch.float64), "exact")
    assert not est.model.training
    assert rel_error(got, ref) <= DET_REL_F64
    _check_plan(est, lc)


F32 = ["inorm2d_mid_train_stats", "inorm1d_token", "prelu_conv_channels", "prelu_token",
       "bilinear_token", "bilinear_head"]


@pytest.mark.parametrize("name", F32, ids=F32)
def test_float32_matches_oracle(name):
    lc, ref = _with_oracle(name, "exact")
    got, est = run(lc.case, "exact")
    assert all(v.dtype == torch.float32 for v in got.values())
    assert rel_error(got, ref) <= DET_REL_F32
    _check_plan(est, lc)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_monte_carlo_matches_generic_f64(name):
    lc = _build(name)
    c64 = lc.case.to(torch.float64)
    got, _ = run(c64, "monte_carlo", num_probes=3)
    ref, est = run(c64, "monte_carlo", rules=False, num_probes=3)
    assert not est._persample.last_plan.groups  # the reference really is the generic path
    assert rel_error(got, ref) <= DET_REL_F64


@pytest.mark.parametrize("name", ["bilinear_token", "bilinear_grid_nobias",
                                  "bilinear_twice_same_input"])
def test_bilinear_products_formed_by_pieces(name, monkeypatch):
    """Bilinear's input side formed a few samples at a time (a Patches), as for long sequences:
    the same estimate."""
    from fimfast.rules import linear

    monkeypatch.setattr(linear, "BILINEAR_DENSE_BYTES", 0)
    monkeypatch.setattr(linear.chunks, "patch_samples", lambda per_sample: 2)
    made = []
    real = linear.Patches.__init__

    def spy(self, *args, **kw):
        made.append(1)
        real(self, *args, **kw)

    monkeypatch.setattr(linear.Patches, "__init__", spy)
    lc, ref = _with_oracle(name, "exact")
    got, est = run(lc.case.to(torch.float64), "exact")
    assert rel_error(got, ref) <= DET_REL_F64
    assert made or name == "bilinear_twice_same_input"  # T == 1 there: one tensor
    _check_plan(est, lc)


def test_rules_are_the_built_in_ones():
    assert isinstance(rule_for(nn.InstanceNorm1d(3, affine=True)), InstanceNormRule)
    assert isinstance(rule_for(nn.InstanceNorm3d(3, affine=True)), InstanceNormRule)
    assert rule_for(nn.InstanceNorm2d(3)) is None  # no affine: no parameters
    assert isinstance(rule_for(nn.PReLU(4)), PReLURule)
    assert isinstance(rule_for(nn.Bilinear(2, 3, 4)), BilinearRule)
    assert {"_InstanceNorm", "PReLU", "Bilinear"} <= set(fimfast.rules.known_modules())


def test_unbatched_instance_norm_refused_with_reason():
    lc = _build("inorm1d_unbatched")
    _, est = run(lc.case.to(torch.float64), "exact")
    plan = est._persample.last_plan
    reasons = {est.names[i]: plan.reasons[i] for i in plan.generic}
    assert "unbatched input of shape (3, 4)" in reasons["norm.weight"]


# --------------------------------------------------------------------------------------------- #
# state
# --------------------------------------------------------------------------------------------- #
def test_running_statistics_and_modes_left_as_they_were():
    """Train mode with running statistics: torch's forward updates them, the rule never does,
    and the step puts them back; a second step gives the same estimate."""
    lc = _build("inorm2d_mid_train_stats")
    model = lc.case.model
    norm = model.body[1]
    before = (norm.running_mean.clone(), norm.running_var.clone(),
              norm.num_batches_tracked.clone())
    est = DiagFisher(model, "exact")
    est.step(lc.case.batch)
    first = {k: v.clone() for k, v in est.result().items()}
    assert torch.equal(norm.running_mean, before[0])
    assert torch.equal(norm.running_var, before[1])
    assert torch.equal(norm.num_batches_tracked, before[2])
    assert model.training and norm.training
    est.step(lc.case.batch)
    for k, v in est.result().items():
        torch.testing.assert_close(v, 2 * first[k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["inorm2d_mid_eval_stats", "prelu_token", "bilinear_token"])
def test_failed_step_leaves_the_estimate_unchanged(name):
    """A step that raises (labels out of range) after a good one: the accumulated estimate and
    its count of samples stay as the good step left them."""
    lc = _build(name)
    est = DiagFisher(lc.case.model, "empirical", class_dim=-1)
    est.step(lc.case.batch)
    kept = {k: v.clone() for k, v in est.result().items()}
    n = est.state.count
    batch = lc.case.batch
    if isinstance(batch, dict):
        bad = {**batch, "labels": batch["labels"].masked_fill(batch["labels"] >= 0, 99)}
    else:
        bad = (batch[0], torch.full_like(batch[1], 99))
    with pytest.raises(ValueError, match="label"):
        est.step(bad)
    assert est.state.count == n
    for k, v in est.result().items():
        assert torch.equal(v, kept[k]), k


# --------------------------------------------------------------------------------------------- #
# the structured Fishers
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("layer,label", [
    (nn.InstanceNorm1d(6, affine=True), "InstanceNorm1d"),
    (nn.PReLU(6), "PReLU"),
])
@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_kronecker_representations_refuse_naming_the_module(layer, label, rep):
    model = nn.Sequential(nn.Linear(5, 6), layer, nn.Linear(6, 4))
    if label == "InstanceNorm1d":
        model = nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (6, 1)), layer, nn.Flatten(),
                              nn.Linear(6, 4))
    data = [(torch.randn(6, 5, generator=_gen()), torch.randint(0, 4, (6,), generator=_gen()))]
    idx = "2" if label == "InstanceNorm1d" else "1"
    with pytest.raises(ValueError, match=rf"module '{idx}' \({label}\).*'{idx}.weight'"):
        fimfast.fisher(model, data, representation=rep)


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
def test_kronecker_representations_refuse_bilinear(rep):
    lc = _build("bilinear_first")
    x, y = lc.case.batch
    with pytest.raises(ValueError, match=r"module 'b' \(Bilinear\).*'b.weight', 'b.bias'"):
        fimfast.fisher(lc.case.model, [(x, y)], representation=rep)


@pytest.mark.parametrize("name", ["inorm2d_mid_eval_stats", "prelu_conv_channels",
                                  "bilinear_first"])
def test_diag_representation_uses_the_rules(name):
    lc, ref = _with_oracle(name, "exact")
    c64 = lc.case.to(torch.float64)
    got = fimfast.fisher(c64.model, [c64.batch], representation="diag", reduction="sum")
    assert rel_error(got, ref) <= DET_REL_F64


@pytest.mark.parametrize("rep", ["dense", "block_diag", "low_rank", "diag"])
def test_gradient_representations_take_the_three_layers(rep):
    """The representations made of per-sample gradients (or of the diagonal) need no rule: their
    diagonal is the float64 oracle's."""
    torch.manual_seed(0)
    case = _simple("all_three", AllThree(), _rand(5, 4), 3).to(torch.float64)
    ref = torch.cat([v.reshape(-1) for v in oracle(case, "exact").values()])
    F_ = fimfast.fisher(case.model, [case.batch], representation=rep, reduction="sum")
    got = F_.to_vector() if rep == "diag" else F_.to_dense().diagonal()
    assert float((got - ref).norm() / ref.norm()) <= DET_REL_F64
