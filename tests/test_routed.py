"""Layers on rows routed from the batch (fimfast/rules/routed.py): mixture-of-experts blocks
(top-1 / top-2, by index, by boolean masks and by sorting, Linear / MLP / SwiGLU experts) and a
plain batch split, against the float64 oracle of every step (tests/adversarial.py), with the
experts on the fast path (no generic parameter)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from adversarial import max_rel, nonzero, run
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.moe_models import MoE, MoEClassifier, MoELM, Split  # noqa: E402

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson"]
V, C, T, N = 11, 3, 6, 5


def _batches(kind: str, n: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "split":
            out.append((torch.randn(N, 6, generator=g, dtype=torch.float64),
                        torch.randint(0, 4, (N,), generator=g)))
        elif kind == "lm":
            ids = torch.randint(0, V, (N, T), generator=g)
            y = torch.randint(0, V, (N, T), generator=g)
            y[0, :2] = -100  # ignored tokens
            y[3, 4] = -100
            out.append((ids, y))
        else:
            out.append((torch.randint(0, V, (N, T), generator=g),
                        torch.randint(0, C, (N,), generator=g)))
    return out


MODELS = {
    "split": (lambda: Split(), "split"),
    "cls_index_top1_mlp": (lambda: MoEClassifier(E=3), "cls"),
    "cls_mask_top2_mlp": (lambda: MoEClassifier(k=2, dispatch="mask"), "cls"),
    "cls_index_top2_swiglu": (lambda: MoEClassifier(k=2, kind="swiglu"), "cls"),
    "cls_mask_top1_linear": (lambda: MoEClassifier(E=3, dispatch="mask", kind="linear"), "cls"),
    "lm_index_top2_mlp": (lambda: MoELM(k=2), "lm"),
    "lm_mask_top1_linear": (lambda: MoELM(E=2, dispatch="mask", kind="linear"), "lm"),
    "cls_sort_top2_mlp": (lambda: MoEClassifier(k=2, dispatch="sort"), "cls"),
    "lm_sort_top1_swiglu": (lambda: MoELM(E=3, dispatch="sort", kind="swiglu"), "lm"),
}


def _model(name: str, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().double()


def _fast(est) -> None:
    """Every parameter took the rules (the experts' rows mapped to their samples)."""
    plan = est._persample.last_plan
    assert plan.generic == [], plan.reasons


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_routed_matches_oracle(name, fim_type):
    model = _model(name)
    est, ref = run(model, _batches(MODELS[name][1]), fim_type, num_probes=2)
    assert nonzero(ref)  # every expert got rows: no vacuous comparison
    assert max_rel(est, ref) < 1e-10
    if fim_type != "hutchinson":
        _fast(est)


@pytest.mark.parametrize("fim_type", ["exact", "monte_carlo"])
@pytest.mark.parametrize("dispatch", ["index", "mask", "sort"])
def test_empty_experts_and_router_changes(dispatch, fim_type):
    """Step 0 sends every token to expert 0 (the others get no rows), step 1 lets the router
    choose, step 2 sends everything to expert 2, step 3 lets it choose again with new router
    weights: each structure is probed, each step exact."""
    torch.manual_seed(3)
    model = MoEClassifier(E=3, k=2, dispatch=dispatch).double()
    forced = {0: 0, 1: None, 2: 2, 3: None}

    def before(i, m):
        m.moe.force = forced[i]
        if i == 3:
            with torch.no_grad():
                m.moe.router.weight.copy_(torch.randn_like(m.moe.router.weight))

    est, ref = run(model, _batches("cls", n=4, seed=5), fim_type, before=before)
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    _fast(est)


def test_one_expert_for_all_rows():
    """All rows through one expert, in every step: the others' Fisher is exactly zero."""
    torch.manual_seed(4)
    model = MoEClassifier(E=3).double()
    model.moe.force = 1
    est, ref = run(model, _batches("cls"), "exact")
    got = dict(est.result().items())
    for n, r in ref.items():
        if n.startswith("moe.experts.0") or n.startswith("moe.experts.2"):
            assert float(r.abs().max()) == 0 and float(got[n].abs().max()) == 0
        else:
            assert float(r.abs().max()) > 0, n
    assert max_rel(est, ref) < 1e-10
    _fast(est)


class _Misrouted(torch.nn.Module):
    """A batch split whose branch outputs go back to other samples than the ones they came from
    (``out[perm[m]] = a(h[m])``): the rows' samples read from the gather are wrong downstream,
    which the probe sees: generic path, exact."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(6, 8)
        self.a = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        m = (x[:, 0] > 0).nonzero().squeeze(1)
        out = h.new_zeros(x.shape[0], 4)
        return out.index_add(0, m.flip(0), self.a(h[m]))


def test_rows_mixing_samples_stay_exact():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x[:3, 0] = x[:3, 0].abs() + 0.1  # three rows in the branch, reversed on the way back
    batches = [(x, torch.randint(0, 4, (6,), generator=g))]
    est, ref = run(_Misrouted().double(), batches, "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    plan = est._persample.last_plan
    assert plan.generic and "couple" in " ".join(plan.reasons.values())


class _InputSplit(torch.nn.Module):
    """A split of the raw input (no gradient: nothing in the graph says where its rows came
    from): generic path, exact."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)

    def forward(self, x):
        m = x[:, 0] > 0
        out = x.new_zeros(x.shape[0], 4)
        out[m] = self.a(x[m])
        out[~m] = self.b(x[~m])
        return out


def test_split_of_the_input_stays_exact():
    torch.manual_seed(6)
    est, ref = run(_InputSplit().double(), _batches("split"), "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10


def test_float32_token_rows_close_to_oracle():
    """float32 model, sequence-level (N, T, C) logits with ignored tokens, top-2 by masks."""
    torch.manual_seed(7)
    model = MoELM(k=2, dispatch="mask")
    est, ref = run(model, _batches("lm"), "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-4
    _fast(est)


def test_moe_block_on_flat_tokens():
    """A MoE block on ``(N, d)`` rows (one token per sample): rows are samples."""
    torch.manual_seed(8)
    moe = MoE(6, 8, E=3, k=2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), moe, torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(7, 4, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (7,), generator=g)) for _ in range(2)]
    est, ref = run(model, batches, "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    _fast(est)


def test_rows_mixing_samples_after_an_empty_step():
    """The misrouted branch gets no rows in the first step (nothing to probe) and rows from the
    second on: that step is another structure, probed again, and its branch goes generic."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x0[:, 0] = -x0[:, 0].abs() - 0.1  # no row in the branch
    x1 = x0.clone()
    x1[:3, 0] = -x1[:3, 0]
    batches = [(x, torch.randint(0, 4, (6,), generator=g)) for x in (x0, x1)]
    est, ref = run(_Misrouted().double(), batches, "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    assert est._persample.last_plan.generic


class _FlatLM(torch.nn.Module):
    """:class:`MoELM` with its logits flattened to ``(N * T, V)`` (1-D labels: every token is a
    sample of its own)."""

    def __init__(self):
        super().__init__()
        self.lm = MoELM(k=2, dispatch="mask")

    def forward(self, ids):
        return self.lm(ids).reshape(-1, V)


def test_flattened_token_logits():
    torch.manual_seed(9)
    batches = [(ids, y.reshape(-1)) for ids, y in _batches("lm", n=2)]
    est, ref = run(_FlatLM().double(), batches, "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    # tokens as samples: the (N, T, d) layers have no dim of N * T (generic), the experts do
    names = [n for n, p in est.model.named_parameters() if p.requires_grad]
    generic = {names[i] for i in est._persample.last_plan.generic}
    assert generic and not any(n.startswith("lm.moe.") for n in generic)


class _SharedExpert(torch.nn.Module):
    """One expert called on both branches of a split (its uses add up) and on every sample
    twice in one call (``h[idx]`` with ``idx`` repeating the batch: a sample's two rows add
    before the square)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(6, 8)
        self.e = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        m = x[:, 0] > 0
        out = h.new_zeros(x.shape[0], 4)
        out[m] = self.e(h[m])
        out[~m] = 2 * self.e(h[~m] * 0.5)
        idx = torch.arange(x.shape[0]).repeat(2)
        return out + self.e(h[idx]).view(2, -1, 4).sum(0)


class _PermutedHead(torch.nn.Module):
    """The logits layer on a permutation of the samples, put back in order after it: its rows are
    not the logits' rows (no closed-form head), each row maps to its sample."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        perm = torch.argsort(x[:, 1])
        return self.fc(h[perm])[torch.argsort(perm)]


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo"])
@pytest.mark.parametrize("model", [_SharedExpert, _PermutedHead])
def test_shared_expert_and_permuted_rows(model, fim_type):
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(7, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (7,), generator=g)) for _ in range(3)]
    est, ref = run(model().double(), batches, fim_type)
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    _fast(est)


class _CheckpointedMoE(torch.nn.Module):
    """A MoE block inside a non-reentrant checkpoint (``inside``: generic path, the recomputation
    must save what the forward saved), or a gather inside one and the expert after it."""

    def __init__(self, inside: bool):
        super().__init__()
        self.stem, self.fc = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.moe = MoE(6, 8, 3, 2) if inside else None
        self.inside = inside

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        if self.inside:
            return self.fc(checkpoint(self.moe, h, use_reentrant=False))
        m = x[:, 0] > 0
        g = checkpoint(lambda t: t[m] * 2, h, use_reentrant=False)
        out = x.new_zeros(x.shape[0], 3)
        out[m] = self.fc(g)
        return out


@pytest.mark.parametrize("inside", [True, False])
def test_checkpointed_routing(inside):
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    est, ref = run(_CheckpointedMoE(inside).double(), batches, "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    if not inside:
        _fast(est)
