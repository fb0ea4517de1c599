"""Chunk sizes: how much work one batched backward (or one probe chunk) takes at a time.

Every engine bounds its temporaries by chunking; the sizes are computed here, from the working
memory budget ``B = FIMFAST_MEMORY_BUDGET_MB`` (:func:`fimfast._env.memory_budget_bytes`) or from
a fixed number of logits per chunk. Each size is at least 1 (a chunk of one column or row always
runs, whatever the budget).

Sizes and their formulas (bytes per unit of work ``u``, then ``max(1, B // u)``):

* :func:`pair_chunk`: (row, column) pairs of the generic path. A parameter-sized gradient and an
  ``(R, C)`` cotangent per pair, float32, twice (the batched backward's own temporaries):
  ``u = 8 (P + R C)``.
* :func:`generic_columns`: columns of the generic path, ``pair_chunk // R`` (a column covers every
  row), at most the number of columns; ``class_chunk`` wins.
* :func:`probe_columns`: columns of the independence probe. The ``(R, C)`` cotangent in the
  logits' dtype and the float32 gradient at every probed tap: ``u = e R C + 4 sum_taps |tap|``.
* :func:`fast_columns`: columns of the fast path. What a column holds in a plain batched backward
  (every tap's gradient, returned together) scales with the columns; what the step holds
  besides (the forward's saved activations, which every column shares, and the deferred sums
  of squares per layer) does not. Per column: the cotangent, the float32 gradient at every tap
  and one buffer inside the backward (an operator's outgoing gradient while its incoming one is
  alive, at most the largest tap): ``u = e R C + 4 (sum_taps |tap| + max_taps |tap|)``, plus
  ``4 |logits|`` when the logits layer's output gradient is laid out as the logits. Fixed: the
  saved activations and the deferred sums, each about the layer outputs, ``8 sum_taps |tap|``.
  The bound is twice what a training step holds at least, ``B_train = 4 max(P, sum_taps |tap|)``
  (a float32 gradient per parameter of the step, or the saved layer outputs when they are
  larger), less the fixed part: ``8 max(P, sum_taps |tap|) - 8 sum_taps |tap|``, so that the
  step's peak stays within about twice a training step's (docs/estimators.md, "Memory";
  measured on the workloads of benchmarks/workloads.py). A streamed backward
  (:mod:`fimfast.persample.stream`: each call's squares formed as its gradients arrive, the
  gradients dropped) holds no tap's gradient to the end: ``u = e R C + 8 max_taps |tap|`` (plus
  the logits), against ``4 P + 8 sum_taps |tap|``. Either bound is at least ``SMALL_BYTES``
  (4 MiB): below it the memory is worth less than the time chunks cost (a small model's EXACT
  step in chunks of one or two columns costs up to twice its time in one backward, each chunk
  a whole backward of small operators), while every workload of benchmarks/workloads.py keeps
  the bound it had. For a step whose training step holds less than a quarter of that
  (``B_train < SMALL_BYTES / 4``, 1 MiB) the floor is twice ``SMALL_BYTES``: there every
  operator of a backward is small, its fixed cost outweighs its columns' arithmetic, and a
  chunk costs about as much as the columns it saves memory on (``mha_bias_kv`` of
  benchmarks/bench_recurrent.py: 9 columns of 0.63 MB, EXACT about 4.0 training steps in chunks
  of 5 and 4, 3.5 in one; benchmarks/results/mha_one_chunk_cpu_2026-12-06.md). The workloads
  (a)-(e) hold 2 MB or more in a training step and keep their chunks. The budget ``B`` caps
  both; ``class_chunk`` wins. :func:`balanced` then spreads the columns evenly over the fewest
  chunks of that size.
* :func:`patch_samples`: samples of a convolution's unfolded input patches formed at once
  (:class:`fimfast.rules.base.Patches`): ``u`` the bytes of one sample's patches, and the budget
  at most ``PATCH_BYTES`` (a few MB, so that the patches stay a small temporary next to the
  layer's own input and output, and the products that read them stay cache-sized).
* :func:`samples_per_chunk`: samples of a ``vmap`` pass of per-sample gradients (torch-secorder
  compatibility): ``u = 8 P``.
* :func:`rows_per_chunk`: rows of ``C`` logits per chunk of a fixed number ``elems`` of logits
  (HUTCHINSON probes, the fused ``lm_head`` op): ``max(1, elems // C)``, no budget.

``P``: elements of the parameters concerned; ``R``, ``C``: valid rows and classes; ``e``: bytes
per element of the logits; ``|tap|``: elements of a tapped layer output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fimfast import _env


def _fit(per_unit: int, budget: int | None = None) -> int:
    """Units of ``per_unit`` bytes that fit the budget (at least 1)."""
    budget = _env.memory_budget_bytes() if budget is None else budget
    return max(1, budget // max(1, per_unit))


def pair_chunk(R: int, C: int, params: list[torch.Tensor], budget: int | None = None) -> int:
    """(row, column) pairs per batched backward so that gradients and cotangents fit the budget."""
    return _fit(4 * (sum(p.numel() for p in params) + R * C) * 2, budget)


def generic_columns(
    R: int, C: int, params: list[torch.Tensor], num: int, class_chunk: int | None = None
) -> int:
    """Columns (each covering all ``R`` rows) per block of the generic path, at most ``num``."""
    return class_chunk or max(1, min(num, pair_chunk(R, C, params) // max(1, R)))


def _tap_elems(taps: Iterable) -> int:
    return sum(math.prod(t.shape) for t in taps)


def probe_columns(flat: torch.Tensor, taps: list) -> int:
    """Columns per batched backward of the independence probe (``flat``: the ``(R, C)`` rows)."""
    return _fit(flat.element_size() * flat.numel() + 4 * _tap_elems(taps))


def fast_columns(
    flat: torch.Tensor,
    taps: list,
    head_logits: int | None,
    class_chunk: int | None,
    param_elems: int = 0,
    budget: int | None = None,
    streamed: bool = False,
) -> int:
    """Columns per batched backward of the fast path.

    Args:
        flat: the ``(R, C)`` rows of the logits.
        taps: the taps the backward reaches (``.shape`` each).
        head_logits: elements of the logits when the logits layer's output gradient is formed
            too (else ``None``).
        class_chunk: the user's fixed chunk (wins over every budget).
        param_elems: elements of the step's parameters (``P`` of ``B_train``).
        budget: the working-memory budget ``B`` (default: ``FIMFAST_MEMORY_BUDGET_MB``).
        streamed: the backward streams its squares (no tap gradient held to its end).
    """
    if class_chunk:
        return class_chunk
    R, C = flat.shape
    sizes = [math.prod(t.shape) for t in taps]
    total, top = sum(sizes), max(sizes, default=0)
    if streamed:
        per_col = 8 * top
        bound = 4 * param_elems + 8 * total
    else:
        per_col = 4 * (total + top)
        bound = 8 * max(param_elems, total) - 8 * total
    per_col += flat.element_size() * R * C
    if head_logits is not None:
        per_col += 4 * head_logits
    budget = _env.memory_budget_bytes() if budget is None else budget
    small = SMALL_BYTES * (2 if 4 * max(param_elems, total) < SMALL_BYTES // 4 else 1)
    return _fit(per_col, min(budget, max(bound, small)))


# extra bytes the fast path's columns may always take, whatever a training step holds; twice
# that for a step whose training step holds less than a quarter of it (B_train < 1 MiB)
SMALL_BYTES = 4 << 20


def balanced(total: int, most: int) -> int:
    """Columns per chunk that split ``total`` columns into the fewest chunks of at most ``most``
    as evenly as possible (9 columns, at most 8: chunks of 5 and 4, not 8 and 1)."""
    most = max(1, min(most, total))
    n = -(-total // most)
    return -(-total // n)


# unfolded patches are formed at most this many bytes at a time (see patch_samples)
PATCH_BYTES = 2 << 20


def patch_samples(per_sample: int, budget: int | None = None) -> int:
    """Samples of unfolded patches (``per_sample`` bytes each) formed at once."""
    budget = _env.memory_budget_bytes() if budget is None else budget
    return _fit(per_sample, min(budget, PATCH_BYTES))


def samples_per_chunk(P: int) -> int:
    """Samples per ``vmap`` pass of per-sample gradients of ``P`` parameter elements."""
    return _fit(4 * P * 2)


def rows_per_chunk(C: int, elems: int) -> int:
    """Rows of ``C`` logits per chunk of ``elems`` logits (at least 1)."""
    return max(1, elems // max(1, C))
