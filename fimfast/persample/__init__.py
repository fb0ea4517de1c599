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
  backward column per sample (see :mod:`fimfast.persample.probe`), whose gradient must vanish
  at every other sample of every tap; the same probe decides each tap's batch dimension from the
  data flow (never from sizes alone: ``(T, N, d)`` with ``T == N`` is told apart). BatchNorm in
  train mode, a ``cumsum`` over the batch or any other op that mixes samples fails it for the layers
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

Layout: :mod:`.generic` (the generic path and the batched backward), :mod:`.columns` (the
columns ``u``), :mod:`.replay` (the captured forward and its re-runs), :mod:`.plan` (groups and
plans), :mod:`.probe` (the sample-independence probe), :mod:`.squares` (squaring the rules'
terms) and :mod:`.engine` (:class:`Engine`: the step).
"""

from fimfast.chunks import pair_chunk
from fimfast.persample.columns import Columns
from fimfast.persample.engine import Engine
from fimfast.persample.generic import _batched_grads, accumulate_columns
from fimfast.persample.plan import Group, Plan
from fimfast.persample.probe import PROBE_SAMPLES, PROBE_SUBSETS

__all__ = [
    "PROBE_SAMPLES",
    "PROBE_SUBSETS",
    "Columns",
    "Engine",
    "Group",
    "Plan",
    "_batched_grads",
    "accumulate_columns",
    "pair_chunk",
]
