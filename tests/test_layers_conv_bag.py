"""The rules of Conv3d, ConvTranspose1d/2d/3d and EmbeddingBag against the float64 oracle.

Every case runs in float64 and must equal the oracle (tests/oracle.py) to rounding for EXACT and
EMPIRICAL, and the generic path with the same seed for MONTE_CARLO; its plan must put no parameter
on the generic path (a rule that fell back would pass the value check but fail this one). The
cases cover groups, stride, dilation, padding modes, output padding and ``output_size``, batch of
one, every bag mode with and without ``padding_idx``, per-sample weights, offsets (with
``include_last_offset``), repeated ids, empty bags, a bag reused or tied to other layers (the
squares of its columns must then not be merged, see fimfast/rules/embedding.py), token-level
logits, and other rule-handled layers around.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from cases import Case
from oracle import oracle
from test_layers import ConvHead, _gen, _plan_names, _rand, _rel, _simple, run
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast.rules import ConvRule, ConvTransposeRule, EmbeddingBagRule, rule_for
from fimfast.rules.conv import _unfold


# --------------------------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------------------------- #
class OutputSize(nn.Module):
    """A transposed convolution called with ``output_size`` (its output padding is inferred)."""

    def __init__(self):
        super().__init__()
        self.ct = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.ct(x, output_size=[2 * x.shape[2], 2 * x.shape[3]])


class Decoder(nn.Module):
    """Conv2d, BatchNorm (eval), ConvTranspose2d, GroupNorm, ConvTranspose2d: rules around."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
            nn.GroupNorm(2, 6), nn.Tanh(), nn.ConvTranspose2d(6, 2, 2, stride=1, bias=False),
        )

    def forward(self, x):
        return self.body(x)


class Bag(nn.Module):
    """``bag(ids, offsets, per_sample_weights)`` - tanh - Linear, optionally called twice."""

    def __init__(self, bag: nn.EmbeddingBag, C: int = 3, twice: bool = False):
        super().__init__()
        self.bag, self.twice = bag, twice
        self.head = nn.Linear(bag.embedding_dim * (2 if twice else 1), C)

    def forward(self, ids, offsets=None, psw=None):
        h = self.bag(ids, offsets, per_sample_weights=psw)
        if self.twice:  # a reused table: the two calls' gradients add before the square
            h = torch.cat([h, self.bag((ids + 1) % 7, offsets, per_sample_weights=psw)], -1)
        return self.head(torch.tanh(h))


class BagTiedHead(nn.Module):
    """The bag's table is also the output layer: ``(N, V)`` logits."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode="sum")
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.bag.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.lin(self.bag(ids))))


class BagAndTokens(nn.Module):
    """Token-level logits: an ``nn.Embedding`` per token plus the sequence's bag, then a
    LayerNorm, a Linear and a head per token. With ``tied`` the two tables are one."""

    def __init__(self, mode: str, tied: bool = False):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=0)
        self.emb = nn.Embedding(7, 4)
        if tied:
            self.emb.weight = self.bag.weight
        self.norm, self.lin, self.head = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, ids, attention_mask=None):
        h = self.norm(self.emb(ids) + self.bag(ids).unsqueeze(1))
        return self.head(torch.tanh(self.lin(h)))


# --------------------------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------------------------- #
def _kw_case(name, model, inputs: dict, C: int, N: int) -> Case:
    y = torch.randint(0, C, (N,), generator=_gen(1))
    batch = {**inputs, "labels": y}

    def fwd(m, b):
        return m(**{k: v for k, v in b.items() if k != "labels"})

    return Case(name, model, batch, fwd, torch.ones(N, dtype=torch.bool), y, "categorical", C)


IDS = torch.tensor([[1, 3, 3, 0, 5], [2, 2, 2, 2, 2], [0, 0, 6, 1, 0], [6, 1, 6, 3, 4]])
FLAT = torch.tensor([1, 3, 3, 0, 2, 6, 6, 0, 4, 5, 1, 1])  # bags [0:3] [3:3] (empty) [3:8] [8:]
OFFSETS = torch.tensor([0, 3, 3, 8])


def build(name: str) -> Case:
    torch.manual_seed(0)
    if name == "conv3d_groups_stride_dilation":
        body = nn.Conv3d(4, 6, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1),
                         dilation=(2, 1, 1), groups=2)
        x = _rand(3, 4, 5, 5, 4)
        return _simple(name, ConvHead(body, x, 3), x, 3)
    if name == "conv3d_circular_nobias":
        body = nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular", bias=False)
        x = _rand(2, 2, 4, 3, 5)
        return _simple(name, ConvHead(body, x, 3), x, 3)
    if name == "conv3d_same_reflect_n1":
        body = nn.Sequential(nn.Conv3d(2, 3, 2, padding="same", padding_mode="reflect"),
                             nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(3, 2, 1))
        x = _rand(1, 2, 4, 4, 5)
        return _simple(name, ConvHead(body, x, 3), x, 3)
    if name == "convT1d_groups_outpad":
        body = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        x = _rand(3, 4, 5)
        return _simple(name, ConvHead(body, x, 3), x, 3)
    if name == "convT2d_stride_dilation":
        body = nn.ConvTranspose2d(4, 3, (3, 2), stride=(2, 3), padding=(1, 0),
                                  output_padding=(0, 2), dilation=(1, 2))
        x = _rand(3, 4, 4, 3)
        return _simple(name, ConvHead(body, x, 4), x, 4)
    if name == "convT2d_outpad_by_dilation":  # output padding >= stride, < dilation
        body = nn.ConvTranspose2d(3, 2, 3, padding=2, dilation=3, output_padding=2)
        x = _rand(2, 3, 5, 4)
        return _simple(name, ConvHead(body, x, 3), x, 3)
    if name == "convT2d_output_size_n1":
        x = _rand(1, 3, 3, 4)
        return _simple(name, ConvHead(OutputSize(), x, 3), x, 3)
    if name == "convT3d_groups_nobias":
        body = nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2, bias=False)
        x = _rand(2, 2, 2, 3, 2)
        return _simple(name, ConvHead(body, x, 3), x, 3)
    if name == "decoder_with_norms":
        m = ConvHead(Decoder(), _rand(3, 2, 7, 7), 3)
        m.eval()  # BatchNorm with running statistics: the samples stay apart
        return _simple(name, m, _rand(3, 2, 7, 7), 3)
    if name.startswith("bag_"):
        return _bag_case(name)
    raise KeyError(name)


def _bag_case(name: str) -> Case:
    _, mode, how, *rest = name.split("_")  # bag_<mode>_<2d|offsets|last|psw...>[_pad|_twice|_n1]
    pad = 0 if "pad" in rest else None
    if how == "tiedhead":
        return _simple(name, BagTiedHead(), IDS, 7)
    if how == "tokens":
        m = BagAndTokens(mode, tied="tied" in rest)
        labels = torch.randint(0, 3, IDS.shape, generator=_gen(2))
        mask = (IDS != 0).long()
        labels[mask == 0] = -100
        batch = {"ids": IDS, "attention_mask": mask, "labels": labels}

        def fwd(model, b):
            return model(b["ids"])

        return Case(name, m, batch, fwd, labels != -100, labels, "categorical", 3)
    bag = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=pad,
                          include_last_offset=how == "last", max_norm=1.0 if "norm" in rest
                          else None)
    m = Bag(bag, twice="twice" in rest)
    if how == "2d":
        ids = IDS[:1] if "n1" in rest else IDS
        inputs = {"ids": ids}
        if "psw" in rest:
            inputs["psw"] = torch.rand(ids.shape, generator=_gen(3)) + 0.5
        return _kw_case(name, m, inputs, 3, ids.shape[0])
    offsets = torch.cat([OFFSETS, FLAT.new_tensor([FLAT.numel()])]) if how == "last" else OFFSETS
    inputs = {"ids": FLAT, "offsets": offsets}
    if "psw" in rest:
        inputs["psw"] = torch.rand(FLAT.shape, generator=_gen(3)) + 0.5
    return _kw_case(name, m, inputs, 3, 4)


NAMES = [
    "conv3d_groups_stride_dilation", "conv3d_circular_nobias", "conv3d_same_reflect_n1",
    "convT1d_groups_outpad", "convT2d_stride_dilation", "convT2d_outpad_by_dilation",
    "convT2d_output_size_n1", "convT3d_groups_nobias", "decoder_with_norms",
    "bag_sum_2d", "bag_sum_2d_psw_pad", "bag_sum_offsets_psw", "bag_sum_last_pad_twice",
    "bag_mean_2d_pad", "bag_mean_offsets", "bag_mean_last_twice", "bag_mean_2d_n1",
    "bag_max_2d", "bag_max_offsets_pad", "bag_max_last_pad", "bag_max_2d_twice_norm",
    "bag_sum_tiedhead", "bag_max_tokens", "bag_mean_tokens_tied",
]
EMP = ["conv3d_groups_stride_dilation", "convT1d_groups_outpad", "convT3d_groups_nobias",
       "decoder_with_norms", "bag_sum_offsets_psw", "bag_mean_last_twice", "bag_max_offsets_pad",
       "bag_sum_tiedhead", "bag_max_tokens"]
MC = ["conv3d_circular_nobias", "convT2d_stride_dilation", "decoder_with_norms",
      "bag_mean_2d_pad", "bag_max_2d_twice_norm", "bag_mean_tokens_tied"]

_ORACLE: dict[str, dict] = {}


def _oracle(name: str, quantity: str) -> dict:
    key = f"{name}/{quantity}"
    if key not in _ORACLE:
        _ORACLE[key] = oracle(build(name), quantity)
    return _ORACLE[key]


def _all_fast(est) -> None:
    fast, generic = _plan_names(est)
    assert not generic, est._persample.last_plan.reasons
    assert est._persample.last_plan.groups


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_exact_matches_oracle_f64(name):
    got, est = run(build(name).to(torch.float64), "exact")
    assert _rel(got, _oracle(name, "exact")) <= DET_REL_F64
    _all_fast(est)


@pytest.mark.parametrize("name", EMP, ids=EMP)
def test_empirical_matches_oracle_f64(name):
    got, est = run(build(name).to(torch.float64), "empirical")
    assert _rel(got, _oracle(name, "empirical")) <= DET_REL_F64
    _all_fast(est)


@pytest.mark.parametrize("name", MC, ids=MC)
def test_monte_carlo_matches_generic_f64(name):
    c64 = build(name).to(torch.float64)
    got, est = run(c64, "monte_carlo", num_probes=3)
    _all_fast(est)
    ref, est = run(c64, "monte_carlo", rules=False, num_probes=3)
    assert not est._persample.last_plan.groups  # the reference really is the generic path
    assert _rel(got, ref) <= DET_REL_F64


def test_float32_against_the_oracle():
    """float32 model and inputs (the merged columns of a bag square ``sqrt(sum_m G^2)``)."""
    for name in ("conv3d_groups_stride_dilation", "convT2d_stride_dilation",
                 "bag_mean_offsets", "bag_max_2d"):
        got, _ = run(build(name), "exact")
        assert _rel(got, _oracle(name, "exact")) <= 1e-6, name


def test_the_layers_take_their_rules(caplog):
    """The registry gives these modules their rules, and the engine logs no generic path."""
    assert isinstance(rule_for(nn.Conv3d(1, 1, 1)), ConvRule)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert isinstance(rule_for(cls(1, 1, 1)), ConvTransposeRule)
    for mode in ("sum", "mean", "max"):
        assert isinstance(rule_for(nn.EmbeddingBag(3, 2, mode=mode)), EmbeddingBagRule)
    assert rule_for(nn.EmbeddingBag(3, 2, scale_grad_by_freq=True)) is None
    caplog.set_level(logging.INFO, logger="fimfast.persample")
    case = build("decoder_with_norms")
    run(case, "exact")
    assert not [r for r in caplog.records if "generic path" in r.getMessage()]


def test_ids_past_the_last_offset_take_the_generic_path():
    """``include_last_offset`` with ids after the last offset: torch's forward leaves them out
    and its backward gives them the last bag's gradient; the generic path follows the backward,
    exactly."""
    bag = nn.EmbeddingBag(7, 4, mode="sum", include_last_offset=True)
    off = torch.cat([OFFSETS, FLAT.new_tensor([FLAT.numel() - 2])])
    case = _kw_case("past_last", Bag(bag), {"ids": FLAT, "offsets": off}, 3, 4)
    got, est = run(case.to(torch.float64), "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    _, generic = _plan_names(est)
    assert generic == {"bag.weight"}


def test_unbatched_inputs_take_the_generic_path():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3, self.ct = nn.Conv3d(2, 2, 2), nn.ConvTranspose1d(2, 2, 2)
            self.head = nn.Linear(2 * 2 * 2 * 2 + 2 * 4, 3)

        def forward(self, x):  # (N, 8): one sample per row, the convolutions unbatched
            v = self.c3(x.reshape(-1, 2, 3, 3, 3)[0])  # a batch of one taken from the batch
            s = self.ct(x[:, :6].reshape(-1, 2, 3)[0])
            return self.head(torch.cat([v.reshape(-1), s.reshape(-1)]).expand(x.shape[0], -1)
                             * x[:, :1])

    case = _simple("unbatched", Unbatched(), _rand(2, 54), 3)
    got, est = run(case.to(torch.float64), "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unfold_matches_the_convolution(dims):
    """``W.view(O, -1) @ _unfold(x)`` is the convolution, for 1, 2 and 3 spatial dims, with
    stride and dilation (the 2-D layout is also F.unfold's: tests/test_layers.py)."""
    g = _gen(4)
    size, k, d, s = [(7,), (6, 7), (5, 6, 7)][dims - 1], (3, 2, 2)[:dims], (1, 2, 1)[:dims], \
        (2, 1, 3)[:dims]
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    W = torch.randn(4, 3, *k, generator=g, dtype=torch.float64)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    ref = conv(x, W, stride=s, dilation=d)
    got = W.reshape(4, -1) @ _unfold(x, k, d, s)
    assert torch.allclose(got, ref.reshape(2, 4, -1), rtol=1e-12, atol=1e-12)


def test_bag_squares_with_repeated_ids_hand_computed():
    """One sample, bag ``[2, 2, 5]`` in mean mode, the identity as the rest of the network, the
    gaussian likelihood (unit core matrix): row 2 gets ``(2/3)^2`` and row 5 ``(1/3)^2`` per
    output column (repeated ids add before the square: ``2 (1/3)^2`` would be wrong)."""
    bag = nn.EmbeddingBag(6, 3, mode="mean").double()
    est = fimfast.DiagFisher(bag, "exact", likelihood="gaussian")
    est.step((torch.tensor([[2, 2, 5]]), torch.zeros(1, 3, dtype=torch.float64)))
    F_ = est.result()["weight"]
    want = torch.zeros(6, 3, dtype=torch.float64)
    want[2], want[5] = 4 / 9, 1 / 9
    assert torch.allclose(F_, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("workload", ["conv3d", "convT2d", "bag", "instnorm_cnn", "prelu_mlp",
                                      "bilinear"])
def test_benchmark_workloads_take_the_rules(workload):
    """The float32 models of benchmarks/bench_layers.py: with the rules and without them (the
    generic path) the estimates agree, and the rules leave no parameter on the generic path
    (checked inside ``methods``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_layers

    model, batch = bench_layers.build(workload, N=3)
    calls = bench_layers.methods(model, batch)
    assert {"train", "exact", "exact_generic", "hutchinson"} <= set(calls)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_bags_match_the_generic_path(mode):
    """Flat ids with every bag empty, and with empty bags next to full ones."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.lin = nn.EmbeddingBag(5, 3, mode=mode), nn.Linear(3, 3)

        def forward(self, ids, offsets):
            return self.lin(torch.tanh(self.bag(ids, offsets)) + 0.1)

    torch.manual_seed(0)
    for ids, offsets in ((torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
                         (torch.tensor([1, 1, 4]), torch.tensor([0, 0, 3]))):
        case = _kw_case("empty", Net(), {"ids": ids, "offsets": offsets}, 3, 3).to(torch.float64)
        got, est = run(case, "exact")
        _, generic = _plan_names(est)
        assert not generic
        ref, _ = run(case, "exact", rules=False)
        assert _rel(got, ref) <= DET_REL_F64  # the head is never zero
        assert torch.equal(got["bag.weight"] == 0, ref["bag.weight"] == 0)  # untouched rows
