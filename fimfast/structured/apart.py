"""The check that every captured layer keeps the samples apart (docs/structured.md, "Exact or
refused").

The Kronecker and quasi-diagonal representations take the gradient at a layer's output positions
``[n, ...]`` as sample ``n``'s own: the per-row columns of the ``j``-th valid row of every sample,
and a probe of all the rows, travel in one backward vector. That holds when the layer's first
dimension is the batch and nothing between the layer and the logits mixes the samples. It fails,
silently, where the first dimension only has the batch's size: a sequence-first layout
(``(T, N, E)`` with ``T == N``), a tensor shared by the samples (a Linear applied to a table of
class embeddings with as many rows as the batch), or an operation that mixes the samples (a
shift or a cumulative sum along the batch).

:func:`check_apart` runs, before anything of the batch is added, one backward column per probed
sample (a cotangent on that sample's valid rows only): every sample with a valid row up to 64,
beyond that 64 spread over the batch (the first and the last among them). A layer whose output
receives gradient from a probed sample at another sample's positions is refused, naming the
module. Where the samples are apart those entries are exact zeros (no path of the graph reaches
them), so the check has no tolerance. The verdict is kept per model structure
(:class:`fimfast.structured.structure.Structure`) under the batch's :func:`layout`: the shape of
the autograd graph (a hash of the types of its operations) and which dimensions of the logits and
of every layer output have the batch's size. Another sequence length or batch size of the same
model is not probed again; an operation put in from some batch on (a flag, a branch on the data),
an operation's constant changed (a ``cumsum`` turned from another dimension to the batch's by a
flag) or a dimension that takes the batch's size (``T == N``) is another layout, probed. A
parameter entirely zero at a check (a zero-initialised gate in front of a coupling: the coupling
sends no gradient) that is no longer zero at a later batch drops the verdicts, probed again
(:mod:`fimfast.zero_gates`). What it cannot see is a coupling that only the values of other
tensors change, with the same operations and sizes: the verdicts are kept per model object, so a
copy of the model (``copy.deepcopy``) is probed again.
"""

from __future__ import annotations

import torch

from fimfast import _env
from fimfast.structured import capture as cap
from fimfast.structured.columns import batched_grad

MAX_PROBED = 64


def _probed(rows) -> list[int]:
    """The samples probed: those with a valid row, at most :data:`MAX_PROBED` spread over them."""
    have = torch.unique(rows.sample).tolist()
    if len(have) <= MAX_PROBED:
        return have
    pick = torch.linspace(0, len(have) - 1, MAX_PROBED).round().long().tolist()
    return [have[i] for i in pick]


def _cotangents(rows, samples: list[int]) -> torch.Tensor:
    """``(M, N*T, C)`` cotangents, one per probed sample: its valid rows, weights ``1 .. 2`` over
    the classes (not constant: equal entries give no gradient through logits centred over the
    classes)."""
    flat = rows.flat_all
    w = torch.linspace(1.0, 2.0, flat.shape[-1], dtype=flat.dtype, device=flat.device)
    cot = flat.new_zeros((len(samples),) + tuple(flat.shape))
    for k, n in enumerate(samples):
        cot[k, rows.index[rows.sample == n]] = w
    return cot


def layout(rows, taps: list, graph: int) -> tuple:
    """What the verdict of :func:`check_apart` is kept under: the shape of the autograd graph
    (:func:`fimfast.persample.walk.shape`) and, for the logits and every layer output, its
    dimensions and which of them have the batch's size."""
    N = rows.num_samples
    return (graph, N == 1, tuple(tuple(d == N for d in t.shape) for t in [rows.logits] + taps))


def check_apart(layers: list[cap.Layer], taps: list, where: dict, rows, graph: int = 0,
                seen: set | None = None) -> None:
    """Refuse, naming the module, a layer whose output positions of one sample receive the
    gradient of another sample's logits (see the module's docstring). ``seen``: the
    :func:`layout` keys already checked, which are not checked again (with a
    :class:`fimfast.zero_gates.Verdicts`, all of them checked again once one of its parameters
    entirely zero at a check moved); ``graph``: the shape of the autograd graph."""
    if rows.num_samples < 2 or not layers or rows.count == 0:
        return
    key = layout(rows, taps, graph)
    zeros = getattr(seen, "zeros", None)  # a zero gate moved: a coupling behind it may show
    if zeros is not None and zeros.moved(seen.params):
        seen.clear()
    if seen is not None and key in seen:
        return
    samples = _probed(rows)
    per = 4 * (sum(z.numel() for z in taps) + rows.flat_all.numel())
    m = max(1, min(len(samples), _env.memory_budget_bytes() // max(1, per)))
    for s in range(0, len(samples), m):
        part = samples[s:s + m]
        grads = batched_grad(rows.flat_all, [cap.grad_input(t) for t in taps],
                             _cotangents(rows, part))
        _check(layers, grads, where, part)
    if seen is not None:
        seen.add(key)
        if zeros is not None:
            zeros.note(seen.params)


def _check(layers, grads, where, samples: list[int]) -> None:
    for layer in layers:
        for _, z, _ in layer.calls:
            g = grads[where[id(z)]]
            if g is None:
                continue
            for k, n in enumerate(samples):
                other = torch.cat([g[k, :n], g[k, n + 1:]]).reshape(-1)
                if bool(torch.nan_to_num(other, nan=0.0).ne(0).any()):
                    raise _refusal(layer, n, tuple(z.shape))


def _refusal(layer: cap.Layer, n: int, shape: tuple) -> ValueError:
    name = layer.name.rsplit(".", 1)[0] if layer.part else layer.name
    return ValueError(
        f"module {name!r} ({type(layer.module).__name__}): the gradient of sample {n}'s logits "
        f"reaches the output positions of other samples (output of shape {shape}); its first "
        "dimension is not the batch's own (a sequence-first layout, a tensor shared by the "
        "samples such as a table of class embeddings, or an operation that mixes the samples "
        "such as a shift along the batch), while the Kronecker and quasi-diagonal "
        "representations take the gradient at a sample's positions as that sample's own. Use "
        "representation='dense', 'block_diag', 'low_rank' or 'diag' (exact for any model), or "
        "make the batch the first dimension of the layer's input")
