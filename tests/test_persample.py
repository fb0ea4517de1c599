"""The per-sample estimators (EXACT, EMPIRICAL, MONTE_CARLO) on the model panel and at scale.

* the whole panel (tests/cases.py) against the float64 oracle in float32 and float64;
* MONTE_CARLO draws the same labels as the generic path (and as ``ops.probe_logit_grad`` mode
  ``mc``) for the same seed;
* EXACT at C = 2, 10 and 1000; class chunking and the memory budget do not change the result;
* the reduced factor of the categorical core FIM;
* a model whose per-sample gradients would need several GB runs in a small budget (peak RSS of a
  subprocess);
* ``train_step`` and the functional API through the engine.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from cases import CATEGORICAL, PANEL, TinyEncoder, make_case
from oracle import RowJacobians, core_matrix, oracle_flat, quad_diag, row_jacobians
from oracle import rel_error as _rel
from tolerances import BF16_REL, DET_REL_F32, DET_REL_F64, PERSAMPLE_PEAK_MB
from torch import nn

import fimfast
from fimfast import DiagFisher, FIMType, Options
from fimfast.ops.torch_ref import sample_labels_torch
from fimfast.persample import Columns

TYPES = ["exact", "empirical", "monte_carlo"]



_RJ: dict[str, RowJacobians] = {}


def oracle(case, quantity: str) -> dict[str, torch.Tensor]:
    """tests/oracle.py's float64 oracle, with the row Jacobians of each case computed once."""
    if case.name not in _RJ:
        _RJ[case.name] = row_jacobians(case)
    rj = _RJ[case.name]
    return rj.split(oracle_flat(rj, case.likelihood, quantity))


def _jacrev_exact(case) -> dict[str, torch.Tensor]:
    """Float64 EXACT by ``torch.func.jacrev`` of every sample (many classes, (N, C) logits)."""
    from torch.func import functional_call, jacrev, vmap

    model = copy.deepcopy(case.model).double()
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = case.batch_double()[0]

    def f(ps, xi):
        return functional_call(model, ps, (xi.unsqueeze(0),))[0]

    with warnings.catch_warnings():  # vmap of CPU flash attention: slow fallback, same values
        warnings.simplefilter("ignore", UserWarning)
        J = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (N, C, *shape)}
    z = model(x).detach()
    Jf = torch.cat([J[n].reshape(x.shape[0], z.shape[1], -1) for n in names], dim=-1)
    flat = quad_diag(Jf, core_matrix(z, "categorical"))
    out, i = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[i : i + k].reshape(params[n].shape)
        i += k
    return out


def _run(case, fim_type, rules=True, seed=7, **opts):
    est = DiagFisher(case.model, fim_type, likelihood=case.likelihood, seed=seed, **opts)
    est._persample.use_rules = rules
    est.step(case.batch)
    return dict(est.result().items()), est


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", PANEL, ids=PANEL)
def test_panel_float32_matches_oracle(name, quantity):
    case = make_case(name)
    got, est = _run(case, quantity)
    assert _rel(got, oracle(case, quantity)) <= DET_REL_F32
    assert not est._persample.last_plan.generic  # every panel layer has a rule


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", PANEL, ids=PANEL)
def test_panel_fast_equals_generic_float64(name, fim_type):
    case = make_case(name).to(torch.float64)
    got, _ = _run(case, fim_type, num_probes=2)
    ref, est = _run(case, fim_type, rules=False, num_probes=2)
    assert not est._persample.last_plan.groups
    assert _rel(got, ref) <= DET_REL_F64


@pytest.mark.parametrize("name", CATEGORICAL, ids=CATEGORICAL)
def test_monte_carlo_is_empirical_at_the_sampled_labels(name):
    """One draw of MONTE_CARLO = EMPIRICAL with labels drawn by mode ``mc`` (same seed/offset)."""
    case = make_case(name).to(torch.float64)
    got, _ = _run(case, "monte_carlo", seed=11)
    oracle(case, "exact")  # fills the cache
    rj = dataclasses.replace(_RJ[case.name])
    rj.labels = sample_labels_torch(rj.z, 11, 0, 1)[0]
    ref = rj.split(oracle_flat(rj, "categorical", "empirical"))
    assert _rel(got, ref) <= DET_REL_F64


class _MLP(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(),
                                 nn.Linear(7, C))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("C", [2, 10, 1000], ids=["C2", "C10", "C1000"])
@pytest.mark.parametrize("arch", ["mlp", "encoder"])
def test_exact_float32_matches_oracle_many_classes(arch, C):
    from cases import Case

    g = torch.Generator().manual_seed(C)
    torch.manual_seed(C)
    N = 3
    if arch == "mlp":
        model, x = _MLP(C), torch.randn(N, 6, generator=g)
    else:
        model, x = TinyEncoder(C=C), torch.randint(0, 11, (N, 4), generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    case = Case(f"{arch}{C}", model, (x, y), lambda m, b: m(b[0]), torch.ones(N, dtype=bool),
                y, "categorical", C)
    got, est = _run(case, "exact")
    assert _rel(got, _jacrev_exact(case)) <= DET_REL_F32
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("chunk", [1, 3, 7, None], ids=["k1", "k3", "k7", "auto"])
@pytest.mark.parametrize("name", ["sigmoid_mlp", "encoder", "multilabel"])
def test_class_chunk_gives_the_same_result(name, chunk):
    case = make_case(name).to(torch.float64)
    got, _ = _run(case, "exact", class_chunk=chunk)
    ref, _ = _run(case, "exact", class_chunk=None)
    assert _rel(got, ref) <= DET_REL_F64


def test_tiny_memory_budget_gives_the_same_result(monkeypatch):
    case = make_case("cnn").to(torch.float64)
    ref, _ = _run(case, "exact")
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.0001")  # one column per backward
    got, _ = _run(case, "exact")
    assert _rel(got, ref) <= DET_REL_F64


@pytest.mark.parametrize("peaked", [False, True], ids=["spread", "peaked"])
def test_reduced_categorical_factor(peaked):
    """``B^T B = diag(p) - p p^T`` for the ``C - 1`` columns of the reduced factor."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64) * (12.0 if peaked else 1.0)
    cols = Columns(z, None, FIMType.EXACT, Options(), 0, 0)
    assert cols.num == 6
    B = cols.take(torch.arange(cols.num))  # (C-1, R, C)
    p = torch.softmax(z, -1)
    core = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    got = torch.einsum("krc,krd->rcd", B, B)
    assert float((got - core).abs().max()) <= 1e-14
    assert torch.allclose(cols.S, p * (1 - p), rtol=0, atol=1e-15)
    assert torch.allclose(cols.root.square(), p * (1 - p), rtol=0, atol=1e-15)


_MEM_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, json, torch
    from torch import nn
    import fimfast
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 4096), nn.Tanh(), nn.Linear(4096, 64))
    x, y = torch.randn(128, 2048), torch.randint(0, 64, (128,))
    est = fimfast.DiagFisher(model, "exact")
    with torch.no_grad():
        model(x)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    est.step((x, y))
    peak = status("VmHWM") - base
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak": peak, "persample_bytes": 4 * 128 * params,
                      "fast": len(est._persample.last_plan.fast)}))
    """
)


def test_exact_memory_stays_small_where_per_sample_gradients_need_gigabytes():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak RSS needs a writable /proc/self/clear_refs (Linux)")
    env = {**os.environ, "FIMFAST_MEMORY_BUDGET_MB": "16"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(fimfast.__file__)), env.get("PYTHONPATH", "")]
    )
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["persample_bytes"] > 4 * 2**30  # the per-sample gradients would need > 4 GB
    assert res["fast"] == 4
    assert res["peak"] <= PERSAMPLE_PEAK_MB * 2**20, res


def test_train_step_fisher_and_gradients():
    case = make_case("encoder").to(torch.float64)
    est = DiagFisher(case.model, "exact", seed=1)
    loss = est.train_step(case.batch)
    fisher = dict(est.result().items())
    grads = {n: p.grad.clone() for n, p in case.model.named_parameters()}
    case.model.zero_grad(set_to_none=True)
    x, y = case.batch
    ref_loss = torch.nn.functional.cross_entropy(case.model(x), y)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss.detach())
    for n, p in case.model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-12, atol=1e-14)
    assert _rel(fisher, oracle(case, "exact")) <= DET_REL_F64


def test_functional_api_uses_the_engine():
    case = make_case("cnn").to(torch.float64)
    fimfast.zero_diag_fim(case.model, fim_type="exact")
    fimfast.diag_fim_step(case.model, case.batch, FIMType.EXACT, {})
    got = fimfast.get_diag_fim(case.model, fim_type="exact")
    est = fimfast.get_estimator(case.model, "exact")
    assert est._persample.last_plan.fast
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64


def test_bf16_model_close_to_float32():
    case = make_case("sigmoid_mlp")
    ref, _ = _run(case, "exact")
    got, est = _run(case.to(torch.bfloat16), "exact")
    assert all(v.dtype == torch.float32 for v in got.values())
    assert est._persample.last_plan.fast
    assert _rel(got, ref) <= BF16_REL


def test_only_unknown_modules_uses_the_generic_path():
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))
            self.b = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return torch.tanh(x @ self.w) + self.b

    from cases import Case

    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    case = Case("affine", Affine(), (x, y), lambda m, b: m(b[0]), torch.ones(5, dtype=bool), y,
                "categorical", 3).to(torch.float64)
    # its parameters are used by functional calls (x @ w, + b): captured (fimfast/functional.py)
    got, est = _run(case, "exact")
    assert not est._persample.last_plan.generic
    assert len(est._persample.last_plan.fast) == 2
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    # with functional calls left uncaptured, the module without a rule takes the generic path
    est = DiagFisher(case.model, "exact", seed=7)
    est._persample.functional = False
    est.step(case.batch)
    assert len(est._persample.last_plan.generic) == 2
    assert _rel(dict(est.result().items()), oracle(case, "exact")) <= DET_REL_F64


class _PositionModel(nn.Module):
    """Token + position embeddings, the positions looked up once for the batch with ``(1, T)``
    ids (BERT, GPT-2); ``squeeze`` makes a forward that breaks if the lookup is expanded."""

    def __init__(self, squeeze: bool = False):
        super().__init__()
        self.squeeze = squeeze
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        T = ids.shape[1]
        p = self.pos(torch.arange(T).unsqueeze(0))
        if self.squeeze:  # (T, d): a view that needs the size-1 batch dim
            p = p.view(T, -1)
        h = torch.tanh(self.tok(ids) + p)
        return self.head(h.mean(1))


@pytest.mark.parametrize("squeeze", [False, True], ids=["broadcast", "fallback"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_shared_position_lookup(fim_type, squeeze):
    """A lookup shared by the batch is expanded to it: the table gets per-sample gradients from
    the engine (no generic path); a forward that breaks with the expanded lookup runs again
    without it, and the table takes the generic path. Both equal the generic reference."""
    from cases import Case

    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 2, 5], [3, 3, 3, 3], [0, 7, 9, 10]])
    y = torch.tensor([0, 2, 1])
    case = Case("pos", _PositionModel(squeeze), (ids, y), lambda m, b: m(b[0]),
                torch.ones(3, dtype=bool), y, "categorical", 3).to(torch.float64)
    got, est = _run(case, fim_type, num_probes=2)
    ref, _ = _run(case, fim_type, rules=False, num_probes=2)
    assert _rel(got, ref) <= DET_REL_F64
    generic = est._persample.last_plan.generic
    assert est._persample.expand_broadcast is (not squeeze)
    if squeeze:
        assert len(generic) == 1  # pos.weight
    else:
        assert not generic
    got2, _ = _run(case, fim_type, num_probes=2)  # the model's own forward is left as it was
    assert case.model(ids).shape == (3, 3)
    assert _rel(got2, ref) <= DET_REL_F64


class _FlatPositions(nn.Module):
    """Positions looked up with ids of shape ``(T,)`` (nanoGPT); ``mode`` ``"add"`` uses the
    ``(T, d)`` output as a broadcast term, ``"first"`` adds its first row to every token (an
    expanded ``(N, T, d)`` output would give every position's row instead: same shapes, other
    values). Dropout after the sum, and a side branch with a BatchNorm in train mode (which
    couples the samples of that branch only), exercise the replayed forward."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(5, 6)
        self.drop = nn.Dropout(0.25)
        self.side = nn.Embedding(11, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1]))
        h = self.tok(ids) + (p if self.mode == "add" else p[0])
        h = self.drop(h).mean(1) + self.norm(self.side(ids).mean(1))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("mode", ["add", "first"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_flat_position_ids_are_expanded_once_checked(fim_type, mode):
    """``(T,)`` ids are expanded when the first such forward gives the model's own logits (the
    table then needs no generic path); otherwise the step runs again unexpanded and the table
    takes the generic path. Either way the result equals the generic reference, the random
    stream and the running statistics advance as for one forward."""
    ids = torch.tensor([[1, 2, 2, 5, 0], [3, 3, 3, 3, 3], [0, 7, 9, 10, 4], [6, 1, 8, 2, 2]])
    y = torch.tensor([0, 2, 1, 1])
    torch.manual_seed(0)
    model = _FlatPositions(mode).double()
    start = copy.deepcopy(model.state_dict())

    def one_step(rules: bool):
        model.load_state_dict(start)
        est = DiagFisher(model, fim_type, seed=7, num_probes=2)
        est._persample.use_rules = rules
        torch.manual_seed(1)
        est.step((ids, y))
        return est, dict(est.result().items()), torch.get_rng_state(), copy.deepcopy(
            model.norm.state_dict()
        )

    est, got, rng, norm = one_step(True)
    _, ref, rng_ref, norm_ref = one_step(False)
    assert _rel(got, ref) <= DET_REL_F64
    eng = est._persample
    generic = {est.names[i] for i in eng.last_plan.generic}
    coupled = {"side.weight"}  # below the train-mode BatchNorm
    assert eng._flat_checked
    if mode == "add":
        assert eng.expand_flat and generic == coupled
    else:
        assert not eng.expand_flat and generic == coupled | {"pos.weight"}
    assert torch.equal(rng, rng_ref)  # the step drew dropout masks for one forward
    for k, v in norm_ref.items():
        assert torch.equal(norm[k], v), k
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        est.step((ids, y))  # checked once: one forward per step from now on
    finally:
        handle.remove()
    assert len(calls) == 1
    assert {est.names[i] for i in eng.last_plan.generic} == generic


class _BothLookups(nn.Module):
    """A ``(1, T)`` position lookup that expands fine, and a ``(T,)`` one whose expanded output
    breaks the forward (``view(T, -1)`` then a sum with ``(N, T, d)``)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(5, 6)
        self.pos2 = nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        T = ids.shape[1]
        p = self.pos(torch.arange(T).unsqueeze(0))
        p2 = self.pos2(torch.arange(T)).view(T, -1)
        return self.head(torch.tanh(self.tok(ids) + p + p2).mean(1))


def test_a_failing_flat_expansion_keeps_the_batch_shared_one():
    ids = torch.tensor([[1, 2, 2, 5, 0], [3, 3, 3, 3, 3], [0, 7, 9, 10, 4]])
    y = torch.tensor([0, 2, 1])
    torch.manual_seed(0)
    from cases import Case

    case = Case("both", _BothLookups(), (ids, y), lambda m, b: m(b[0]),
                torch.ones(3, dtype=bool), y, "categorical", 3).to(torch.float64)
    got, est = _run(case, "exact")
    ref, _ = _run(case, "exact", rules=False)
    assert _rel(got, ref) <= DET_REL_F64
    eng = est._persample
    assert eng.expand_broadcast and not eng.expand_flat
    assert {est.names[i] for i in eng.last_plan.generic} == {"pos2.weight"}


class _NormThenPosition(nn.Module):
    """A BatchNorm (train mode) runs before a position lookup whose expanded output breaks the
    forward (as in ``_PositionModel(squeeze=True)``)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.norm = nn.BatchNorm1d(6, momentum=None)  # cumulative: counts every update
        self.pos = nn.Embedding(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.norm(self.tok(ids).mean(1))
        p = self.pos(torch.arange(T).unsqueeze(0)).view(T, -1)
        return self.head(torch.tanh(h.unsqueeze(1) + p).mean(1))


def test_rerun_forward_updates_running_statistics_once():
    torch.manual_seed(0)
    m = _NormThenPosition().double()
    ref = copy.deepcopy(m)
    ids = torch.tensor([[1, 2, 2, 5], [3, 3, 3, 3], [0, 7, 9, 10]])
    y = torch.tensor([0, 2, 1])
    est = DiagFisher(m, "empirical")
    est.step((ids, y))  # a measurement: the running statistics are put back
    assert int(m.norm.num_batches_tracked) == 0
    est.train_step((ids, y))  # a training step updates them, once even though the forward reran
    assert est._persample.expand_broadcast is False  # the expanded forward failed and reran
    ref(ids)  # one forward in train mode
    assert int(m.norm.num_batches_tracked) == 1
    torch.testing.assert_close(m.norm.running_mean, ref.norm.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(m.norm.running_var, ref.norm.running_var, rtol=0, atol=0)


@pytest.mark.parametrize("seq", [False, True], ids=["rows", "tokens"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_hf_conv1d_rule(fim_type, seq):
    """Hugging Face ``Conv1D`` (weight stored (in, out)) through its rule, without and with weight
    sharing over tokens, and as the logits layer: equal to the generic reference."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from cases import Case
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Conv1D(7, 5)  # (nf=out, nx=in)
            self.b = Conv1D(4, 7)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h.mean(1) if seq else h)

    torch.manual_seed(0)
    x = torch.randn(3, 2, 5) if seq else torch.randn(3, 5)
    y = torch.tensor([0, 3, 1])
    case = Case("conv1d", Net(), (x, y), lambda m, b: m(b[0]), torch.ones(3, dtype=bool), y,
                "categorical", 4).to(torch.float64)
    got, est = _run(case, fim_type, num_probes=2)
    ref, _ = _run(case, fim_type, rules=False, num_probes=2)
    assert not est._persample.last_plan.generic
    assert _rel(got, ref) <= DET_REL_F64


@pytest.mark.parametrize("fim_type", ["exact", "monte_carlo"])
def test_engine_kernels_follow_the_backend_option(monkeypatch, fim_type):
    """Every op the engine calls runs on the backend the estimator was given."""
    import fimfast.ops as ops_mod

    seen = []
    real = ops_mod.resolve

    def spy(op, backend, device):
        name, fn = real(op, backend, device)
        seen.append((op, name))
        return name, fn

    monkeypatch.setattr(ops_mod, "resolve", spy)
    case = make_case("encoder")
    DiagFisher(case.model, fim_type, backend="torch").step(case.batch)
    ops_used = {op for op, _ in seen}
    assert {"shared_sq", "sq_matmul"} <= ops_used, ops_used
    assert {name for _, name in seen} == {"torch"}, seen
