"""The model panel shared by the tests: tiny models, their batches and their valid rows.

Each case knows how to build the library's batch and, independently, the logits and the valid-row
mask for the float64 oracle (tests/oracle.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


@dataclass
class Case:
    """A model, a batch and the oracle's view of them.

    Attributes:
        name: readable id.
        model: the network.
        batch: what ``diag_fim_step`` / ``DiagFisher.step`` receive.
        logits_fn: ``logits_fn(model, batch) -> (N, C) or (N, T, C)`` for the oracle.
        valid: bool mask of the valid rows, shaped like the logits without ``C``.
        labels: labels as the oracle sees them (or ``None``).
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
        C: number of outputs.
    """

    name: str
    model: nn.Module
    batch: Any
    logits_fn: Callable[[nn.Module, Any], torch.Tensor]
    valid: torch.Tensor
    labels: torch.Tensor | None
    likelihood: str
    C: int

    def batch_double(self) -> Any:
        """The batch with floating tensors in float64."""
        return _to_double(self.batch)

    def to(self, dtype: torch.dtype) -> Case:
        """A copy with the model and floating inputs in ``dtype``."""
        model = copy.deepcopy(self.model).to(dtype)
        return Case(self.name, model, _cast(self.batch, dtype), self.logits_fn, self.valid,
                    self.labels, self.likelihood, self.C)


def classifier_case(model: nn.Module, batch: tuple, C: int, name: str = "classifier") -> Case:
    """The :class:`Case` of a classifier ``model(x)`` with ``C`` classes on a batch ``(x,
    labels)``: ``(N, C)`` logits, every row valid, categorical."""
    x, y = batch
    return Case(name, model, batch, lambda m, b: m(b[0]), torch.ones(x.shape[0], dtype=torch.bool),
                y, "categorical", C)


def _param_hook(model: nn.Sequential) -> list:
    return [model[0].weight.register_hook(lambda g: 2 * g)]


def _module_hook(model: nn.Sequential) -> list:
    return [model[2].register_full_backward_hook(lambda m, gi, go: (3 * gi[0],)),
            model[0].register_full_backward_pre_hook(lambda m, go: (0.5 * go[0],))]


def _global_hook(model: nn.Sequential) -> list:
    from torch.nn.modules.module import register_module_full_backward_hook

    return [register_module_full_backward_hook(
        lambda m, gi, go: tuple(None if t is None else 2 * t for t in gi))]


GRADIENT_HOOKS = [_param_hook, _module_hook, _global_hook]
"""Gradient hooks a user may register on an ``nn.Sequential`` of at least three modules (a
parameter hook, module backward (pre-)hooks, a global module backward hook), each registering and
returning its handles: they change what autograd reports, never the model's Fisher."""


class MHAHead(nn.Module):
    """A float64 classifier of ``(N, D)`` inputs through ``nn.MultiheadAttention`` (one head) over
    three scaled copies of each input, then a Linear to ``C`` classes (seeded weights)."""

    def __init__(self, D: int, C: int):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.MultiheadAttention(D, 1, batch_first=True).double()
        self.o = nn.Linear(D, C).double()

    def forward(self, x):
        s = x.unsqueeze(1).expand(-1, 3, -1) * torch.tensor([1.0, 0.5, -1.0]).view(1, 3, 1)
        return self.o(self.a(s, s, s, need_weights=False)[0].mean(1))


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _to_double(x: Any) -> Any:
    return _cast(x, torch.float64)


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class TinyEncoder(nn.Module):
    """Embedding + LayerNorm + MultiheadAttention + mean pooling + Linear head."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, C: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.emb(ids))
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head((x + a).mean(1))


class TiedNet(nn.Module):
    """One Linear applied twice (shared weights) and a head."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TinyTokenLM(nn.Module):
    """Token-level model with padding: embedding, masked attention, tied output head (HF-like)."""

    def __init__(self, vocab: int = 9, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied input/output embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.emb(input_ids)
        pad = None if attention_mask is None else attention_mask == 0
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        return SimpleNamespace(logits=self.out(self.norm(x + a)))


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _plain(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(_first(batch))


def make_case(name: str, N: int = 5, seed: int = 0) -> Case:
    """Build the panel case ``name`` (float32, deterministic for a ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name in ("relu_mlp", "sigmoid_mlp"):
        act = nn.ReLU if name == "relu_mlp" else nn.Sigmoid
        sizes = [6, 8, 5] if name == "relu_mlp" else [6, 7, 7, 5]
        model = _mlp(sizes, act)
        x = torch.randn(N, 6, generator=g)
        y = torch.randint(0, 5, (N,), generator=g)
        return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y,
                    "categorical", 5)
    if name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2),
                              nn.Flatten(), nn.Linear(2, 4))
        x = torch.randn(N, 1, 6, 6, generator=g)
        y = torch.randint(0, 4, (N,), generator=g)
        return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y,
                    "categorical", 4)
    if name == "encoder":
        model = TinyEncoder()
        ids = torch.randint(0, 11, (N, 4), generator=g)
        y = torch.randint(0, 3, (N,), generator=g)
        return Case(name, model, (ids, y), _plain, torch.ones(N, dtype=torch.bool), y,
                    "categorical", 3)
    if name == "tied":
        model = TiedNet()
        x = torch.randn(N, 6, generator=g)
        y = torch.randint(0, 4, (N,), generator=g)
        return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y,
                    "categorical", 4)
    if name == "multilabel":
        model = _mlp([6, 7, 4], nn.Tanh)
        x = torch.randn(N, 6, generator=g)
        y = (torch.rand(N, 4, generator=g) < 0.5).float()
        return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y,
                    "bernoulli", 4)
    if name == "regression":
        model = _mlp([6, 7, 3], nn.Tanh)
        x = torch.randn(N, 6, generator=g)
        y = torch.randn(N, 3, generator=g)
        return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y,
                    "gaussian", 3)
    if name == "token_lm":
        model = TinyTokenLM()
        T = 4
        ids = torch.randint(1, 9, (N, T), generator=g)
        mask = torch.ones(N, T, dtype=torch.long)
        for n in range(N):  # right padding of varying length, at least 2 real tokens
            real = 2 + n % (T - 1)
            mask[n, real:] = 0
        labels = torch.randint(0, 9, (N, T), generator=g)
        labels[mask == 0] = -100
        labels[0, 0] = -100  # an ignored real token as well
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

        def lm_logits(model: nn.Module, b: Any) -> torch.Tensor:
            return model(b["input_ids"], b["attention_mask"]).logits

        valid = (mask != 0) & (labels != -100)
        return Case(name, model, batch, lm_logits, valid, labels, "categorical", 9)
    raise KeyError(name)


PANEL = ["relu_mlp", "sigmoid_mlp", "cnn", "encoder", "tied", "multilabel", "regression",
         "token_lm"]
CATEGORICAL = [c for c in PANEL if c not in ("multilabel", "regression")]


def run_case(case: Case, fim_type: str, rules: bool = True, **opts) -> tuple[dict, Any]:
    """One step of ``fim_type`` on ``case`` (``rules=False``: every parameter on the generic
    path), as ``(result by name, estimator)``; 3-D logits are read with ``class_dim=-1``."""
    from fimfast import DiagFisher

    est = DiagFisher(case.model, fim_type, likelihood=case.likelihood, class_dim=-1, **opts)
    est._persample.use_rules = rules
    est.step(case.batch)
    return dict(est.result().items()), est


def check_fast_twice(
    case: Case, fim_type: str, ref: dict, tol: float, unused: frozenset = frozenset()
) -> Any:
    """One step of ``fim_type`` on ``case`` with no parameter on the generic path equals ``ref``
    (``{name: tensor}``) to ``tol``, and so does half the sum after a second step (the plan of
    the first bound to the second one's calls); returns the estimator. The parameters the step
    finds unused (no path to the logits) must be exactly ``unused`` (names): a model whose
    parameters never reach the logits checks nothing about their rules."""
    from oracle import rel_error

    got, est = run_case(case, fim_type)
    plan = est._persample.last_plan
    assert not plan.generic, plan.reasons
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert {names[i] for i in plan.unused} == set(unused), "unused parameters"
    assert rel_error(got, ref) <= tol
    est.step(case.batch)
    assert rel_error({k: v / 2 for k, v in est.result().items()}, ref) <= tol
    return est


def check_monte_carlo_same_seed(case: Case, rj, tol: float) -> Any:
    """One MONTE_CARLO draw (seed 11) equals the float64 empirical Fisher ``rj`` (the case's
    :func:`oracle.row_jacobians`) at the labels that draw samples, and two draws (seed 5) on the
    rules' fast path equal the generic path's with the same seed, to ``tol``; returns the first
    estimator (for its plan)."""
    import dataclasses

    from oracle import oracle_flat, rel_error

    from fimfast.ops.torch_ref import sample_labels_torch

    got, est = run_case(case, "monte_carlo", seed=11)
    labels = sample_labels_torch(rj.z, 11, 0, 1)[0]
    ref = rj.split(oracle_flat(dataclasses.replace(rj, labels=labels), case.likelihood,
                               "empirical"))
    assert rel_error(got, ref) <= tol
    fast, _ = run_case(case, "monte_carlo", seed=5, num_probes=2)
    slow, gen = run_case(case, "monte_carlo", rules=False, seed=5, num_probes=2)
    assert not gen._persample.last_plan.groups
    assert rel_error(fast, slow) <= tol
    return est


class Fn(nn.Module):
    """A module running ``fwd(self, x)`` over the submodules given by keyword."""

    def __init__(self, fwd, **mods):
        super().__init__()
        self.fwd = fwd
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fwd(self, x)


def assert_same_estimators(a, b) -> None:
    """Two estimators hold bit-for-bit the same results and the same counts."""
    ra, rb = a.result(), b.result()
    assert list(ra) == list(rb)
    for n in ra:
        assert torch.equal(ra[n], rb[n]), n
    assert (a.state.count, a.state.steps, a.offset) == (b.state.count, b.state.steps, b.offset)


def empirical_oracle(model: nn.Module, batches: list) -> list[torch.Tensor]:
    """``sum_n (d log p(y_n | x_n) / d theta)^2`` over ``(x, y)`` ``batches`` in float64, one
    sample at a time, on a float64 copy of ``model`` (rows labelled below 0 are skipped)."""
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for n in range(len(y)):
            if y[n] < 0:
                continue
            lp = torch.log_softmax(model(x[n : n + 1].double()), -1)[0, y[n]]
            for o, g in zip(out, torch.autograd.grad(lp, params)):
                o += g**2
    return out


def lane_mlp(dtype: torch.dtype = torch.float32, bias: bool = True,
             conv1d: bool = False) -> nn.Sequential:
    """The MLP 6-8-8-4 of the one-column step's tests (``conv1d``: its first two layers Hugging
    Face ``Conv1D``, weights stored ``(in, out)``), seeded."""
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(8, 6), nn.Tanh(), Conv1D(8, 8), nn.ReLU(),
                             nn.Linear(8, 4)).to(dtype)
    return nn.Sequential(
        nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).to(dtype)


def lane_batches(dtype: torch.dtype = torch.float32, k: int = 4, n: int = 5,
                 ignore: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` seeded batches ``(x, y)`` of ``n`` rows for :func:`lane_mlp` (``ignore``: every
    other label ``-100``)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(k):
        x, y = torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)
        if ignore:
            y = torch.where(torch.arange(n) % 2 == 0, y, -100)
        out.append((x, y))
    return out
