"""Adversarial checks, ninth round: what the structured engine keeps from one batch to the next.

A :class:`fimfast.structured.FisherAccumulator` keeps, from the call that made it, the model's
trainable parameters, its Kronecker layers, the guards' module walk and buffer list and the
samples-apart verdicts; repeated :func:`fimfast.fisher` calls on one model keep the same per
model structure (:mod:`fimfast.structured.structure`). Each test changes the model between two
batches (a forward hook or pre-hook put on, a module inserted without registration, a BatchNorm
switched to batch statistics, a convolution's stride, padding or dilation, an embedding's
``padding_idx``, a LayerNorm's ``eps``, a class swapped for a subclass with its own forward, a
forward set on the instance) and checks the result: the sums of two batches equal the sums of a
new accumulator per batch (each model as it was for that batch), the dense family equals the
float64 oracle of the model each batch ran, and a change fimfast cannot represent is refused,
naming the cause, with nothing of the batch added.

Also: CPU autocast switched off after an autocast step of one :class:`fimfast.DiagFisher`; the
step after the switch equals a new estimator's step (no plan or dtype of the autocast step is
reused), and a later autocast step's last-layer weight equals the float64 Jacobian of the
autocast forward (its rounded activations).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kfac_brute import dense_exact
from kfac_brute import kfac as brute
from torch import nn

import fimfast
from fimfast.structured import FisherAccumulator

pytestmark = pytest.mark.filterwarnings("ignore")
C = 3
DT = torch.float64


def _rel(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max())


def _mlp(bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    mods = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)]
    if bn:
        mods.insert(1, nn.BatchNorm1d(5, affine=False))
    m = nn.Sequential(*mods).to(DT)
    if bn:
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
        m.eval()
    return m


def _batches(n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, C, (6,), generator=g))
            for _ in range(n)]


class _Doubled(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


def _hook_out(m):
    m[-1].register_forward_hook(lambda mod, i, o: o * 2)


def _hook_pre(m):
    m[-1].register_forward_pre_hook(lambda mod, i: (i[0] * 2,))


def _unregistered_dropout(m):
    m._modules["1"] = nn.Sequential(nn.Dropout(0.0), nn.Tanh())


def _class_swap(m):
    m[-1].__class__ = _Doubled


def _instance_forward(m):
    last = m[-1]
    last.forward = lambda x: F.linear(x, 2 * last.weight, last.bias)


def _unregistered_bn(m):  # train mode: batch statistics, written into _modules directly
    m._modules["1"] = nn.Sequential(nn.BatchNorm1d(5, affine=False).to(DT), nn.Tanh())


def _bn_stats_removed(m):
    m[1].running_mean = None
    m[1].running_var = None


def _bn_train(m):
    m[1].train()


def _bn_untracked(m):  # running statistics kept: eval still normalises with them
    m[1].track_running_stats = False


KEPT = {"hook_out": (_hook_out, False), "hook_pre": (_hook_pre, False),
        "unregistered_dropout": (_unregistered_dropout, False),
        "bn_untracked": (_bn_untracked, True)}
REFUSED = {"class_swap": (_class_swap, False, "runs a forward other than Linear.forward"),
           "instance_forward": (_instance_forward, False, "runs a forward other than"),
           "unregistered_bn": (_unregistered_bn, False, "normalises with batch statistics"),
           "bn_stats_removed": (_bn_stats_removed, True, "normalises with batch statistics"),
           "bn_train": (_bn_train, True, "normalises with batch statistics")}


def _sums(res, rep):
    return ([a.clone() for a in res.A], [g.clone() for g in res.G]) if rep == "kfac" \
        else res.to_dense()


def _two_fresh(make, change, rep, b1, b2):
    m = make()
    r1 = FisherAccumulator(m, "exact", rep, "sum").add([b1]).result()
    change(m)
    r2 = FisherAccumulator(m, "exact", rep, "sum").add([b2]).result()
    return _sums(r1, rep), _sums(r2, rep)


def _check_kron(got, one, two, rep, w=(1, 1)):
    if rep == "quasi_diag":
        assert _rel(got, one + two) < 1e-12
        return
    (A, G), (A1, G1), (A2, G2) = got, one, two
    for k in range(len(A)):  # A: the mean over positions (w: each batch's positions)
        ww = w if A[k].shape[0] == 10 else (1, 1)
        assert _rel(A[k], (ww[0] * A1[k] + ww[1] * A2[k]) / sum(ww)) < 1e-12
        assert _rel(G[k], G1[k] + G2[k]) < 1e-12


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
@pytest.mark.parametrize("name", list(KEPT))
def test_kron_change_between_updates_equals_new_accumulators(name, rep):
    change, bn = KEPT[name]
    b1, b2 = _batches()
    m = _mlp(bn)
    acc = FisherAccumulator(m, "exact", rep, "sum")
    acc.update(b1)
    change(m)
    acc.update(b2)
    one, two = _two_fresh(lambda: _mlp(bn), change, rep, b1, b2)
    _check_kron(_sums(acc.result(), rep), one, two, rep)


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_kron_change_between_updates_refused_with_nothing_added(name, rep):
    change, bn, msg = REFUSED[name]
    b1, b2 = _batches()
    m = _mlp(bn)
    acc = FisherAccumulator(m, "exact", rep, "sum")
    acc.update(b1)
    before = acc.state_dict()
    change(m)
    with pytest.raises(ValueError, match=msg):
        acc.update(b2)
    after = acc.state_dict()
    assert acc.stream.count == 6 and acc.stream.batches == 1
    assert _same(before, after)
    with pytest.raises(ValueError, match=msg):  # and a new call on the changed model
        fimfast.fisher(m, [b2], "exact", representation=rep, reduction="sum")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _block_mask(model):
    """One block per module (weight and bias together)."""
    sizes = [sum(p.numel() for p in m.parameters(recurse=False))
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    out = torch.zeros(sum(sizes), sum(sizes), dtype=torch.bool)
    s = 0
    for n in sizes:
        out[s:s + n, s:s + n] = True
        s += n
    return out


DENSE = {"hook_out": _hook_out, "hook_pre": _hook_pre, "class_swap": _class_swap,
         "instance_forward": _instance_forward}


@pytest.mark.parametrize("rep", ["dense", "block_diag"])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_change_between_updates_equals_oracle(name, rep):
    """The dense family differentiates the function that runs: exact across the change."""
    b1, b2 = _batches()
    m = _mlp()
    acc = FisherAccumulator(m, "exact", rep, "sum")
    acc.update(b1)
    want = dense_exact(m, [b1[0]])
    DENSE[name](m)
    acc.update(b2)
    want = want + dense_exact(m, [b2[0]])
    got = acc.result().to_dense().double()
    if rep == "block_diag":
        want = want * _block_mask(m)
    assert _rel(got, want) < 1e-12


class _Mixed(nn.Module):
    """Embedding with padding_idx, LayerNorm, convolution: every attribute read per batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.n = nn.Embedding(7, 4, padding_idx=0), nn.LayerNorm(4)
        self.c, self.o = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(6, C)

    def forward(self, x):
        ids, img = x
        h = self.n(self.e(ids)).mean(1)
        return self.o(torch.cat([h, torch.tanh(self.c(img)).mean((2, 3))], 1))


def _mixed_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 7, (4, 5), generator=g), torch.randn(4, 1, 6, 6, generator=g, dtype=DT))
    return x, torch.randint(0, C, (4,), generator=g)


# the change and the convolution's output positions per sample after it (36 before)
ATTRS = {"conv_stride": (lambda m: setattr(m.c, "stride", (2, 2)), 9),
         "conv_padding": (lambda m: setattr(m.c, "padding", (0, 0)), 16),
         "conv_dilation": (lambda m: setattr(m.c, "dilation", (2, 2)), 16),
         "padding_idx": (lambda m: setattr(m.e, "padding_idx", 3), 36),
         "layernorm_eps": (lambda m: setattr(m.n, "eps", 0.5), 36)}


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
@pytest.mark.parametrize("name", list(ATTRS))
def test_layer_attribute_changed_between_updates(name, rep):
    change, pos = ATTRS[name]
    b1, b2 = _mixed_batch(1), _mixed_batch(2)
    m = _Mixed().to(DT)
    acc = FisherAccumulator(m, "exact", rep, "sum")
    acc.update(b1)
    change(m)
    acc.update(b2)
    m0 = _Mixed().to(DT)
    r1 = FisherAccumulator(m0, "exact", rep, "sum").add([b1]).result()
    change(m0)
    r2 = FisherAccumulator(m0, "exact", rep, "sum").add([b2]).result()
    _check_kron(_sums(acc.result(), rep), _sums(r1, rep), _sums(r2, rep), rep, (36, pos))


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, C)).to(DT)


def _conv_dilated(m):  # the same output size: the structure (and its cache entry) unchanged
    m[0].padding, m[0].dilation = (1, 1), (2, 2)


@pytest.mark.parametrize("name", ["hook_pre", "conv_dilation"])
def test_repeated_fisher_calls_after_a_change_equal_brute_force(name):
    """Two fimfast.fisher calls on one model (the structure cache kept), the model changed in
    between: the second equals the float64 brute force of KFAC on the changed model."""
    if name == "hook_pre":
        m, data, change = _mlp(), _batches(1), _hook_pre
    else:
        g = torch.Generator().manual_seed(3)
        m, change = _conv_net(), _conv_dilated
        data = [(torch.randn(3, 1, 6, 6, generator=g, dtype=DT),
                 torch.randint(0, C, (3,), generator=g))]
    fimfast.fisher(m, data, "exact", representation="kfac", reduction="sum")
    change(m)
    got = fimfast.fisher(m, data, "exact", representation="kfac", reduction="sum")
    assert _rel(got.to_dense(), brute(m, data, "expand", "exact", "sum")) < 1e-10


# -- CPU autocast between steps of one DiagFisher ------------------------------------------------ #
def _ac_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))


def _ac_batches() -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 8, generator=g), torch.randint(0, 5, (12,), generator=g))
            for _ in range(2)]


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).double()


def _autocast_last_weight(model, batch, fim_type: str) -> torch.Tensor:
    """The float64 diagonal of the last Linear's weight for the function the autocast forward
    computes: its bf16 operands and outputs (the weight's Jacobian is the rounded input of the
    layer times the softmax core; nothing of the backward is rounded on this side)."""
    x, y = batch
    w1, b1, w2, b2 = (_bf(p) for p in model.parameters())
    a = _bf(torch.tanh(_bf(_bf(x) @ w1.T + b1)))
    z = _bf(a @ w2.T + b2)
    p = torch.softmax(z, -1)
    if fim_type == "exact":  # sum_n diag(p) - p p^T, columns over classes
        core = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("ncc,ni->ci", core, a * a)
    e = p - F.one_hot(y, 5).double()
    return torch.einsum("nc,ni->ci", e * e, a * a)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_autocast_first_step_squares_in_float32(fim_type, first):
    """A new estimator's step under CPU bf16 autocast (its state made from the batch's sums)
    and a later one (added into the state): the last layer's weight equals the float64 Fisher of
    the autocast forward. Before, the first step formed the kept products (G^2)^T (A^2) with
    ``torch.mm`` inside the caller's autocast, in bf16: off by 3.6e-3 (EXACT) and 3.2e-3
    (EMPIRICAL), while a later step (``addmm_``, in place) was exact to 1.3e-7."""
    b1, b2 = _ac_batches()
    m = _ac_mlp()
    est = fimfast.DiagFisher(m, fim_type, reduction="sum", seed=3)
    if not first:
        est.step(b1)
    before = None if first else {k: v.clone() for k, v in est.result().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est.step(b2)
    got = est.result()["2.weight"] - (0 if first else before["2.weight"])
    assert _rel(got, _autocast_last_weight(m, b2, fim_type)) < 1e-5


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_autocast_switched_off_after_a_step(fim_type):
    """Autocast on for the first step, off for the second: the second step's increment equals a
    new estimator's step on that batch without autocast (nothing of the autocast step reused)."""
    b1, b2 = _ac_batches()
    m = _ac_mlp()
    est = fimfast.DiagFisher(m, fim_type, reduction="sum", seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est.step(b1)
    before = {k: v.clone() for k, v in est.result().items()}
    est.step(b2)
    new = fimfast.DiagFisher(m, fim_type, reduction="sum", seed=3)
    new.step(b2)
    want, got = new.result(), est.result()
    for k in want:
        assert _rel(got[k] - before[k], want[k]) < 1e-6



@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo"])
def test_autocast_ema_steps(fim_type):
    """An exponential average under CPU autocast: its first step equals the sum's first step (one
    step, bias-corrected). Before, the batch's kept products came out of ``torch.mm`` in bf16 and
    ``torch._foreach_lerp_`` into the float32 state raised "expected dtype float for `end` but got
    dtype c10::BFloat16" on every step; MONTE_CARLO's first step was off by 4.6e-3 as well."""
    b1, _ = _ac_batches()
    m = _ac_mlp()
    ema = fimfast.DiagFisher(m, fim_type, reduction="sum", seed=3, ema=0.5)
    plain = fimfast.DiagFisher(m, fim_type, reduction="sum", seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ema.step(b1)
        plain.step(b1)
    got, want = ema.result(), plain.result()
    for k in want:
        assert _rel(got[k], want[k]) < 1e-6
    if fim_type != "monte_carlo":  # the drawn labels are not the batch's
        assert _rel(want["2.weight"], _autocast_last_weight(m, b1, fim_type)) < 1e-5



def _autocast_head(model, x):
    """The last Linear's input (with the bias column) and the softmax of the autocast forward,
    in float64 from its bf16 values."""
    w1, b1, w2, b2 = (_bf(p) for p in model.parameters())
    a = _bf(torch.tanh(_bf(_bf(x) @ w1.T + b1)))
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], 1), \
        torch.softmax(_bf(a @ w2.T + b2), -1)


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag", "dense"])
def test_structured_autocast_batch_then_plain(rep):
    """A FisherAccumulator fed a batch under CPU bf16 autocast, then one without: the first
    batch's sums are formed in float32 (the last layer's input factor equal to the float64 one
    of the autocast forward; its gradients come back through the bf16 logits, rounded so) and
    the second adds to them. Before, the sums ran inside the caller's autocast: KFAC's factors
    of the batch came out of torch.mm in bf16 and the next batch's addmm_ raised "self and mat2
    must have the same dtype"; quasi_diag raised "Index put requires the source and destination
    dtypes match" on the autocast batch itself (the dense family was right)."""
    b1, b2 = _ac_batches()
    m = _ac_mlp()
    acc = FisherAccumulator(m, "exact", rep, "sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acc.update(b1)
    one = acc.result()
    a, p = _autocast_head(m, b1[0])
    core = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if rep == "kfac":
        assert one.A[1].dtype == torch.float32
        assert _rel(one.A[1], a.T @ a / a.shape[0]) < 1e-6
        assert _rel(one.G[1], core.sum(0)) < 1e-2  # the columns go back through bf16 logits
    else:
        want = torch.einsum("ncc,ni->ci", core, a[:, :-1] ** 2).reshape(-1)
        d = one.to_dense().diagonal()
        assert d.dtype == torch.float32
        assert _rel(d[8 * 16 + 16:8 * 16 + 16 + 5 * 16], want) < 1e-2  # as G above
    acc.update(b2)
    r2 = FisherAccumulator(m, "exact", rep, "sum").add([b2]).result()
    if rep == "kfac":
        assert _rel(acc.result().G[1], one.G[1] + r2.G[1]) < 1e-6
    else:
        assert _rel(acc.result().to_dense(), one.to_dense() + r2.to_dense()) < 1e-6


# -- a coupling turned on by an operation's argument (docs/structured.md, "Exact or refused") ---- #
class _Cum(nn.Module):
    """A cumulative sum over the positions (``dim=1``), or over the batch once ``dim = 0``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.o, self.dim = nn.Linear(6, 6), nn.Linear(6, C), 1

    def forward(self, x):
        return self.o(torch.tanh(self.l(x)).cumsum(self.dim)).mean(1)


def _cum_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, 6, generator=g, dtype=DT), torch.randint(0, C, (4,), generator=g)


def test_coupling_by_an_argument_refused_on_a_copy():
    """The verdicts are kept per model object: a copy of the changed model is probed again."""
    import copy

    m = _Cum().to(DT)
    fimfast.fisher(m, [_cum_batch(1)], "exact", representation="kfac")
    m.dim = 0
    with pytest.raises(ValueError, match=r"module 'l' .*reaches the output positions"):
        fimfast.fisher(copy.deepcopy(m), [_cum_batch(2)], "exact", representation="kfac")


def test_coupling_by_an_argument_after_a_batch_is_refused():
    """The graph's shape holds the operations' constants (tests/test_argument_changes.py)."""
    m = _Cum().to(DT)
    acc = FisherAccumulator(m, "exact", "quasi_diag", "sum")
    acc.update(_cum_batch(1))
    m.dim = 0
    with pytest.raises(ValueError, match=r"module 'l' .*reaches the output positions"):
        acc.update(_cum_batch(2))
