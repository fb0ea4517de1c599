"""Exact or refused: constructs on which a per-sample step must equal a float64 reference or raise.

The reference takes every row's Jacobian from the whole batch's graph (``.backward()`` per logit,
so it also runs through reentrant checkpoints): ``sum_r diag(J_r^T M_r J_r)`` with
``M_r = diag(p_r) - p_r p_r^T`` (EXACT) or ``(p_r - e_{y_r})(p_r - e_{y_r})^T`` (EMPIRICAL).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fimfast
from fimfast import UnsupportedModelError

TYPES = ("exact", "empirical")


def reference(model, logits_fn, labels=None, kind="exact"):
    """Float64 per-row Jacobian reference of the per-sample types, keyed by parameter name."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ps = [p for _, p in named]
    z = logits_fn()
    z = z.reshape(-1, z.shape[-1])
    R, C = z.shape
    prob = torch.softmax(z.detach().double(), -1)
    out = [torch.zeros(p.shape, dtype=torch.float64) for p in ps]
    saved = [p.grad for p in ps]
    try:
        for r in range(R):
            rows = []
            for c in range(C):
                for p in ps:
                    p.grad = None
                z[r, c].backward(retain_graph=True)
                rows.append(torch.cat([
                    (torch.zeros_like(p) if p.grad is None else p.grad).double().reshape(-1)
                    for p in ps
                ]))
            J = torch.stack(rows)  # (C, P)
            if kind == "exact":
                M = torch.diag(prob[r]) - torch.outer(prob[r], prob[r])
                d = ((J.t() @ M) * J.t()).sum(1)
            else:
                e = prob[r].clone()
                e[labels.reshape(-1)[r]] -= 1
                d = (J.t() @ e) ** 2
            i = 0
            for k, p in enumerate(ps):
                out[k] += d[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
    finally:
        for p, g in zip(ps, saved):
            p.grad = g
    return {n: o for (n, _), o in zip(named, out)}


def assert_matches(got, ref, tol=1e-10):
    scale = max(float(r.norm()) for r in ref.values())
    assert scale > 0
    for name, r in ref.items():
        g = got[name].double()
        err = float((g - r).norm()) / max(float(r.norm()), 1e-6 * scale)
        assert err <= tol, f"{name}: relative error {err:.3g}"


def estimate(model, batch, kind, **opts):
    est = fimfast.DiagFisher(model, kind, **opts)
    est.step(batch)
    return est, {k: v for k, v in est.result().items()}


def mlp(d_in=8, h=16, c=5):
    return nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, c)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 5, (12,), generator=g)


# -- 1. torch.compile ----------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_is_exact(data, kind, backend):
    torch.manual_seed(0)
    net = mlp()
    x, y = data
    _, got = estimate(torch.compile(net, backend=backend), (x, y), kind)
    got = {k.removeprefix("_orig_mod."): v for k, v in got.items()}
    assert_matches(got, reference(net, lambda: net(x), y, kind))


@pytest.mark.parametrize("kind", TYPES)
def test_compiled_region_inside_the_forward_takes_the_generic_path(data, kind, caplog):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 5)
            self.f = torch.compile(lambda t: torch.tanh(self.a(t)), backend="aot_eager")

        def forward(self, x):
            return self.b(self.f(x))

    torch.manual_seed(0)
    m = M().double()
    x, y = data
    with caplog.at_level(logging.INFO, logger="fimfast.persample"):
        est, got = estimate(m, (x, y), kind)
    assert_matches(got, reference(m, lambda: m(x), y, kind))
    assert "does not reach the logits" in caplog.text


class _Sub(nn.Module):
    """A bare weight through ``x @ W`` and a sine: the ``aot_eager`` graph of a batch size seen
    after a first one (a dynamic-shape recompilation) saves tensors with donated buffers."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.W = nn.Parameter(0.4 * torch.randn(8, 8, generator=g, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x @ self.W).sin()


def _with_compiled_sub():
    torch.manual_seed(0)
    m = nn.Sequential(_Sub(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    eager = m[0]
    m[0] = torch.compile(eager, backend="aot_eager")
    return m, eager


@pytest.mark.parametrize("kind", (*TYPES, "hutchinson"))
def test_compiled_submodule_recompiled_for_a_new_batch_size(data, kind):
    """A compiled submodule recompiled for a second batch size (its backward then donates its
    saved tensors) is back-propagated once per column (fimfast.guard.retained_graphs)."""
    m, eager = _with_compiled_sub()
    x, y = data
    opts = {"num_probes": 3} if kind == "hutchinson" else {}  # one backward per probe
    est = fimfast.DiagFisher(m, kind, seed=3, **opts)
    est.step((x[:8], y[:8]))
    est.step((x[8:11], y[8:11]))  # a recompilation, with donated buffers
    got = {k.replace("0._orig_mod.", "0."): v for k, v in est.result().items()}
    if kind == "hutchinson":  # the same draws through the module run eagerly
        ref_model = nn.Sequential(eager, *list(m)[1:])
        ref_est = fimfast.DiagFisher(ref_model, kind, seed=3, **opts)
        ref_est.step((x[:8], y[:8]))
        ref_est.step((x[8:11], y[8:11]))
        assert_matches(got, dict(ref_est.result().items()))
        return
    ref_model = nn.Sequential(eager, *list(m)[1:])
    ref = {}
    for sl in (slice(0, 8), slice(8, 11)):
        part = reference(ref_model, lambda sl=sl: ref_model(x[sl]), y[sl], kind)
        ref = {k: ref.get(k, 0) + v for k, v in part.items()}
    assert_matches(got, ref)
    assert torch._functorch.config.donated_buffer  # put back after the step


def test_structured_fisher_through_a_recompiled_submodule(data):
    """The structured engine's retained backwards through a recompiled region (dense Fisher):
    the matrix of the same model run eagerly."""
    m, eager = _with_compiled_sub()
    x, y = data
    batches = [(x[:8], y[:8]), (x[8:11], y[8:11])]
    got = fimfast.structured.fisher(m, batches, "exact", "dense", reduction="sum").to_torch()
    ref_model = nn.Sequential(eager, *list(m)[1:])
    ref = fimfast.structured.fisher(ref_model, batches, "exact", "dense", reduction="sum")
    assert torch.allclose(got, ref.to_torch(), rtol=1e-10, atol=1e-12)


# -- 2. checkpointing and no_grad regions --------------------------------------------------- #
class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.p, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 5)
        self.reentrant = reentrant

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(self.a(t)), self.p(x), use_reentrant=self.reentrant)
        return self.b(h)


@pytest.mark.parametrize("kind", ("exact", "empirical", "monte_carlo"))
def test_reentrant_checkpoint_is_refused(data, kind):
    m = Checkpointed(reentrant=True).double()
    with pytest.raises(UnsupportedModelError, match="use_reentrant=False"):
        estimate(m, data, kind)


@pytest.mark.parametrize("kind", TYPES)
def test_non_reentrant_checkpoint_is_exact(data, kind):
    torch.manual_seed(0)
    m = Checkpointed(reentrant=False).double()
    x, y = data
    _, got = estimate(m, (x, y), kind)
    assert_matches(got, reference(m, lambda: m(x), y, kind))


def test_reentrant_checkpoint_stays_right_for_hutchinson(data):
    torch.manual_seed(0)
    m = Checkpointed(reentrant=True).double()
    x, y = data
    est = fimfast.DiagFisher(m, "hutchinson", seed=0, num_probes=1)
    for _ in range(400):
        est.step((x, y))
    ref = reference(m, lambda: m(x), y)
    got = est.result()
    for name, r in ref.items():
        assert float((got[name].double() / 400).sum() / r.sum()) == pytest.approx(1.0, abs=0.15)


class NoGradFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 5)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(torch.tanh(h))


def test_no_grad_region_with_trainable_parameters_is_refused(data):
    with pytest.raises(UnsupportedModelError, match="'a'.*gradients disabled"):
        estimate(NoGradFirst().double(), data, "exact")
    m = NoGradFirst().double()
    m.a.requires_grad_(False)  # the documented way out: leave those parameters out
    x, y = data
    _, got = estimate(m, (x, y), "exact")
    assert_matches(got, reference(m, lambda: m(x), y))


# -- 3. the batch dimension ------------------------------------------------------------------ #
class SeqFirst(nn.Module):
    """``(T, N, d)`` encoder (PyTorch's default layout) pooled on the first token."""

    def __init__(self, d=8, c=3):
        super().__init__()
        self.emb = nn.Linear(4, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        return self.head(self.enc(self.emb(x))[0])


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("T,N", [(6, 6), (5, 6), (6, 5)])
def test_sequence_first_encoder_is_exact_whatever_the_sizes(kind, T, N):
    torch.manual_seed(0)
    m = SeqFirst().double().eval()
    x = torch.randn(T, N, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    est, got = estimate(m, (x, y), kind, batch_dim=1)
    assert_matches(got, reference(m, lambda: m(x), y, kind))
    assert est._persample.last_plan.generic == []  # the batch dim came from the data flow


def test_sequence_first_token_level_logits_with_batch_dim(data):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # (T, N, 4) -> (T, N, 3)
            return self.head(self.enc(self.emb(x)))

    torch.manual_seed(0)
    m = Tagger().double().eval()
    x = torch.randn(5, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 4))
    _, got = estimate(m, (x, y), "empirical", batch_dim=1, class_dim=-1)
    ref = reference(m, lambda: m(x).transpose(0, 1), y.t(), "empirical")
    assert_matches(got, ref)


# -- 4. user hooks ---------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", TYPES)
def test_user_forward_hook_that_changes_the_output(data, kind):
    torch.manual_seed(0)
    net = mlp()
    net[0].register_forward_hook(lambda m, a, out: out * 0.5 + 0.1)
    net[2].register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
    x, y = data
    _, got = estimate(net, (x, y), kind)
    assert_matches(got, reference(net, lambda: net(x), y, kind))


def test_global_forward_hook_that_changes_outputs(data):
    torch.manual_seed(0)
    net = mlp()
    x, y = data
    h = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: out * 0.5 if isinstance(m, nn.Linear) else None
    )
    try:
        _, got = estimate(net, (x, y), "exact")
        ref = reference(net, lambda: net(x), y)
    finally:
        h.remove()
    assert_matches(got, ref)


# -- 5. coupling between samples ------------------------------------------------------------- #
COUPLINGS = {
    "cumsum": lambda h: h.cumsum(0) / 3,
    "reverse_cumsum": lambda h: h.flip(0).cumsum(0).flip(0) / 3,
    "shift": lambda h: h + 0.5 * h.roll(1, 0),
    "last_two": lambda h: torch.cat([h[:-2], h[-2:] + h[-2:].flip(0)]),
}


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("coupling", sorted(COUPLINGS))
def test_coupling_between_samples_is_detected(data, kind, coupling):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 5)

        def forward(self, x):
            return self.b(COUPLINGS[coupling](torch.tanh(self.a(x))))

    torch.manual_seed(0)
    m = M().double()
    x, y = data
    est, got = estimate(m, (x, y), kind)
    assert_matches(got, reference(m, lambda: m(x), y, kind))
    assert est._persample.last_plan.generic  # the layer below the coupling


# -- 6. buffers, mode, grads ------------------------------------------------------------------ #
def _snapshot(m):
    return (
        {k: v.clone() for k, v in m.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in m.parameters()],
        [x.training for x in m.modules()],
    )


@pytest.mark.parametrize("kind", ("exact", "empirical", "monte_carlo", "hutchinson"))
def test_a_step_leaves_buffers_grads_and_mode_alone(data, kind):
    class Counter(nn.Module):  # a custom module writing its own buffers in place
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("ema", torch.zeros(16, dtype=torch.float64))

        def forward(self, x):
            self.calls += 1
            self.ema.mul_(0.9).add_(0.1 * x.detach().mean(0))
            return x

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), Counter(), nn.Tanh(),
                        nn.Linear(16, 5)).double().train()
    net[1].eval()  # mixed modes stay mixed
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(net)
    est = fimfast.DiagFisher(net, kind)
    for _ in range(2):
        est.step(data)
    after = _snapshot(net)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert before[2] == after[2]


@pytest.mark.parametrize("kind", TYPES)
def test_batchnorm_train_mode_is_the_batch_coupled_fisher(data, kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5))
    net = net.double().train()
    x, y = data
    stats = net[1].running_mean.clone()
    _, got = estimate(net, (x, y), kind)
    assert torch.equal(net[1].running_mean, stats)
    assert_matches(got, reference(net, lambda: net(x), y, kind))


def test_train_step_keeps_the_running_statistics_update(data):
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 5)).double().train()
    stats = net[1].running_mean.clone()
    fimfast.DiagFisher(net, "exact").train_step(data)
    assert not torch.equal(net[1].running_mean, stats)
    assert int(net[1].num_batches_tracked) == 1


def test_buffers_are_restored_when_the_step_fails(data):
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 5)).double().train()
    stats = net[1].running_mean.clone()
    est = fimfast.DiagFisher(net, "empirical")
    with pytest.raises(ValueError, match="labels"):
        est.step(data[0])  # no labels: refused after the forward
    assert torch.equal(net[1].running_mean, stats)


# -- 7. the class axis ------------------------------------------------------------------------ #
class Seg(nn.Module):
    """Per-position classifier returning ``(N, C, L)`` (CrossEntropyLoss's layout)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 3, padding=1), nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


@pytest.mark.parametrize("kind", ("exact", "monte_carlo", "hutchinson"))
def test_three_dim_logits_without_a_class_axis_are_refused(kind):
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="class_dim"):
        estimate(Seg().double(), x, kind)


@pytest.mark.parametrize("kind", TYPES)
def test_class_dim_one_is_exact(kind):
    torch.manual_seed(0)
    m = Seg().double()
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 7))
    _, got = estimate(m, (x, y), kind, class_dim=1)
    assert_matches(got, reference(m, lambda: m(x).transpose(1, 2), y, kind))
    if kind == "empirical":  # the labels' shape names the layout on its own
        _, inferred = estimate(m, (x, y), kind)
        assert_matches(inferred, reference(m, lambda: m(x).transpose(1, 2), y, kind))


def test_four_dim_segmentation_logits(data):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 1)).double()
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 4, 5))
    _, got = estimate(m, (x, y), "empirical")
    ref = reference(m, lambda: m(x).permute(0, 2, 3, 1), y, "empirical")
    assert_matches(got, ref)


def test_ambiguous_labels_are_refused():
    m = nn.Conv1d(3, 4, 1).double()  # (N, 4, 4): labels (N, 4) fit both layouts
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="fit both"):
        estimate(m, (x, torch.randint(0, 4, (2, 4))), "empirical")


def test_bad_class_and_batch_dims_name_the_option():
    with pytest.raises(ValueError, match="class_dim"):
        fimfast.DiagFisher(mlp(), "exact", class_dim="last")
    with pytest.raises(ValueError, match="batch_dim"):
        fimfast.DiagFisher(mlp(), "exact", batch_dim=-1)
    with pytest.raises(ValueError, match="class_dim"):
        estimate(Seg().double(), torch.randn(2, 3, 5, dtype=torch.float64), "exact", class_dim=3)


# -- messages --------------------------------------------------------------------------------- #
def test_per_sample_ids_are_not_taken_for_shared_positions(caplog):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ids = torch.randint(0, 10, (7,))
    y = torch.randint(0, 3, (7,))
    with caplog.at_level(logging.INFO, logger="fimfast.persample"):
        est, got = estimate(m, (ids, y), "exact")
    assert "again" not in caplog.text and "generic path" not in caplog.text
    assert_matches(got, reference(m, lambda: m(ids), y))


def test_keyword_forward_points_to_forward_fn(data):
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 5)

        def forward(self, *, x):
            return self.l(x)

    with pytest.raises(TypeError, match="forward_fn"):
        estimate(KW().double(), data, "exact")
    est = fimfast.DiagFisher(KW().double(), "exact", forward_fn=lambda m, b: m(x=b[0]))
    est.step(data)


def test_functional_use_of_a_parameter_is_exact(data):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.w = nn.Parameter(torch.randn(5, 16))
            self.t = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return F.linear(torch.tanh(self.a(x)), self.w) * self.t

    torch.manual_seed(0)
    m = M().double()
    x, y = data
    _, got = estimate(m, (x, y), "exact")
    assert_matches(got, reference(m, lambda: m(x), y))


def test_no_grad_region_is_refused_by_hutchinson_too(data):
    with pytest.raises(UnsupportedModelError, match="gradients disabled"):
        estimate(NoGradFirst().double(), data, "hutchinson")


@pytest.mark.parametrize("kind", ("exact", "empirical"))
def test_reentrant_checkpoint_without_rule_layers_is_refused(data, kind):
    class M(nn.Module):  # bare parameters only: no captured call at all
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 8, dtype=torch.float64))

        def forward(self, x):
            x = x * 1.0
            x.requires_grad_(True)
            return checkpoint(lambda t: t @ self.w.t(), x, use_reentrant=True)

    with pytest.raises(UnsupportedModelError, match="use_reentrant"):
        estimate(M(), data, kind)


@pytest.mark.parametrize("kind", TYPES)
def test_non_reentrant_checkpoint_around_attention(kind):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.emb(x)
            h = checkpoint(lambda t: self.attn(t, t, t, need_weights=False)[0], h,
                           use_reentrant=False)
            return self.head(h.mean(1))

    torch.manual_seed(0)
    m = M().double().eval()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    _, got = estimate(m, (x, y), kind)
    assert_matches(got, reference(m, lambda: m(x), y, kind))


@pytest.mark.parametrize("pair", [(70, 71), (3, 97)])
def test_coupling_of_two_samples_in_a_large_batch(pair):
    """Beyond PROBE_SAMPLES the probe adds random halves of the batch: any coupled pair is seen."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            i, j = pair
            mix = torch.zeros_like(h)
            mix[i] = h[j]
            return self.b(h + 0.5 * mix)

    torch.manual_seed(0)
    m = M().double()
    x = torch.randn(100, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (100,))
    est, got = estimate(m, (x, y), "empirical")
    assert est._persample.last_plan.generic  # a.weight, a.bias: coupled
    assert_matches(got, reference(m, lambda: m(x), y, "empirical"))


def test_sequence_first_with_a_large_batch_and_t_equal_n():
    """T == N beyond PROBE_SAMPLES: every sample is probed, and the data flow picks axis 1."""
    torch.manual_seed(0)
    m = SeqFirst(d=4).double().eval()
    x = torch.randn(66, 66, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (66,))
    est, _ = estimate(m, (x, y), "empirical", batch_dim=1)
    plan = est._persample.last_plan
    assert plan.generic == []
    taps = [t for c in plan.calls for t in c.taps if len(t.cands) == 2]
    assert taps and all(t.bdim == 1 for t in taps)


def test_structured_fisher_does_not_guess_the_class_axis():
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="class_dim"):
        fimfast.fisher(Seg().double(), [x], "exact", representation="block_diag")
    y = torch.randint(0, 4, (5, 7))
    with pytest.raises(UnsupportedModelError, match="class_dim=1"):
        fimfast.fisher(Seg().double(), [(x, y)], "empirical", representation="dense",
                       class_dim=1)
