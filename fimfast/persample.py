"""Per-sample estimators (EXACT, EMPIRICAL, MONTE_CARLO): the fast engine and the generic path.

Every row (sample, or unmasked token) of the batch is one term of the Fisher, and each estimator is
``sum over rows r and columns k of (d (u_{k,r} . z_r) / d theta)^2`` (docs/math.md §3-§4; the
columns ``u`` come from :mod:`fimfast.likelihoods`).

**Fast engine** (:class:`Engine`). The estimator's forward runs under a
:class:`fimfast.hooks.Capture` that taps the outputs of every layer with a rule
(:mod:`fimfast.layers`). One batched backward
(``is_grads_batched``) of a chunk of ``M`` columns from the logits to the taps gives the gradients
at the layer outputs, and the rules turn (layer input, output gradient) into per-row squared
parameter gradients with :func:`fimfast.ops.sq_matmul` / :func:`fimfast.ops.shared_sq`, never
forming per-row gradients of the whole model.

* ``(N, C)`` logits: samples are independent, so one column is ``u_k`` for every sample at once:
  ``C - 1`` backward columns for EXACT (categorical), ``num_probes`` for MONTE_CARLO, 1 for
  EMPIRICAL.
* ``(N, T, C)`` logits: tokens of one sequence interact (attention), so one column is a (class,
  token position) pair that covers that position of every sequence: ``T (C - 1)`` columns for
  EXACT, ``T`` per draw for EMPIRICAL/MONTE_CARLO.
* EXACT (categorical) back-propagates the ``C - 1`` columns of a reduced factor of
  ``I(z) = diag(p) - p p^T`` (:class:`Columns`) instead of the ``C`` columns of
  ``diag(sqrt p) - sqrt p p^T``: one backward column fewer (half the work at ``C = 2``).
* The layer whose output *is* the logits needs no backward: for its weight,
  ``F_W[o, i] = sum_r S_r[o] a_r[i]^2`` with ``S_r = sum_k u_{k,r}^2`` (``diag I(z_r)`` for EXACT).
  A single Linear classifier therefore costs one forward and one ``sq_matmul`` at any ``C``.
* Before trusting sample independence the engine probes it once per model structure: one
  backward column per sample (see :meth:`Engine._probe`), whose gradient must vanish at every
  other sample of every tap; the same probe decides each tap's batch dimension from the data flow
  (never from sizes alone: ``(T, N, d)`` with ``T == N`` is told apart). BatchNorm in train
  mode, a ``cumsum`` over the batch or any other op that mixes samples fails it for the layers
  below it. Every step also walks the whole autograd graph: every parameter it estimates must be
  used only inside captured calls, and every tap must reach the logits (a module inside a
  compiled region does not). Parameters that fail either check, belong to modules without a
  rule, or combine uses the rules cannot add up, take the generic path: nothing is skipped. A
  reentrant checkpoint, or a module with trainable parameters run with gradients disabled, is
  refused (:class:`fimfast.types.UnsupportedModelError`); layers inside a non-reentrant
  checkpoint are left uncaptured, so the recomputation matches. The sample-independence verdict
  is kept per structure of the captured calls (their modules, modes and tap layouts), so a
  forward that mixes the samples in some steps only is not supported. The resulting plan is
  reused by later steps of the same structure (calls, uses, verdicts, parameter edges, head,
  batch of one or more), bound to their own calls. See ``docs/exactness.md``.
* Memory: a chunk's columns and tap gradients fit ``FIMFAST_MEMORY_BUDGET_MB`` (or ``M`` =
  ``class_chunk``), so memory stays bounded at any ``C``.

**Generic path** (:func:`accumulate_columns`): one backward per (row, column) pair from a single
forward of the whole batch, batched with ``is_grads_batched`` in chunks whose size comes from the
memory budget, squaring the per-pair parameter gradients. It works for any model autograd can
differentiate and is the reference every rule is tested against.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fimfast import _env, hooks, layers, likelihoods, ops
from fimfast.state import Sums
from fimfast.types import FIMType, Options, UnsupportedModelError

log = logging.getLogger("fimfast.persample")

# samples probed one by one for coupling and batch dims (all of them up to this many), and random
# halves of larger batches (see Engine._probe and _probe_sets)
PROBE_SAMPLES = 64
PROBE_SUBSETS = 32


# --------------------------------------------------------------------------------------------- #
# generic path
# --------------------------------------------------------------------------------------------- #
def _batched_grads(flat, params, cot, retain_graph: bool):
    """``autograd.grad`` with a batch of cotangents; a loop where vmap cannot batch an op.

    ``retain_graph=False`` frees the graph's buffers as the backward goes (one column only: a
    batched backward that fails part-way must be able to run again as a loop)."""
    if cot.shape[0] == 1:  # one column: no vmap (its set-up costs more than a small backward)
        grads = torch.autograd.grad(
            flat, params, grad_outputs=cot[0], retain_graph=retain_graph, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        return torch.autograd.grad(
            flat,
            params,
            grad_outputs=cot,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        per = [
            torch.autograd.grad(flat, params, grad_outputs=c, retain_graph=True, allow_unused=True)
            for c in cot
        ]
        return [
            None if per[0][i] is None else torch.stack([g[i] for g in per])
            for i in range(len(params))
        ]


def pair_chunk(R: int, C: int, params: list[torch.Tensor], budget: int | None = None) -> int:
    """(row, column) pairs per batched backward so that gradients and cotangents fit the budget."""
    budget = _env.memory_budget_bytes() if budget is None else budget
    per_pair = 4 * (sum(p.numel() for p in params) + R * C) * 2
    return max(1, budget // max(1, per_pair))


def accumulate_columns(
    flat: torch.Tensor,
    params: list[torch.Tensor],
    columns: Iterable[torch.Tensor],
    acc: list[torch.Tensor],
    chunk: int | None = None,
    group: torch.Tensor | None = None,
) -> None:
    """Add ``sum_{k,r} (grad_theta (u_{k,r} . z_r))^2`` into ``acc`` (with ``group``, the
    ``(R,)`` sample of each row: ``sum_{k,n} (grad_theta sum_{r in n} u_{k,r} . z_r)^2``).

    Args:
        flat: ``(R, C)`` valid rows of the logits, attached to the graph (kept after the call).
        params: trainable parameters, in the order of ``acc``.
        columns: iterable of ``(K, R, C)`` column blocks ``u``.
        acc: zero-initialised float32/float64 temporaries, updated in place.
        chunk: (row, column) pairs per batched backward (default: from the memory budget).
    """
    R, C = flat.shape
    chunk = pair_chunk(R, C, params) if chunk is None else chunk
    for cols in columns:
        if group is not None:  # one pair per (column, sample): its rows' columns together
            G = int(group.max()) + 1
            hits = torch.zeros(cols.shape[0], G, dtype=cols.dtype, device=cols.device)
            hits.index_add_(1, group, cols.abs().sum(-1))
            nz = hits != 0
        else:  # pairs (k, r) with a non-zero column, in row-major order
            nz = cols.abs().sum(-1) != 0  # (K, R)
        ks, rs = nz.nonzero(as_tuple=True)
        for s in range(0, ks.numel(), chunk):
            k, r = ks[s : s + chunk], rs[s : s + chunk]
            M = k.numel()
            if group is not None:
                sel = (group.unsqueeze(0) == r.unsqueeze(1)).unsqueeze(-1)  # (M, R, 1)
                cot = (cols[k] * sel).to(flat.dtype)
                grads = _batched_grads(flat, params, cot, retain_graph=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.to(a.dtype).square().sum(0))
                continue
            cot = torch.zeros(M, R, C, dtype=flat.dtype, device=flat.device)
            cot[torch.arange(M, device=flat.device), r] = cols[k, r].to(flat.dtype)
            grads = _batched_grads(flat, params, cot, retain_graph=True)
            for a, g in zip(acc, grads):
                if g is not None:  # squares in the state's dtype (float32 or wider)
                    a.add_(g.to(a.dtype).square().sum(0))


# --------------------------------------------------------------------------------------------- #
# output-side columns
# --------------------------------------------------------------------------------------------- #
class Columns:
    """The columns ``u`` of one step, any subset at a time.

    EXACT, categorical: the ``C - 1`` columns of the reduced factor ``B`` with ``B^T B = I(z)``
    obtained by taking the last class as reference (the Fisher of the ``C - 1`` free natural
    parameters ``z_c - z_C`` is ``diag(p') - p' p'^T``, ``p' = p_{<C}``, and its factor
    ``diag(sqrt p') - alpha sqrt p' p'^T`` needs ``2 alpha - alpha^2 (1 - p_C) = 1``, i.e.
    ``alpha = 1 / (1 + sqrt p_C)``). As a vector of logits, column ``c < C - 1`` is
    ``sqrt(p_c) (e_c - alpha q)`` with ``q = p`` except ``q_C = p_C + sqrt(p_C)``. EXACT,
    bernoulli/gaussian: the ``C`` diagonal columns of :func:`fimfast.likelihoods.exact_columns`.
    EMPIRICAL/MONTE_CARLO: the score columns of :func:`fimfast.likelihoods.score_columns`
    (same labels, same draws).

    Attributes:
        num: number of columns.
    """

    def __init__(
        self,
        flat: torch.Tensor,
        labels: torch.Tensor | None,
        fim_type: FIMType,
        opts: Options,
        seed: int,
        offset: int,
    ):
        dt = ops.compute_dtype(flat.dtype)
        z = flat.detach().to(dt)
        self.R, self.C = z.shape
        self.dtype = dt
        self.device = z.device
        lk = opts.likelihood
        self.block: torch.Tensor | None = None
        self.z, self.lk, self.sigma2 = z, lk, opts.sigma2
        self.categorical = fim_type == FIMType.EXACT and lk == "categorical"
        if fim_type == FIMType.EXACT:
            self.num = self.C - 1 if self.categorical else self.C
        else:
            self.block = likelihoods.score_columns(flat, labels, fim_type, opts, seed, offset)
            self.num = self.block.shape[0]

    # everything below is computed on first use: a logits head in closed form needs only root
    @functools.cached_property
    def p(self) -> torch.Tensor:
        return torch.softmax(self.z, -1)

    @functools.cached_property
    def sp(self) -> torch.Tensor:
        """``(R, C)`` column scales: ``sqrt p`` (categorical), ``sqrt(diag I)`` otherwise."""
        if self.categorical:
            return torch.sqrt(self.p)
        return torch.sqrt(likelihoods.diag_core(self.z, self.lk, self.sigma2))

    @functools.cached_property
    def aq(self) -> torch.Tensor | None:
        """``alpha q`` of the reduced categorical factor (``None`` for diagonal factors)."""
        if not self.categorical:
            return None
        sref = self.sp[:, -1:]
        q = self.p.clone()
        q[:, -1:] += sref
        return q.div_(1.0 + sref)

    @functools.cached_property
    def root(self) -> torch.Tensor:
        """``(R, C)`` with ``root^2 = sum_k u_k^2`` per row (``diag I(z)`` for EXACT); only its
        square is used, so a single score column is returned as it is, sign included."""
        if self.block is not None:
            return self.block[0] if self.num == 1 else self.block.square().sum(0).sqrt_()
        if self.categorical:
            return (self.p - self.p.square()).sqrt_()
        return self.sp

    @property
    def S(self) -> torch.Tensor:
        """``(R, C)`` ``sum_k u_k^2`` per row (``diag I(z)`` for EXACT)."""
        return self.root.square()

    def take(self, ks: torch.Tensor) -> torch.Tensor:
        """Columns ``ks`` (int64 ``(M,)``): ``(M, R, C)`` in float32/float64."""
        if self.block is not None:
            return self.block.index_select(0, ks)
        M = ks.numel()
        sp = self.sp.index_select(1, ks).transpose(0, 1)  # (M, R)
        ar = torch.arange(M, device=ks.device)
        if self.aq is None:
            cols = torch.zeros(M, self.R, self.C, dtype=self.dtype, device=sp.device)
        else:
            cols = sp.unsqueeze(-1) * self.aq.unsqueeze(0)
            cols.neg_()
        cols[ar, :, ks] += sp
        return cols

    def blocks(self, chunk: int) -> Iterator[torch.Tensor]:
        """All columns, ``chunk`` at a time."""
        dev = self.device
        for k0 in range(0, self.num, chunk):
            yield self.take(torch.arange(k0, min(self.num, k0 + chunk), device=dev))


# --------------------------------------------------------------------------------------------- #
# planning
# --------------------------------------------------------------------------------------------- #
@dataclass
class Group:
    """The uses of one block of one parameter that the rules add up and square together."""

    index: int
    block: tuple[int, int] | None
    kind: str  # vec | outer | rows | outer+rows | head_w | head_b
    members: list[tuple[hooks.Call, int]]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(I, O)`` (Hugging Face ``Conv1D``)."""
        c, ui = self.members[0]
        return c.uses[ui].transposed


@dataclass
class Plan:
    """Which parameter goes where for one step (kept as ``Engine.last_plan`` for inspection).

    Attributes:
        groups: the fast groups.
        generic: indices of the parameters on the generic path.
        unused: indices of the parameters that do not reach the logits (their Fisher is 0).
        calls: captured calls whose taps the batched backward needs.
        head: the call whose output is the logits, if any.
        reasons: why each generic parameter is generic.
    """

    groups: list[Group] = field(default_factory=list)
    generic: list[int] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)
    calls: list[hooks.Call] = field(default_factory=list)
    head: hooks.Call | None = None
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def fast(self) -> list[int]:
        """Indices of the parameters estimated by rules."""
        return sorted({g.index for g in self.groups})


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] < b[1] and b[0] < a[1]


def _structure(
    calls: list[hooks.Call], head, params: list[torch.Tensor], glob: Counter, N: int
) -> tuple:
    """What a plan depends on, as a key: per call its module (and mode), verdict so far, uses and
    tap layout; whether it is the logits layer; the parameters and their edges in the graph;
    whether the batch has two samples (else nothing was probed)."""
    return (
        N >= 2,
        tuple(
            (
                id(c.module), id(c.rule), c.module.training, c.ok, c.reason, c is head,
                tuple((id(u.param), u.kind, u.block, u.groups, u.transposed) for u in c.uses),
                tuple((t.lead, t.cands, len(t.shape) if len(t.cands) < 2 else tuple(t.shape))
                      for t in c.taps),
            )
            for c in calls
        ),
        tuple(id(p) for p in params),
        tuple(glob[id(p)] for p in params),
    )


@dataclass
class _Template:
    """A :class:`Plan` with calls replaced by their positions in the step, plus every call's
    verdict and tap batch dims, to be bound to the calls of a later step of the same structure."""

    verdicts: list[tuple[bool, str, list[int | None]]]
    groups: list[tuple[int, tuple[int, int] | None, str, list[tuple[int, int]]]]
    generic: list[int]
    unused: list[int]
    reasons: dict[int, str]
    calls: list[int]
    head: int | None

    @classmethod
    def of(cls, plan: Plan, calls: list[hooks.Call]) -> _Template:
        at = {id(c): k for k, c in enumerate(calls)}
        return cls(
            [(c.ok, c.reason, [t.bdim for t in c.taps]) for c in calls],
            [(g.index, g.block, g.kind, [(at[id(c)], ui) for c, ui in g.members])
             for g in plan.groups],
            list(plan.generic),
            list(plan.unused),
            dict(plan.reasons),
            [at[id(c)] for c in plan.calls],
            None if plan.head is None else at[id(plan.head)],
        )

    def bind(self, calls: list[hooks.Call]) -> Plan:
        for c, (ok, reason, bdims) in zip(calls, self.verdicts):
            c.ok, c.reason = ok, reason
            for t, b in zip(c.taps, bdims):
                t.bdim = b
        return Plan(
            groups=[Group(i, block, kind, [(calls[k], ui) for k, ui in ms])
                    for i, block, kind, ms in self.groups],
            generic=list(self.generic),
            unused=list(self.unused),
            calls=[calls[k] for k in self.calls],
            head=None if self.head is None else calls[self.head],
            reasons=dict(self.reasons),
        )


class Engine:
    """The per-sample engine of one estimator (holds the independence-probe cache).

    Attributes:
        use_rules: ``False`` sends every parameter to the generic path (the reference).
        expand_broadcast: expand lookups shared by the batch during the capture (turned off
            after a forward that fails with them expanded).
        expand_flat: also expand lookups with ids of shape ``(T,)`` (turned off when the checked
            forward's logits differ from the model's own; see :meth:`forward`).
        last_plan: the :class:`Plan` of the last step.
    """

    def __init__(self) -> None:
        self.use_rules = True
        self.expand_broadcast = True
        self.expand_flat = True  # lookups with ids (T,) too, once a forward showed it is safe
        self._flat_checked = False
        self.last_plan: Plan | None = None
        self._probe_cache: dict[Any, Any] = {}
        self._plans: dict[Any, _Template] = {}  # plans by step structure (see _structure)
        # per model and set of trainable parameters: the modules to hook, whether it has a
        # lookup, and the norm layers to restore if a forward reruns (see _modules)
        self._mods: tuple[Any, list, bool, list] | None = None
        self._direct: set = set()  # module outputs seen unmodified: tapped directly
        self._hold: set = set()  # outputs gone before the check: held alive in the next step
        self._modified: set = set()  # outputs seen modified in place: never held again
        self._logged: dict[int, str] = {}
        self._owned: dict[int, str] = {}
        self.sequence_rows = False  # this step's rows are whole sequences (see Options)

    def forward(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        batch_size: int | None,
        run: Callable[[], Any],
        logits: Callable[[Any], torch.Tensor] | None = None,
        plain: Callable[[], Any] | None = None,
    ) -> tuple[hooks.Capture | None, Any]:
        """``run()`` (the forward) under a capture: ``(capture, result)``.

        Lookups shared by the batch are expanded to ``batch_size`` during the capture (see
        :class:`fimfast.layers.EmbeddingRule`); a forward that fails with an expanded output is
        run once more without expansion, which this engine then keeps off. The running statistics
        that the failed forward's norm layers updated (train mode) are put back first, so the
        step updates them once.

        Lookups without a batch dimension (ids of shape ``(T,)``) gain one when expanded, so the
        first forward that expands one is checked (``logits(result)`` is needed for it): the
        model's own forward (``plain()``, default ``run()``; a training step passes the forward
        of the module inside DistributedDataParallel, whose reducer expects one forward per
        backward) is run once more, from the same random state, and its logits must equal the
        captured ones. If they do not, the step is run again with those lookups left
        as they are (their tables take the generic path), and this engine keeps them so.
        """
        cap = None
        stats: list = []
        lookups = False
        if self.expand_broadcast and self.use_rules:
            _, lookups, norms = self._modules(model, params)
            stats = _running_stats(norms)
        check = lookups and self.expand_flat and not self._flat_checked and logits is not None
        rng = _rng_state() if check else None
        # (T,) lookups are expanded once checked, or in the forward that checks them
        flat = self.expand_flat and (self._flat_checked or check)
        try:
            with self.capture(model, params, batch_size, flat) as cap:
                result = run()
            if rng is None or cap is None or not cap.expanded_flat:
                return cap, result
            same = self._same_unexpanded(plain or run, logits, result, stats, rng)
            self._flat_checked = True
            if same:
                return cap, result
            failure, flat_only = "its logits differ from the model's own", True
        except Exception as exc:
            if cap is None or not cap.expanded:
                raise
            # the (T,) lookups first: (1, T) ones may still expand
            failure, flat_only = f"{type(exc).__name__}: {exc}", cap.expanded_flat > 0
        if flat_only:
            log.info(
                "per-sample engine: running the step again without expanding lookups of ids "
                "(T,) to the batch (%s); those tables take the generic path", failure,
            )
            self.expand_flat, self._flat_checked = False, True
            _restore(stats, rng)
            return self.forward(model, params, batch_size, run, logits, plain)
        log.info(
            "per-sample engine: the forward failed with shared lookups expanded to the batch "
            "(%s); running it without expansion (those tables take the generic path)", failure,
        )
        _restore(stats, None)
        self.expand_broadcast = False
        try:
            with self.capture(model, params, batch_size) as cap:
                return cap, run()
        except Exception:
            self.expand_broadcast = True  # it fails either way: the expansion was not the cause
            raise

    def _same_unexpanded(self, run, logits, result, stats, rng) -> bool:
        """Whether the model's own forward, from the random state and running statistics the
        captured one started from, gives the captured logits; the captured forward's state is
        kept afterwards (its buffers are swapped out for copies, not written: the captured graph
        may have saved them)."""
        after = _rng_state()
        _restore([], rng)
        kept = [(m, name, getattr(m, name)) for m, name, _ in stats]
        try:
            for m, name, saved in stats:
                setattr(m, name, saved.clone())
            plain = logits(run())
        except Exception:  # noqa: BLE001 - no evidence either way: do not expand
            return False
        finally:
            for m, name, live in kept:
                setattr(m, name, live)
            _restore([], after)
        got = logits(result)
        if plain.shape != got.shape:
            return False
        a, b = got.detach().double(), plain.detach().double()
        tol = 64 * torch.finfo(plain.dtype).eps * max(1.0, float(b.abs().max()))
        return bool(((a - b).abs() <= tol).all())

    @contextmanager
    def capture(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        batch_size: int | None = None,
        flat: bool = False,
    ):
        """Context for the forward: yields a :class:`~fimfast.hooks.Capture` (or ``None``);
        ``flat`` also expands lookups with ids of shape ``(T,)`` (see :meth:`forward`)."""
        if not self.use_rules:
            with nullcontext():
                yield None
            return
        cap = hooks.Capture(
            model, params, layers.rule_for, self._direct, batch_size, self.expand_broadcast,
            self._hold, flat,
        )
        mods = self._modules(model, params)
        with cap.installed(mods[0], self._owned):
            yield cap

    def _modules(
        self, model: torch.nn.Module, params: list[torch.Tensor]
    ) -> tuple[list, bool, list]:
        """``(modules to hook, has a lookup, norm layers with running statistics)``, found once per
        model and set of trainable parameters (a stale list can only leave calls uncaptured,
        which the graph check sends to the generic path)."""
        key = (id(model), tuple(id(p) for p in params))
        if self._mods is None or self._mods[0] != key:
            targets = hooks.targets(model, params, layers.rule_for)
            self._mods = (key, targets, *_stat_modules(model))
            self._owned = hooks.owners(model, params)
        return self._mods[1:]

    # -- planning --------------------------------------------------------------------------- #
    def _plan(self, cap: hooks.Capture | None, rows, params: list[torch.Tensor]) -> Plan:
        n = len(params)
        plan = Plan()
        graph = hooks.walk(rows.flat, params)
        _refuse_hidden(cap, graph)
        if cap is None or not cap.calls:
            plan.generic = list(range(n))
            plan.reasons = dict.fromkeys(plan.generic, "no captured call")
            return plan
        N = rows.num_samples
        for c in cap.calls:
            if c.ok and cap.global_hooks:
                c.ok, c.reason = False, "a global forward hook may change layer outputs"
            if c.ok and not all(graph.reaches(t.handle) for t in c.taps):
                # e.g. a module inside a torch.compile'd region: its hooks ran while tracing
                c.ok, c.reason = False, "its output does not reach the logits through autograd"
            for t in c.taps:
                changed = t.modified()
                t.keep = None
                if changed:
                    self._direct.discard(t.key)
                    self._hold.discard(t.key)
                    self._modified.add(t.key)
                    if t.direct and c.ok:
                        c.ok, c.reason = False, "its output was modified in place"
                elif not t.direct:
                    if changed is False:
                        self._direct.add(t.key)
                        self._hold.discard(t.key)
                    elif t.key not in self._modified:  # gone already: hold it in the next step
                        self._hold.add(t.key)
                shape = t.shape
                span = 1 if t.batch_first else min(t.lead, len(shape))
                t.cands = tuple(d for d in range(span) if shape[d] == N)
                t.bdim = t.cands[0] if t.cands else None
                if not t.cands and c.ok:
                    c.ok, c.reason = False, "no dimension of the layer output is the batch"
        head = None
        for c in cap.calls:
            t = c.taps[0] if len(c.taps) == 1 else None
            if c.ok and t is not None and t.out() is rows.logits and not t.modified():
                head = c
                c.taps[0].bdim = 0
        glob = graph.edges
        # everything below depends only on the structure of this step's calls: reused from the
        # last step with the same calls, uses, verdicts, parameter edges and head
        if self.sequence_rows:  # per-sequence rows: the head's squares do not split by token
            head_closed = None
        else:
            head_closed = head
        key = (_structure(cap.calls, head, params, glob, N), self.sequence_rows)
        hit = self._plans.get(key)
        if hit is not None:
            return hit.bind(cap.calls)
        plan = self._build(cap.calls, head, rows, params, glob, head_closed)
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = _Template.of(plan, cap.calls)
        return plan

    def _build(self, calls, head, rows, params, glob, head_closed=None) -> Plan:
        n = len(params)
        N = rows.num_samples
        plan = Plan()
        pos = {id(p): i for i, p in enumerate(params)}
        internal: Counter = Counter()
        uses: dict[int, list[tuple[hooks.Call, int]]] = defaultdict(list)
        for c in calls:
            internal.update(c.internal or {})
            for ui, u in enumerate(c.uses):
                uses[pos[id(u.param)]].append((c, ui))

        cand: set[int] = set()
        for i, p in enumerate(params):
            e = glob[id(p)]
            if e == 0:
                plan.unused.append(i)
            elif i not in uses:
                plan.reasons[i] = "no rule for its module"
            elif internal[id(p)] != e:
                plan.reasons[i] = "used outside the captured layer calls"
            elif not all(c.ok for c, _ in uses[i]):
                plan.reasons[i] = next(c.reason for c, _ in uses[i] if not c.ok)
            else:
                cand.add(i)
        probe_calls = _unique(c for i in cand for c, _ in uses[i] if c is not head)
        if probe_calls and N >= 2:
            self._probe(probe_calls, rows)
            for i in list(cand):
                bad = [c for c, _ in uses[i] if not c.ok]
                if bad:
                    cand.discard(i)
                    plan.reasons[i] = bad[0].reason

        for i in sorted(cand):
            groups = self._groups(i, uses[i], head_closed, params[i], uses)
            if groups is None:
                plan.reasons[i] = "its uses cannot be combined by the rules"
            else:
                plan.groups.extend(groups)
        fast = set(plan.fast)
        plan.generic = [i for i in range(n) if i not in fast and i not in plan.unused]
        plan.head = head
        plan.calls = _unique(
            c
            for g in plan.groups
            if g.kind not in ("head_w", "head_b")
            for c, _ in g.members
            if c is not head
        )
        return plan

    def _groups(self, i, members, head, param, uses) -> list[Group] | None:
        byblock: dict[Any, list] = defaultdict(list)
        for c, ui in members:
            byblock[c.uses[ui].block].append((c, ui))
        keys = list(byblock)
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                if _overlap(keys[a], keys[b]):
                    return None
        out = []
        for block, ms in byblock.items():
            kinds = {c.uses[ui].kind for c, ui in ms}
            groups = {c.uses[ui].groups for c, ui in ms}
            trans = {c.uses[ui].transposed for c, ui in ms}
            if len(trans) > 1 or (True in trans and kinds != {"outer"}):
                return None  # one weight stored both ways round: the squares cannot add up
            if kinds == {"vec"}:
                kind = "vec"
            elif kinds == {"outer"} and len(groups) == 1:
                kind = "outer"
            elif kinds == {"rows"}:
                kind = "rows"
            elif kinds == {"outer", "rows"} and groups == {1} and block is None:
                kind = "outer+rows"
            else:
                return None
            if (
                len(ms) == 1
                and ms[0][0] is head
                and isinstance(head.rule, layers.LinearRule)
                and kind in ("vec", "outer")
            ):
                kind = "head_w" if kind == "outer" else "head_b"
            out.append(Group(i, block, kind, ms))
        return out

    def _probe(self, calls: list[hooks.Call], rows) -> None:
        """Decide each tap's batch dimension from the data flow, once per structure.

        A tap's candidate batch dims are its leading dims of size ``N``. One backward column per
        probed sample ``j`` (a random cotangent on the rows of ``j`` only) gives the gradient
        that sample's logits send to every tap; a candidate survives if, for every probed
        sample, that gradient vanishes at every other index of the candidate dim. A call with a
        tap that keeps no candidate couples the samples, and its parameters take the generic
        path. Every sample is probed up to :data:`PROBE_SAMPLES`; beyond, a spread of samples and
        random halves of the batch (:func:`_probe_sets`), and every sample while a tap keeps two
        candidates; so a coupling of any two samples (``cumsum`` over the batch, a shift) is
        seen. Two candidates that survive every sample (``T == N`` with each sample's gradient
        confined to one position) give the same per-sample squares, so either is exact.
        """
        N = rows.num_samples
        ambiguous = any(len(t.cands) > 1 for c in calls for t in c.taps)
        key = (N, tuple(
            (id(c.module), c.rule.name, c.module.training,
             tuple((t.lead, t.cands, tuple(t.shape) if ambiguous else len(t.shape))
                   for t in c.taps))
            for c in calls
        ))
        if key in self._probe_cache:
            for c, (ok, reason, bdims) in zip(calls, self._probe_cache[key]):
                c.ok, c.reason = ok, reason
                for t, b in zip(c.taps, bdims):
                    t.bdim = b
            return
        flat = rows.flat
        taps = [t for c in calls for t in c.taps]
        passing = [list(t.cands) for t in taps]
        gen = torch.Generator().manual_seed(0)
        vals = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        vals = vals.to(device=flat.device, dtype=flat.dtype)
        per_col = flat.element_size() * flat.numel() + 4 * sum(math.prod(t.shape) for t in taps)
        M = max(1, _env.memory_budget_bytes() // max(1, per_col))
        first, rest = _probe_sets(N, gen)
        for sets in (first, rest):
            if sets is rest and not any(len(p) > 1 for p in passing):
                break  # all samples one by one only while a tap keeps two candidates
            sets = sets.to(flat.device)
            for s0 in range(0, sets.shape[0], M):
                allow = sets[s0 : s0 + M]  # (m, N): the samples each column puts a cotangent on
                sel = allow.index_select(1, rows.sample)  # (m, R)
                cot = vals.unsqueeze(0) * sel.unsqueeze(-1).to(vals.dtype)
                grads = _batched_grads(flat, [t.handle for t in taps], cot, retain_graph=True)
                for k, g in enumerate(grads):
                    if g is not None and passing[k]:
                        passing[k] = [d for d in passing[k] if _confined(g, d, allow)]
        ki = iter(passing)
        for c in calls:
            for t in c.taps:
                good = next(ki)
                if good:
                    t.bdim = good[0]
                elif c.ok:
                    c.ok, c.reason = False, "its output gradients couple the samples"
        if len(self._probe_cache) > 64:
            self._probe_cache.clear()
        self._probe_cache[key] = [(c.ok, c.reason, [t.bdim for t in c.taps]) for c in calls]

    # -- the step ----------------------------------------------------------------------------- #
    def estimate(
        self,
        rows,
        params: list[torch.Tensor],
        fim_type: FIMType,
        opts: Options,
        seed: int,
        offset: int,
        acc: Sums,
        cap: hooks.Capture | None,
        names: list[str] | None = None,
        retain_graph: bool = True,
    ) -> None:
        """Add this batch's per-sample estimate into ``acc`` (one float tensor per parameter).

        Args:
            rows: the batch's :class:`fimfast.batch.Rows` (logits attached to the graph).
            params: trainable parameters, in the order of ``acc``.
            fim_type: EXACT, EMPIRICAL or MONTE_CARLO.
            opts: validated options (``class_chunk``, ``likelihood``, ``backend``, ...).
            seed: generator seed; offset: first counter of this step.
            acc: the batch estimate's slots (:class:`fimfast.state.Sums`), added to.
            cap: the capture of this step's forward (``None``: generic path only).
            names: parameter names, for the log line naming the parameters on the generic path
                (logger ``fimfast.persample``, level INFO, once per change).
            retain_graph: keep the graph of ``rows.logits`` usable after this call (``False``
                lets the last backward free its buffers as it goes: less peak memory).
        """
        flat = rows.flat
        R, C = flat.shape
        cols = Columns(flat, rows.labels, fim_type, opts, seed, offset)
        self.sequence_rows = bool(opts.sequence_rows) and rows.logits.dim() == 3
        plan = self._plan(cap, rows, params)
        self.last_plan = plan
        generic = {i: plan.reasons.get(i, "") for i in plan.generic}
        if cap is not None and generic != self._logged:
            self._logged = generic
            if generic:  # once per change: which parameters take the slow path, and why
                log.info(
                    "per-sample engine: %d of %d parameters take the generic path: %s",
                    len(generic), len(params),
                    "; ".join(f"{names[i] if names else i}: {r}" for i, r in generic.items()),
                )
        if plan.generic:
            gp = [params[i] for i in plan.generic]
            ga = [acc.get(i) for i in plan.generic]
            chunk = opts.class_chunk or max(1, min(cols.num, pair_chunk(R, C, gp) // max(1, R)))
            group = rows.sample if self.sequence_rows else None
            accumulate_columns(flat, gp, cols.blocks(chunk), ga, group=group)
        if plan.groups:
            self._fast(rows, params, plan, cols, opts, acc, retain_graph)

    def _fast(
        self, rows, params, plan: Plan, cols: Columns, opts: Options, acc, retain_graph: bool
    ) -> None:
        flat = rows.flat
        R, C = flat.shape
        backend = opts.backend
        head = plan.head
        # the logits layer in closed form: no backward column at all
        for g in plan.groups:
            if g.kind == "head_w":
                c, _ = g.members[0]
                x = c.data["x"]
                A = x.reshape(-1, x.shape[-1])
                if not rows.all_valid:
                    A = A.index_select(0, rows.index)
                acc.add(g.index, _weight_sq(g, cols.root, A, backend))
            elif g.kind == "head_b":
                acc.add(g.index, cols.root.square().sum(0))
        groups = [g for g in plan.groups if g.kind not in ("head_w", "head_b")]
        if not groups:
            return
        taps = [t for c in plan.calls for t in c.taps]
        need_head = any(c is head for g in groups for c, _ in g.members)
        # columns: for token-level logits one column is a (class, position) pair
        dev = flat.device
        token = rows.logits.dim() == 3 and not self.sequence_rows
        if token:
            T = rows.logits.shape[1]
            rpos = rows.index % T
            positions = torch.unique(rpos)
            kk = torch.arange(cols.num, device=dev).repeat_interleave(positions.numel())
            tt = positions.repeat(cols.num)
        else:
            kk = torch.arange(cols.num, device=dev)
        total = kk.numel()
        for g in groups:
            g.state["single"] = total == 1
        per_col = flat.element_size() * R * C + 3 * 4 * sum(math.prod(t.shape) for t in taps)
        if need_head:
            per_col += 4 * rows.logits.numel()
        M_max = opts.class_chunk or max(1, _env.memory_budget_bytes() // max(1, per_col))
        for s in range(0, total, M_max):
            ks = kk[s : s + M_max]
            cot = cols.take(ks)
            if token:
                cot *= (rpos.unsqueeze(0) == tt[s : s + M_max].unsqueeze(1)).unsqueeze(-1)
            cot = cot.to(flat.dtype)
            gmap: dict[int, torch.Tensor | None] = {}
            if taps:
                retain = retain_graph or s + M_max < total  # a later chunk needs the graph
                grads = _batched_grads(flat, [t.handle for t in taps], cot, retain_graph=retain)
                gmap = {id(t.handle): g for t, g in zip(taps, grads)}
            if need_head:
                M = cot.shape[0]
                Gh = torch.zeros(M, rows.logits.numel() // C, C, dtype=cot.dtype, device=dev)
                Gh[:, rows.index] = cot
                gmap[id(head.taps[0].handle)] = Gh.reshape(M, *rows.logits.shape)
            terms: dict[int, list] = {}
            sq0: dict = {}  # sum over the chunk's columns of P^2, shared by a weight and its bias
            for g in groups:
                parts = []
                for c, ui in g.members:
                    if id(c) not in terms:
                        terms[id(c)] = c.rule.terms(c, [gmap.get(id(t.handle)) for t in c.taps])
                    parts.append(terms[id(c)][ui])
                parts = [p for p in parts if p is not None]
                if parts:
                    _accumulate(g, parts, acc, backend, sq0)
            del terms, gmap, cot
        for g in groups:
            if "S" in g.state:  # no weight sharing: sum_n S_n (x) a_n^2 once for all columns
                S, Q = g.state["S"], g.state["Q"]
                if g.state.get("root"):  # one column, as it came: sq_matmul squares both sides
                    acc.add(g.index, _weight_sq(g, S, Q, backend), g.block)
                else:
                    Q2 = Q.to(S.dtype).square()
                    acc.add(g.index, Q2.t() @ S if g.transposed else S.t() @ Q2, g.block)


def _weight_sq(g: Group, G: torch.Tensor, A: torch.Tensor, backend) -> torch.Tensor:
    """``sq_matmul(G, A)`` laid out as ``g``'s weight: ``(O, I)``, or ``(I, O)`` for a weight
    stored transposed (Hugging Face ``Conv1D``)."""
    if g.transposed:
        return ops.sq_matmul(A, G, backend=backend)
    return ops.sq_matmul(G, A, backend=backend)


def _refuse_hidden(cap: hooks.Capture | None, graph: hooks.Graph) -> None:
    """Refuse a forward whose parameters autograd cannot give per-row gradients of."""
    if graph.reentrant:
        raise UnsupportedModelError(
            "the model uses torch.utils.checkpoint with use_reentrant=True: its segments give "
            "gradients only through .backward(), never torch.autograd.grad, so the per-sample "
            "types (EXACT, EMPIRICAL, MONTE_CARLO) cannot form per-row gradients of the "
            "parameters inside. Pass use_reentrant=False to checkpoint (same memory saving), or "
            "use a HUTCHINSON type"
        )
    if cap is not None and cap.nograd:
        raise hooks.nograd_error(cap.nograd, " for the per-sample types")


def _stat_modules(model: torch.nn.Module) -> tuple[bool, list[torch.nn.Module]]:
    """Whether ``model`` has a lookup the capture could expand (the only case in which a forward
    is run again), and then its norm layers with running statistics (BatchNorm, InstanceNorm
    with ``track_running_stats``)."""
    mods = list(model.modules())
    if not any(isinstance(m, torch.nn.Embedding) for m in mods):
        return False, []
    return True, [m for m in mods if isinstance(m, torch.nn.modules.batchnorm._NormBase)]


def _running_stats(mods: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """``(module, buffer name, copy)`` of the running statistics a forward of ``mods`` in train
    mode updates."""
    out = []
    for m in mods:
        if m.training:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor):
                    out.append((m, name, b.detach().clone()))
    return out


def _rng_state() -> tuple:
    """The default generators' states (CPU, and CUDA once initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _restore(stats: list[tuple[torch.nn.Module, str, torch.Tensor]], rng: tuple | None) -> None:
    """Write saved running statistics back into the buffers, and set the generator states (if
    given)."""
    with torch.no_grad():
        for m, name, saved in stats:
            getattr(m, name).copy_(saved)
    if rng is not None:
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])


def _unique(it: Iterable[hooks.Call]) -> list[hooks.Call]:
    seen: dict[int, hooks.Call] = {}
    for c in it:
        seen.setdefault(id(c), c)
    return list(seen.values())


def _probe_sets(N: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's columns as ``(M, N)`` sample sets: ``(first, rest)``.

    Up to :data:`PROBE_SAMPLES` samples, ``first`` is every sample alone and ``rest`` is empty.
    Beyond, ``first`` is an even spread of ``PROBE_SAMPLES // 2`` samples alone plus
    :data:`PROBE_SUBSETS` random halves of the batch (a coupling of any two samples escapes each
    half with probability 3/4, all of them with ``(3/4)^32 < 1e-4``), and ``rest`` is every other
    sample alone (probed while a tap still has two candidate batch dims)."""
    eye = torch.eye(N, dtype=torch.bool)
    if N <= PROBE_SAMPLES:
        return eye, eye[:0]
    spread = torch.linspace(0, N - 1, PROBE_SAMPLES // 2).round().long().unique()
    halves = torch.rand(PROBE_SUBSETS, N, generator=gen) < 0.5
    others = torch.ones(N, dtype=torch.bool)
    others[spread] = False
    return torch.cat([eye[spread], halves]), eye[others]


def _confined(g: torch.Tensor, d: int, allow: torch.Tensor) -> bool:
    """Whether ``g[m]`` (``g``: ``(M, *shape)``) vanishes at every index of its dim ``d`` that
    ``allow[m]`` (``(M, N)`` bool) leaves out, for every ``m``."""
    M = g.shape[0]
    gm = g.movedim(d + 1, 1)
    mag = gm.reshape(M, gm.shape[1], -1).abs().sum(-1)  # (M, N); NaN counts as non-zero
    return not bool((mag.masked_fill(allow, 0) != 0).any())


def _block(a: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    return a if block is None else a[block[0] : block[1]]


# --------------------------------------------------------------------------------------------- #
# squaring and summing the terms of one group, one chunk of columns
# --------------------------------------------------------------------------------------------- #
def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _colsq(P: torch.Tensor, dt: torch.dtype, cache: dict) -> torch.Tensor:
    """``sum_m P[m]^2`` (``P`` ``(M, N, ...)``), computed once per chunk for a weight and its
    bias (the bias gradient of a layer without weight sharing is its output gradient)."""
    k = _key(P)
    if k not in cache:
        # the entry keeps P alive, so no other tensor of the chunk can reuse its address
        cache[k] = (P, _sum_sq(P, dt))
    return cache[k][1]


def _sum_sq(P: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``sum_m P[m]^2`` in ``dt``. A few columns are added one by one into one output, with no
    ``P``-sized squared temporary (3-8x faster on fresh memory); many by square + sum
    (``torch.linalg.vector_norm`` over dim 0 is 10-40x slower than either)."""
    M = P.shape[0]
    if M > 32:
        return P.to(dt).square().sum(0)
    out = P[0].to(dt).square()
    for m in range(1, M):
        Pm = P[m].to(dt)
        out.addcmul_(Pm, Pm)
    return out


def _accumulate(g: Group, parts: list, sums: Sums, backend, cache: dict) -> None:
    dt = sums.dtypes[g.index]
    if g.kind == "vec":
        if len(parts) == 1:
            V = parts[0].V
            hit = cache.get(_key(V))  # a bias whose weight already squared the same gradients
            sq = hit[1].sum(0) if hit is not None else V.to(dt).square().sum((0, 1))
        else:
            V = parts[0].V.to(dt)
            for p in parts[1:]:
                V = V + p.V.to(dt)
            sq = V.square().sum((0, 1))
        sums.add(g.index, sq, g.block)
        return
    outers = [p for p in parts if isinstance(p, layers.Outer)]
    rows = [p for p in parts if isinstance(p, layers.Rows)]
    if outers:
        if len(g.members) == 1 and outers[0].P.dim() == 4 and outers[0].P.shape[2] == 1:
            # no weight sharing: defer, S_n = sum over columns of g_n^2, and S^T a^2 once at the
            # end; a single column is passed as it is (sq_matmul squares it). The chunk's cache
            # entry may become S itself: the cache is dropped before the next chunk adds to it
            P = outers[0].P[:, :, 0]
            if "S" in g.state:
                g.state["S"].add_(_colsq(P, dt, cache))
            elif P.shape[0] == 1 and g.state.get("single"):
                g.state["S"], g.state["root"] = P[0], True
            else:
                g.state["S"] = _colsq(P, dt, cache)
            g.state.setdefault("Q", outers[0].Q[:, 0])
        else:
            P, Q = _cat_outer(g, outers)
            sq = _outer_sq(P, Q, backend)
            sums.add(g.index, sq.transpose(-2, -1) if g.transposed else sq, g.block)
    if rows:
        view = _block(sums.get(g.index), g.block)
        ids, keep, Qe = _cat_rows(g, rows)
        _rows_sq(g, ids, keep, Qe, view)
        if outers:  # tied table: 2 sum_units E_u . D_u on the rows the embedding touched
            P, Q = _cat_outer(g, outers)
            M, N, T, V = P.shape
            S = ids.shape[1]
            Pg = torch.gather(P, 3, ids.view(1, N, 1, S).expand(M, N, T, S))  # (M, N, T, S)
            D = torch.einsum("mnts,nti->mnsi", Pg.to(dt), Q.to(dt))
            X = (Qe.to(dt) * D).sum(0)  # (N, S, d)
            if keep is not None:
                X = X * keep.unsqueeze(-1)
            view.index_add_(0, ids.reshape(-1), 2.0 * X.reshape(-1, X.shape[-1]))


def _cat_outer(g: Group, outers: list) -> tuple[torch.Tensor, torch.Tensor]:
    if len(outers) == 1:
        return outers[0].P, outers[0].Q
    P = torch.cat([o.P for o in outers], dim=2)
    if "Qcat" not in g.state:  # the input side is the same for every chunk
        g.state["Qcat"] = torch.cat([o.Q for o in outers], dim=1)
    return P, g.state["Qcat"]


# per-sample squared products are formed this many bytes at a time (cache-sized, see _outer_sq)
_SQ_CHUNK_BYTES = 2 * 2**20


def _outer_sq(P: torch.Tensor, Q: torch.Tensor, backend=None) -> torch.Tensor:
    """``sum_{m,n} (P[m, n]^T Q[n])^2``: ``(O, I)`` or ``(g, O/g, I/g)`` for groups."""
    dt = ops.compute_dtype(torch.promote_types(P.dtype, Q.dtype))
    I = Q.shape[-1]
    if P.dim() == 4:
        M, N, T, O = P.shape
        out = None
        if M == 1 or O >= 64 or I < 64:
            # one column at a time over the whole batch, P as it came (no copy; the kernels
            # chunk the samples). Measured against the stacked layout below, 1 thread: 14 vs 22
            # ms (conv 16 x 25, 576 positions, 10 columns), 3.7 vs 5.8 ms (in_proj 192 x 64, 4)
            for m in range(M):
                part = ops.shared_sq(P[m], Q, backend=backend)
                out = part if out is None else out.add_(part)
            return out
        # few outputs, many inputs (conv 32 x 400, 10 columns: 30 vs 36 ms for the loop): the
        # M columns side by side, shared_sq of (n, T, M*O) against (n, T, I), a few samples at
        # a time so that the stacked copy and the per-sample (M*O, I) products stay cache-sized
        step = max(1, _SQ_CHUNK_BYTES // max(1, 4 * M * O * max(I, T)))
        for n0 in range(0, N, step):
            Pm = P[:, n0 : n0 + step].permute(1, 2, 0, 3).reshape(-1, T, M * O)
            part = ops.shared_sq(Pm, Q[n0 : n0 + step], backend=backend)
            out = part if out is None else out.add_(part)
        return out.reshape(M, O, I).sum(0)
    M, N, L, G, O = P.shape
    out = torch.zeros(G, O, I, dtype=dt, device=P.device)
    per_n = M * G * O * I * 4
    step = max(1, _SQ_CHUNK_BYTES // max(1, per_n))
    for n0 in range(0, N, step):
        per = torch.einsum("mnlgo,nlgi->mngoi", P[:, n0 : n0 + step].to(dt),
                           Q[n0 : n0 + step].to(dt))
        out += per.square().sum((0, 1))
    return out


def _cat_rows(g: Group, rows: list):
    if len(rows) == 1:
        r = rows[0]
        return r.ids, r.keep, r.Qe
    ids = torch.cat([r.ids for r in rows], dim=1)
    if all(r.keep is None for r in rows):
        keep = None
    else:
        keep = torch.cat(
            [torch.ones_like(r.ids, dtype=torch.bool) if r.keep is None else r.keep for r in rows],
            dim=1,
        )
    return ids, keep, torch.cat([r.Qe for r in rows], dim=2)


def _rows_sq(g: Group, ids, keep, Qe, view: torch.Tensor) -> None:
    """``sum_units`` of the squared per-unit segment sums of ``Qe`` by id, into rows of ``view``."""
    M, N, S, d = Qe.shape
    if "rows" not in g.state:  # once per step: the distinct (sample, id) pairs
        V = view.shape[0]
        sample = torch.arange(N, device=ids.device).unsqueeze(1).expand(N, S)
        keys = (sample * V + ids).reshape(-1)
        sel = None if keep is None else keep.reshape(-1).nonzero().squeeze(1)
        if sel is not None:
            keys = keys.index_select(0, sel)
        uniq, inv = torch.unique(keys, return_inverse=True)
        g.state["rows"] = (sel, inv, uniq % V, uniq.numel())
    sel, inv, rid, U = g.state["rows"]
    Qf = Qe.reshape(M, N * S, d)
    if sel is not None:
        Qf = Qf.index_select(1, sel)
    dt = view.dtype
    seg = torch.zeros(M, U, d, dtype=dt, device=Qe.device)
    seg.index_add_(1, inv, Qf.to(dt))  # repeated ids of one sample add before the square
    view.index_add_(0, rid, seg.square().sum(0))
