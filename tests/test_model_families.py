"""Model families beyond the panel (tests/cases.py) and the differential fuzzer: in-place ops,
checkpointing, weight tying, layer subclasses and hooks, resampling layers, attention masks,
routing, samples coupled or split across the batch, cell loops, changing shapes between steps.

Every family is a tiny float64 model checked against the float64 oracle (tests/oracle.py). The
families the layer rules estimate today are pinned to the rules' path (``check_fast_twice``: a
regression to the generic path fails); the others must stay exact on the generic path, their
parameters on it only for the reason named (docs/exactness.md). Refused families must fail with an
error naming the cause and leave the accumulated state as it was. The HUTCHINSON mean over many
probes approaches EXACT on a few families, and the structured representations are exact
(``dense``) or refuse layers whose map they do not model (``kfac``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from cases import Case, Fn, check_fast_twice, check_monte_carlo_same_seed, classifier_case, run_case
from oracle import core_matrix, oracle, oracle_flat, rel_error, row_jacobians
from tolerances import DET_REL_F64, STAT_SIGMAS
from torch import nn

import fimfast

N = 5


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward rescales and shifts the output."""

    def forward(self, x):
        return super().forward(x) * 2.0 + 0.1


class SquaredInputLinear(nn.Linear):
    """A Linear subclass whose forward feeds the layer the squared input."""

    def forward(self, x):
        return F.linear(x * x, self.weight, self.bias)


class StdConv2d(nn.Conv2d):
    """Weight-standardized convolution (as in BiT ResNets)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias)


class MoE(nn.Module):
    """Top-k gated mixture of experts: each sample goes through the experts its gate picks."""

    def __init__(self, d: int = 6, experts: int = 3, C: int = 4, k: int = 1):
        super().__init__()
        self.gate, self.o, self.k = nn.Linear(d, experts), nn.Linear(d, C), k
        self.ex = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x):
        top, idx = torch.softmax(self.gate(x), -1).topk(self.k, -1)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.ex):
            sel = (idx == e).any(-1).nonzero().squeeze(-1)
            if sel.numel():
                w = (top * (idx == e)).sum(-1)[sel].unsqueeze(-1)
                out = out.index_add(0, sel, w * ex(x[sel]))
        return self.o(torch.tanh(out))


class GradScale(torch.autograd.Function):
    """Identity forward, backward scaled by -3 (a gradient-reversal layer)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -3.0 * g


def _inplace(s, x):
    h = s.a(x)
    h += x
    h = torch.tanh(h)
    h2 = s.b(h)
    h2.mul_(0.5)
    h2.add_(h)
    return s.o(h2)


def _sdpa(s, x, mode):
    q, k, v = s.qkv(x).chunk(3, -1)
    T = x.shape[1]
    if mode == "causal":
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = torch.randn(T, T, generator=_gen(1), dtype=x.dtype)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return s.o(a.mean(1))


def _decoder(s, x):
    mask = nn.Transformer.generate_square_subsequent_mask(2, dtype=x.dtype)
    return s.o(s.d(s.i(x[:, :2]), s.i(x), tgt_mask=mask).mean(1))


def _bag(s, ids):
    lens = ids[:, 0] % 3 + 1
    flat = torch.cat([ids[i, :n] for i, n in enumerate(lens.tolist())])
    off = torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]])
    return s.o(torch.tanh(s.e(flat, off)))


def _cells(s, x):
    h = None
    for t in range(x.shape[1]):
        h = s.c(x[:, t], h)
    return s.o(h if isinstance(s.c, nn.GRUCell) else h[0])


def _hooked(kind: str) -> nn.Module:
    m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    if kind == "pre":
        m[2].register_forward_pre_hook(lambda mod, args: (args[0] * 2.0 + 0.3,))
    else:
        m[0].register_forward_hook(lambda mod, args, out: out * 3.0)
    return m


def _lin(a: int, b: int, C: int = 3) -> dict:
    return {"a": nn.Linear(a, b), "o": nn.Linear(b, C)}


def _conv_seq(*mid: nn.Module, flat: int) -> nn.Module:
    return nn.Sequential(*mid, nn.Flatten(), nn.Linear(flat, 3))


def _x(*shape):
    return torch.randn(*shape, generator=_gen(11))


def _ids(V: int, T: int = 4):
    return torch.randint(0, V, (N, T), generator=_gen(12))


IMG = (N, 2, 4, 4)
# name -> (model builder, input builder, classes)
FAMILIES = {
    # a cell looped over time: one call per step, the steps summed before the square
    "gru_cell_loop": (lambda: Fn(_cells, c=nn.GRUCell(4, 5), o=nn.Linear(5, 3)),
                      lambda: _x(N, 3, 4), 3),
    "lstm_cell_loop": (lambda: Fn(_cells, c=nn.LSTMCell(4, 5), o=nn.Linear(5, 3)),
                       lambda: _x(N, 3, 4), 3),
    # the segment's layers are tapped in the forward, its recomputation left as it is
    "checkpoint_nonreentrant": (lambda: Fn(lambda s, x: s.o(torch.tanh(
        ckpt.checkpoint(s.blk, x, use_reentrant=False) + x)), o=nn.Linear(6, 3),
        blk=nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))), lambda: _x(N, 6), 3),
    "checkpoint_conv_batchnorm_eval": (lambda: Fn(lambda s, x: s.o(ckpt.checkpoint(
        s.blk, x, use_reentrant=False).flatten(1)), o=nn.Linear(12, 3), blk=nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1, groups=3))).eval(),
        lambda: _x(*IMG), 3),
    "checkpoint_norms_embedding_nested": (lambda: Fn(lambda s, ids: s.o(ckpt.checkpoint(
        lambda t: s.blk(ckpt.checkpoint(s.e, t, use_reentrant=False)).mean(1), ids,
        use_reentrant=False)), e=nn.Embedding(6, 8), o=nn.Linear(8, 3), blk=nn.Sequential(
            nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8), nn.ReLU(inplace=True))),
        lambda: _ids(6), 3),
    "relu_inplace": (lambda: nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.LeakyReLU(0.1, inplace=True),
        nn.Linear(8, 3)), lambda: _x(N, 6), 3),
    "inplace_residual": (lambda: Fn(_inplace, a=nn.Linear(6, 6), b=nn.Linear(6, 6),
                                    o=nn.Linear(6, 3)), lambda: _x(N, 6), 3),
    "block_twice": (lambda: Fn(lambda s, x: s.o(s.blk(s.blk(x)) + x), o=nn.Linear(6, 3),
                               blk=nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh())),
                    lambda: _x(N, 6), 3),
    "tied_transposed_embedding": (lambda: Fn(
        lambda s, ids: F.linear(torch.tanh(s.a(s.e(ids).mean(1))), s.e.weight),
        e=nn.Embedding(7, 5), a=nn.Linear(5, 5)), lambda: _ids(7, 3), 7),
    "bilinear": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.b(x[:, :3], x[:, 3:]))),
                            b=nn.Bilinear(3, 3, 4), o=nn.Linear(4, 3)), lambda: _x(N, 6), 3),
    "prelu_per_channel": (lambda: _conv_seq(nn.Conv2d(2, 3, 3), nn.PReLU(3, 0.2), flat=12),
                          lambda: _x(*IMG), 3),
    "unfold_fold": (lambda: Fn(lambda s, x: s.o(torch.tanh(F.fold(
        s.a(F.unfold(x, 2).transpose(1, 2)).transpose(1, 2), (4, 4), 2)).flatten(1)),
        **_lin(8, 8, 3) | {"o": nn.Linear(32, 3)}), lambda: _x(*IMG), 3),
    "pixel_shuffle": (lambda: _conv_seq(nn.Conv2d(2, 8, 3, padding=1), nn.PixelShuffle(2),
                                        nn.Conv2d(2, 2, 3, stride=2), flat=18),
                      lambda: _x(*IMG), 3),
    "upsample_nearest": (lambda: _conv_seq(nn.Conv2d(2, 3, 3), nn.Upsample(scale_factor=2),
                                           nn.Conv2d(3, 2, 3), flat=8), lambda: _x(*IMG), 3),
    "upsample_bilinear": (lambda: _conv_seq(
        nn.Conv2d(2, 3, 3), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(3, 2, 3),
        flat=8), lambda: _x(*IMG), 3),
    "maxpool_indices_unpool": (lambda: Fn(lambda s, x: s.o(s.c2(F.max_unpool2d(
        *F.max_pool2d(torch.relu(s.c(x)), 2, return_indices=True), 2)).flatten(1)),
        c=nn.Conv2d(2, 3, 3, padding=1), c2=nn.Conv2d(3, 2, 3), o=nn.Linear(8, 3)),
        lambda: _x(*IMG), 3),
    "instance_norm_affine": (lambda: _conv_seq(nn.Conv2d(2, 3, 3),
                                               nn.InstanceNorm2d(3, affine=True), nn.ReLU(),
                                               flat=12), lambda: _x(*IMG), 3),
    "local_response_norm": (lambda: _conv_seq(nn.Conv2d(2, 4, 3), nn.LocalResponseNorm(2),
                                              flat=16), lambda: _x(*IMG), 3),
    "conv_transpose_outpad_groups_dilation": (lambda: _conv_seq(
        nn.ConvTranspose2d(4, 4, 3, stride=2, output_padding=1, groups=2, dilation=2), nn.Tanh(),
        flat=4 * 10 * 10), lambda: _x(N, 4, 3, 3), 3),
    "conv_same_dilated": (lambda: _conv_seq(nn.Conv2d(2, 3, 3, padding="same", dilation=2),
                                            nn.Tanh(), flat=48), lambda: _x(*IMG), 3),
    "conv1d_same_even_kernel": (lambda: _conv_seq(nn.Conv1d(2, 3, 4, padding="same"), nn.Tanh(),
                                                  flat=18), lambda: _x(N, 2, 6), 3),
    "depthwise_separable": (lambda: _conv_seq(nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 4, 1),
                                              nn.ReLU(), flat=16), lambda: _x(N, 3, 4, 4), 3),
    "sdpa_causal": (lambda: Fn(lambda s, x: _sdpa(s, x, "causal"), qkv=nn.Linear(4, 12),
                               o=nn.Linear(4, 3)), lambda: _x(N, 3, 4), 3),
    "sdpa_float_mask": (lambda: Fn(lambda s, x: _sdpa(s, x, "mask"), qkv=nn.Linear(4, 12),
                                   o=nn.Linear(4, 3)), lambda: _x(N, 3, 4), 3),
    "transformer_decoder_memory": (lambda: Fn(_decoder, i=nn.Linear(4, 8), o=nn.Linear(8, 3),
                                              d=nn.TransformerDecoder(nn.TransformerDecoderLayer(
                                                  8, 2, 16, dropout=0.0, batch_first=True), 1)),
                                   lambda: _x(N, 3, 4), 3),
    "log_softmax_output": (lambda: Fn(lambda s, x: F.log_softmax(s.o(torch.tanh(s.a(x))), -1),
                                      **_lin(6, 6)), lambda: _x(N, 6), 3),
    "frozen_middle": (lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh(),
                                            nn.Linear(6, 6).requires_grad_(False), nn.Tanh(),
                                            nn.Linear(6, 3)), lambda: _x(N, 6), 3),
    "unused_parameters": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(x))), dead=nn.Linear(6, 6),
                                     **_lin(6, 6)), lambda: _x(N, 6), 3),
    "batch_reversed": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(x.flip(0)))), **_lin(6, 5)),
                       lambda: _x(N, 6), 3),
    "transposed_features": (lambda: Fn(
        lambda s, x: s.o(torch.tanh(s.a(x.transpose(1, 2)).transpose(1, 2)).mean(1)),
        a=nn.Linear(3, 3), o=nn.Linear(4, 3)), lambda: _x(N, 3, 4), 3),
    "square_tokens_time_major": (lambda: Fn(
        lambda s, x: s.o(torch.tanh(s.a(x.transpose(0, 1)).transpose(0, 1)).mean(1)),
        **_lin(4, 4)), lambda: _x(N, N, 4), 3),
    "repeat_interleave_rows": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(
        x.repeat_interleave(2, 0) * torch.tensor([1.0, -0.5], dtype=x.dtype).repeat(
            x.shape[0])[:, None])).view(x.shape[0], 2, 6).sum(1)), **_lin(6, 6)),
        lambda: _x(N, 6), 3),
    "embedding_bag_offsets": (lambda: Fn(_bag, e=nn.EmbeddingBag(11, 4), o=nn.Linear(4, 3)),
                              lambda: _ids(11, 3), 3),
    "embedding_padding_idx": (lambda: Fn(lambda s, ids: s.o(torch.tanh(s.e(ids).sum(1))),
                                         e=nn.Embedding(6, 4, padding_idx=0),
                                         o=nn.Linear(4, 3)), lambda: _ids(6), 3),
    "linear_subclass_forward": (lambda: nn.Sequential(ScaledLinear(6, 6), nn.Tanh(),
                                                      SquaredInputLinear(6, 3)),
                                lambda: _x(N, 6), 3),
    "forward_pre_hook": (lambda: _hooked("pre"), lambda: _x(N, 6), 3),
    "forward_hook": (lambda: _hooked("post"), lambda: _x(N, 6), 3),
    "keyword_calls": (lambda: Fn(lambda s, x: s.o(input=torch.tanh(s.a(input=x))), **_lin(6, 6)),
                      lambda: _x(N, 6), 3),
    "layer_norm_2d_shape": (lambda: Fn(lambda s, x: s.o(s.n(torch.tanh(s.a(x))).mean(1)),
                                       n=nn.LayerNorm((3, 4)), **_lin(4, 4)),
                            lambda: _x(N, 3, 4), 3),
    "glu_groupnorm_reflect": (lambda: _conv_seq(
        nn.Conv1d(2, 8, 3, padding=1, padding_mode="reflect"), nn.GLU(1), nn.GroupNorm(2, 4),
        flat=24), lambda: _x(N, 2, 6), 3),
    "detach_and_straight_through": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.b(
        (lambda h: h + (h.round() - h).detach())(torch.tanh(s.a(x)).detach() + s.a(x))))),
        b=nn.Linear(6, 6), **_lin(6, 6)), lambda: _x(N, 6), 3),
    # stop-gradient (SimSiam-style): the layer's detached call adds nothing to the Fisher
    "call_twice_one_detached": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(x)) * torch.sigmoid(
        s.a(0.5 * x).detach()) + s.n(x).detach()), n=nn.Linear(6, 6), **_lin(6, 6)),
        lambda: _x(N, 6), 3),
    "gradient_reversal": (lambda: Fn(lambda s, x: s.o(GradScale.apply(torch.tanh(s.a(x)))),
                                     **_lin(6, 6)), lambda: _x(N, 6), 3),
    "hypernetwork_bmm": (lambda: Fn(lambda s, x: s.o(torch.tanh(torch.bmm(
        s.a(x).view(-1, 3, 4), x.unsqueeze(-1)).squeeze(-1))), a=nn.Linear(4, 12),
        o=nn.Linear(3, 3)), lambda: _x(N, 4), 3),
    "film_conditioning": (lambda: Fn(lambda s, x: (lambda gb: s.o(torch.relu(
        s.c(x) * gb[:, :3, None, None] + gb[:, 3:, None, None]).flatten(1)))(s.a(x.mean((2, 3)))),
        c=nn.Conv2d(2, 3, 3), a=nn.Linear(2, 6), o=nn.Linear(12, 3)), lambda: _x(*IMG), 3),
    # F.conv2d(x, (w - w.mean()) / w.std()) in a subclass's forward: a computed weight
    "weight_standardized_conv": (lambda: _conv_seq(StdConv2d(2, 3, 3), nn.Tanh(), flat=12),
                                 lambda: _x(*IMG), 3),
}

# name -> (model builder, input builder, classes, {generic parameter: reason})
GENERIC = {
    "tied_encoder_decoder_transposed": (lambda: Fn(lambda s, x: s.o(torch.tanh(F.linear(
        torch.tanh(s.a(x)), s.a.weight.t()))), a=nn.Linear(6, 4), o=nn.Linear(6, 3)),
        lambda: _x(N, 6), 3, {"a.weight": "its uses cannot be combined by the rules"}),
    "moe_top2_routing": (lambda: MoE(k=2), lambda: _x(N, 6), 4,
                         dict.fromkeys([f"ex.{e}.{p}" for e in range(3) for p in
                                        ("weight", "bias")],
                                       "no dimension of the layer output is the batch")),
    "batch_halves_two_branches": (lambda: Fn(lambda s, x: s.o(torch.tanh(torch.cat(
        [s.a(x[:2]), s.b(x[2:])]))), b=nn.Linear(6, 5), **_lin(6, 5)), lambda: _x(N, 6), 3,
        dict.fromkeys(["a.weight", "a.bias", "b.weight", "b.bias"],
                      "no dimension of the layer output is the batch")),
    "batch_roll": (lambda: Fn(lambda s, x: (lambda h: s.o(h + 0.5 * torch.roll(h, 1, 0)))(
        torch.tanh(s.a(x))), **_lin(6, 6)), lambda: _x(N, 6), 3,
        dict.fromkeys(["a.weight", "a.bias"], "its output gradients couple the samples")),
    "batch_mean_removed": (lambda: Fn(lambda s, x: (lambda h: s.o(h - h.mean(0, keepdim=True)))(
        torch.tanh(s.a(x))), **_lin(6, 6)), lambda: _x(N, 6), 3,
        dict.fromkeys(["a.weight", "a.bias"], "its output gradients couple the samples")),
    "batchnorm_train": (lambda: nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh(),
                                              nn.Linear(6, 3)).train(), lambda: _x(N, 6), 3,
                        dict.fromkeys(["0.weight", "0.bias"],
                                      "its output gradients couple the samples")),
    "batchnorm_eval_batch_statistics": (lambda: nn.Sequential(
        nn.Linear(6, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(),
        nn.Linear(6, 3)).eval(), lambda: _x(N, 6), 3,
        dict.fromkeys(["0.weight", "0.bias"], "its output gradients couple the samples")),
    "linear_over_the_batch_axis": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(
        x.transpose(0, 1)).transpose(0, 1))), a=nn.Linear(N, N), o=nn.Linear(4, 3)),
        lambda: _x(N, 4), 3,
        dict.fromkeys(["a.weight", "a.bias"], "no dimension of the layer output is the batch")),
    "batch_permuted_and_back": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(x[[3, 0, 4, 1, 2]])))[
        [1, 3, 4, 0, 2]], **_lin(6, 5)), lambda: _x(N, 6), 3,
        dict.fromkeys(["a.weight", "a.bias", "o.weight", "o.bias"],
                      "its output gradients couple the samples")),
    "per_sample_loop": (lambda: Fn(lambda s, x: s.o(torch.cat([torch.tanh(s.a(x[i:i + 1]))
                                                               for i in range(x.shape[0])])),
                                   **_lin(6, 6)), lambda: _x(N, 6), 3,
                        dict.fromkeys(["a.weight", "a.bias"],
                                      "no dimension of the layer output is the batch")),
    "embedding_scale_grad_by_freq": (lambda: Fn(
        lambda s, ids: s.o(torch.tanh(s.e(ids).sum(1))),
        e=nn.Embedding(6, 4, scale_grad_by_freq=True), o=nn.Linear(4, 3)), lambda: _ids(6), 3,
        {"e.weight": "no rule for its module"}),
    "cosine_classifier": (lambda: Fn(lambda s, x: 3.0 * F.linear(F.normalize(torch.tanh(s.a(x)),
                                                                             dim=-1),
                                                                  F.normalize(s.W, dim=-1)),
                                     a=nn.Linear(6, 6), W=nn.Parameter(torch.randn(3, 6))),
                          lambda: _x(N, 6), 3, {"W": "no rule for its module"}),
}


def _case(name: str) -> Case:
    build, inputs, C = (FAMILIES[name] if name in FAMILIES else GENERIC[name])[:3]
    torch.manual_seed(0)
    model = build().double()
    x = inputs()
    y = torch.randint(0, C, (x.shape[0],), generator=_gen(13))
    return classifier_case(model, (x.double() if x.is_floating_point() else x, y), C, name)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_takes_the_rules_and_matches_the_oracle(name, quantity):
    case = _case(name)
    unused = UNUSED.get(name, frozenset())
    check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64, unused)


# the families with parameters that never reach the logits (every other family's parameters
# all do: a family whose layers are cut off from the logits would check nothing about them)
UNUSED = {
    "unused_parameters": frozenset({"dead.weight", "dead.bias"}),
    "call_twice_one_detached": frozenset({"n.weight", "n.bias"}),
}


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(GENERIC))
def test_family_on_the_generic_path_is_exact_for_its_reason(name, quantity):
    case = _case(name)
    got, est = run_case(case, quantity)
    assert rel_error(got, oracle(case, quantity)) <= DET_REL_F64
    plan = est._persample.last_plan
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    generic = {names[i]: plan.reasons[i] for i in plan.generic}
    expected = GENERIC[name][3]
    # a parameter may leave the generic path (a new rule); none may join it, nor change reason
    assert set(generic) <= set(expected), set(generic) - set(expected)
    assert all(generic[k] == expected[k] for k in generic), generic


@pytest.mark.parametrize("name", ["relu_inplace", "tied_transposed_embedding", "unfold_fold",
                                  "maxpool_indices_unpool", "sdpa_causal", "embedding_bag_offsets",
                                  "linear_subclass_forward", "moe_top2_routing", "batch_roll",
                                  "batchnorm_train", "gru_cell_loop", "checkpoint_nonreentrant"])
def test_family_monte_carlo_same_seed(name):
    case = _case(name)
    check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)


class Segmenter(nn.Module):
    """``(N, C, H, W)`` per-pixel logits."""

    def __init__(self):
        super().__init__()
        self.c, self.o = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.o(torch.relu(self.c(x)))


@pytest.mark.parametrize("quantity", ["exact", "empirical", "monte_carlo"])
def test_segmentation_logits_class_dim_1_with_ignored_pixels(quantity):
    torch.manual_seed(0)
    model = Segmenter().double()
    x = _x(3, 2, 2, 3).double()
    y = torch.randint(0, 3, (3, 2, 3), generator=_gen(13))
    y[0, 0, 0] = -100
    y[2, 1, :] = -100
    case = Case("segmentation", model, (x, y), lambda m, b: m(b[0]).permute(0, 2, 3, 1),
                y != -100, y, "categorical", 3)
    rj = row_jacobians(case)
    est = fimfast.DiagFisher(model, quantity, class_dim=1, seed=11)
    est.step(case.batch)
    if quantity == "monte_carlo":
        from dataclasses import replace

        from fimfast.ops.torch_ref import sample_labels_torch

        rj = replace(rj, labels=sample_labels_torch(rj.z, 11, 0, 1)[0])
        quantity = "empirical"
    assert not est._persample.last_plan.generic
    assert rel_error(dict(est.result().items()), rj.split(oracle_flat(rj, "categorical",
                                                                      quantity))) <= DET_REL_F64


class DictModel(nn.Module):
    """Dict inputs in, a dict with ``logits`` out."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(6, 5), nn.Linear(2, 5), nn.Linear(5, 3)

    def forward(self, d):
        return {"logits": self.o(torch.tanh(self.a(d["x"]) + self.b(d["z"]))), "aux": d["x"].sum()}


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_dict_inputs_and_outputs(quantity):
    torch.manual_seed(0)
    model = DictModel().double()
    d = {"x": _x(N, 6).double(), "z": _x(N, 2).double()}
    y = torch.randint(0, 3, (N,), generator=_gen(13))
    case = Case("dict", model, (d, y), lambda m, b: m(b[0])["logits"],
                torch.ones(N, dtype=torch.bool), y, "categorical", 3)
    est = fimfast.DiagFisher(model, quantity, forward_fn=lambda m, b: m(b[0]))
    est.step(case.batch)
    assert not est._persample.last_plan.generic
    assert rel_error(dict(est.result().items()), oracle(case, quantity)) <= DET_REL_F64


class Dropped(nn.Module):
    """Linear, dropout, tanh, head; ``checkpointed``: the first three in a non-reentrant
    ``torch.utils.checkpoint`` segment (its recomputation replays the same dropout mask)."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.blk = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh())
        self.o, self.checkpointed = nn.Linear(8, 3), checkpointed

    def forward(self, x):
        h = ckpt.checkpoint(self.blk, x, use_reentrant=False) if self.checkpointed else self.blk(x)
        return self.o(h)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_checkpointed_dropout_is_the_sampled_subnetwork(quantity):
    """A checkpointed segment with dropout in train mode: the rules' estimate equals the float64
    oracle of the sub-network the step's forward sampled (the same seed before both)."""
    torch.manual_seed(0)
    model = Dropped(checkpointed=True).double().train()
    case = classifier_case(model, (_x(N, 6).double(), torch.randint(0, 3, (N,),
                                                                    generator=_gen(13))), 3)
    torch.manual_seed(42)
    ref = oracle(case, quantity)
    est = fimfast.DiagFisher(model, quantity)
    torch.manual_seed(42)
    est.step(case.batch)
    assert not est._persample.last_plan.generic
    assert rel_error(dict(est.result().items()), ref) <= DET_REL_F64


def _hidden(s, x):
    if s.hide == "no_grad":
        with torch.no_grad():
            h = torch.tanh(s.a(x))
    elif s.hide == "checkpoint":
        h = torch.tanh(ckpt.checkpoint(s.a, x, use_reentrant=True))
    else:
        h = torch.tanh(s.a(x))
    return s.o(torch.tanh(s.b(h)))


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo"])
@pytest.mark.parametrize("hide", ["no_grad", "checkpoint"])
def test_parameters_hidden_from_autograd_are_refused_and_state_kept(hide, fim_type):
    torch.manual_seed(0)
    m = Fn(_hidden, b=nn.Linear(6, 6), **_lin(6, 6)).double()
    m.hide = None
    est = fimfast.DiagFisher(m, fim_type, seed=1)
    est.step((_x(N, 6).double(), torch.zeros(N, dtype=torch.long)))
    before = {k: v.clone() for k, v in est.result().items()}
    count = est.result().meta["count"]
    m.hide = hide
    with pytest.raises(fimfast.UnsupportedModelError, match=r"'a'.*gradients disabled"):
        est.step((_x(3, 6).double(), torch.ones(3, dtype=torch.long)))
    after = est.result()
    assert after.meta["count"] == count
    assert all(torch.equal(before[k], after[k]) for k in before)


TWO_STEP = {  # name -> (model, batch A, batch B): the second step binds the first one's plan
    "moe_routing_changes": (lambda: MoE(k=1), (N, 6), (3, 6)),
    "sequence_length_changes": (lambda: Fn(lambda s, x: s.o(torch.tanh(s.a(x)).mean(1)),
                                           **_lin(4, 4)), (N, 3, 4), (2, 6, 4)),
    "image_size_changes": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(),
                                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                 nn.Linear(3, 3)), (N, 2, 5, 5), (2, 2, 7, 7)),
    "branch_flips": (lambda: Fn(lambda s, x: s.o(torch.tanh(
        s.a(x) if float(x[:, 0].sum()) > 0 else s.b(x))), b=nn.Linear(6, 6), **_lin(6, 6)),
        (N, 6), (4, 6)),
}


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(TWO_STEP))
def test_two_steps_with_changing_shapes_or_routing(name, quantity):
    build, sa, sb = TWO_STEP[name]
    torch.manual_seed(0)
    model = build().double()
    g = _gen(21)
    xa, xb = torch.randn(*sa, generator=g).double(), torch.randn(*sb, generator=g).double()
    if name == "branch_flips":
        xa, xb = xa.abs(), -xb.abs()
    elif name == "moe_routing_changes":
        xb = 3 * xb
    cases = [classifier_case(model, (x, torch.randint(0, 3, (x.shape[0],), generator=g)), 3)
             for x in (xa, xb)]
    est = fimfast.DiagFisher(model, quantity)
    ref: dict = {}
    for c in cases:
        est.step(c.batch)
        for k, v in oracle(c, quantity).items():
            ref[k] = ref.get(k, 0) + v
    assert rel_error(dict(est.result().items()), ref) <= DET_REL_F64


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe_top2_routing", "batch_roll", "tied_transposed_embedding"])
def test_hutchinson_mean_approaches_exact(name):
    """The mean of 300 one-probe HUTCHINSON steps is within STAT_SIGMAS standard errors of EXACT
    per coordinate (docs/math.md §8), on the generic path, a batch-coupled one and a tied one."""
    case = _case(name)
    ref = oracle_flat(row_jacobians(case), "categorical", "exact")
    est = fimfast.DiagFisher(case.model, "hutchinson", seed=2024)
    draws = []
    for _ in range(300):
        est.reset()
        est.step(case.batch)
        draws.append(est.result().to_vector())
    s = torch.stack(draws).double()
    mean, se = s.mean(0), s.std(0) / s.shape[0] ** 0.5
    z = (mean - ref).abs() / se.clamp_min(1e-300)
    ok = (z <= STAT_SIGMAS) | ((mean - ref).abs() <= 1e-12 * ref.abs().max())
    assert bool(ok.all()), f"max |z| = {float(z[~ok].max()):.2f}"


@pytest.mark.parametrize("name", ["checkpoint_nonreentrant", "moe_top2_routing", "batch_roll",
                                  "tied_transposed_embedding", "linear_subclass_forward",
                                  "unfold_fold"])
def test_structured_dense_is_the_exact_fisher(name):
    case = _case(name)
    rj = row_jacobians(case)
    full = torch.einsum("rcp,rcd,rdq->pq", rj.J, core_matrix(rj.z, "categorical"), rj.J)
    got = fimfast.fisher(case.model, [case.batch], "exact", representation="dense",
                         reduction="sum").to_dense().double()
    assert float((got - full).norm() / full.norm()) <= DET_REL_F64


@pytest.mark.parametrize("name,match", [
    ("linear_subclass_forward", r"module '0' \(ScaledLinear\) runs a forward other than"),
    ("weight_standardized_conv", r"module '0' \(StdConv2d\) runs a forward other than"),
    ("bilinear", r"module 'b' \(Bilinear\)"),
    ("gru_cell_loop", r"module 'c' \(GRUCell\)"),
    ("moe_top2_routing", r"module 'ex.\d' got an input of shape \(\d, 6\); the batch \(N=5\)"),
    ("tied_encoder_decoder_transposed", r"module 'a'.*used outside its forward"),
])
def test_kfac_refuses_maps_it_does_not_model(name, match):
    case = _case(name)
    with pytest.raises(ValueError, match=match):
        fimfast.fisher(case.model, [case.batch], "exact", representation="kfac")


@pytest.mark.parametrize("name", ["relu_inplace", "inplace_residual", "forward_pre_hook",
                                  "forward_hook", "gradient_reversal", "keyword_calls"])
def test_kfac_of_one_sample_is_exact_on_linear_layers(name):
    """With one sample through Linears called once on 2-D inputs, each Linear's Fisher block is
    exactly ``(a a^T) (x) G``: KFAC must equal the dense Fisher on those blocks."""
    case = _case(name)
    x, y = case.batch
    one = classifier_case(case.model, (x[:1], y[:1]), case.C)
    rj = row_jacobians(one)
    full = torch.einsum("rcp,rcd,rdq->pq", rj.J, core_matrix(rj.z, "categorical"), rj.J)
    got = fimfast.fisher(case.model, [one.batch], "exact", representation="kfac", reduction="sum")
    dense = got.to_dense().double()
    for n in rj.names:
        sl = got.slice_of(n)
        assert float((dense[sl, sl] - full[sl, sl]).norm()) <= DET_REL_F64 * float(
            full[sl, sl].norm()) + 1e-300, n


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_hugging_face_gradient_checkpointing_takes_the_rules(quantity):
    """A Hugging Face causal LM with ``gradient_checkpointing_enable()`` (non-reentrant
    segments, one per block) in train mode without dropout: every parameter on the rules' path,
    the float64 oracle's token-level Fisher."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conf = transformers.GPTNeoXConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, rotary_pct=0.5, hidden_dropout=0.0,
        attention_dropout=0.0)
    model = transformers.GPTNeoXForCausalLM(conf).double().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 20, (3, 5), generator=_gen(5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    valid = (labels[:, 1:] != -100) & (mask[:, :-1] != 0)
    case = Case("gpt_neox", model, batch,
                lambda m, b: m(input_ids=b["input_ids"],
                               attention_mask=b["attention_mask"]).logits[:, :-1],
                valid, labels[:, 1:], "categorical", 20)
    ref = oracle(case, quantity)
    est = fimfast.DiagFisher(model, quantity)
    est.step(batch)
    assert not est._persample.last_plan.generic, est._persample.last_plan.reasons
    assert rel_error(dict(est.result().items()), ref) <= DET_REL_F64
