"""Passes over the data: per-pair parameter gradients (dense family) and per-layer sums
(Kronecker family), with the output-side columns of :mod:`fimfast.structured.columns`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fimfast import _env, guard, inner_grad, likelihoods
from fimfast.structured import capture as cap
from fimfast.structured import columns, convgram, structure, uses
from fimfast.structured.apart import check_apart
from fimfast.structured.sums import LayerSums, acc_dtype, add_conv_inputs, add_grads, add_inputs
from fimfast.types import FIMType, Options, UnsupportedModelError


@dataclass
class Stream:
    """The random stream of one estimate and the count of rows seen."""

    fim_type: FIMType
    opts: Options
    seed: int
    offset: int = 0
    count: int = 0
    batches: int = 0
    extra: dict = field(default_factory=dict)

    def advance(self, rows) -> None:
        self.offset += likelihoods.counters_used(self.opts.num_probes, rows.count,
                                                 rows.num_classes)
        self.count += rows.count
        self.batches += 1


def _chunk(per_item_bytes: int, given: int | None) -> int:
    if given is not None:
        return given
    return max(1, _env.memory_budget_bytes() // max(1, per_item_bytes))


def _cotangents(fw: columns.Forward, st: Stream, per_row: str, chunk_bytes: int,
                chunk: int | None) -> Iterator[torch.Tensor]:
    """``(M, R, C)`` cotangent blocks of this batch: probe columns (all rows at once) or per-row
    columns, one row per cotangent (``per_row="row"``) or one row per sample (``"sample"``)."""
    rows = fw.rows
    R, C = rows.count, rows.num_classes
    if not st.fim_type.is_per_sample:
        u = columns.probe_columns(rows, st.fim_type, st.opts, st.seed, st.offset)
        m = _chunk(chunk_bytes + 4 * R * C, chunk)
        for s in range(0, u.shape[0], m):
            yield u[s : s + m]
        return
    m = _chunk(chunk_bytes + 4 * R * C, chunk)
    for cols in columns.per_row_columns(rows, st.fim_type, st.opts, st.seed, st.offset):
        if per_row == "row":
            yield from columns.one_row_each(cols, m)
        else:
            yield from columns.one_row_per_sample(cols, rows.sample, m, rows.logits.dim() == 2)


def dense_pass(model, loader: Iterable, st: Stream, params: list[torch.Tensor], acc,
               max_batches: int | None = None, chunk: int | None = None) -> None:
    """Add ``g g^T`` of every (row, column) parameter gradient ``g`` into ``acc``."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with kept(model, st):
            _dense_batch(model, batch, st, params, acc, chunk)


def _dense_batch(model, batch, st: Stream, params: list[torch.Tensor], acc, chunk) -> None:
    P = sum(p.numel() for p in params)
    fw = columns.forward(model, batch, st.fim_type, st.opts)
    if written(model, st):  # refused when the guards exit: nothing is added
        return
    with guard.arithmetic(fw.rows.logits, retained=False):  # the caller's autocast: forward only
        _dense_sums(fw, st, params, acc, chunk, P)


def _dense_sums(fw: columns.Forward, st: Stream, params: list[torch.Tensor], acc, chunk,
                P: int) -> None:
    """The pairs' gradients of one batch whose forward ran (:func:`_dense_batch`), autocast
    off."""
    flat = fw.rows.flat_all
    mark = acc.mark()  # low_rank: a batch refused part-way (max_rows) keeps none of its rows
    try:
        for cot in _cotangents(fw, st, "row", 8 * P, chunk):
            full = _scatter(fw.rows, cot)
            grads = columns.batched_grad(flat, params, full)
            acc.add(torch.cat([
                (torch.zeros((full.shape[0],) + tuple(p.shape), dtype=p.dtype, device=p.device)
                 if g is None else g.to_dense() if g.is_sparse else g).reshape(full.shape[0], -1)
                for p, g in zip(params, grads)], 1))  # sparse: nn.Embedding(sparse=True)
    except BaseException:
        acc.drop_from(mark)
        raise
    st.advance(fw.rows)


@contextmanager
def kept(model: nn.Module, st: Stream) -> Iterator[None]:
    """Run one batch of a pass under the guards of a Fisher step (:mod:`fimfast.guard`), as
    ``DiagFisher.step`` does (docs/exactness.md, "What a step leaves alone"): the model's buffers
    (BatchNorm's running statistics) and the rows a ``max_norm`` lookup renormalised are put back
    afterwards, any other in-place write into a trainable parameter is refused, and the gradient
    hooks of the parameters and modules (which change what autograd reports, not the model) are
    switched off for the batch and put back (:func:`fimfast.guard.step_kept`), and so is a
    lookup's ``scale_grad_by_freq`` (:func:`fimfast.guard.unscaled`)."""
    g = st.extra.get("guard")
    if g is None:
        g = st.extra["guard"] = structure.of(model).step_guard(model)
    buffers, walk, names, params = g
    with guard.step_kept(buffers, walk, model, names, params):
        st.extra["versions"] = [p._version for p in params]
        yield


def written(model: nn.Module, st: Stream) -> bool:
    """Whether this batch's forward wrote into a trainable parameter in place, other than the
    rows a ``max_norm`` lookup renormalises (which :func:`kept` puts back): a write that
    :func:`fimfast.guard.parameters_kept` refuses when the guards exit. Checked before anything
    of the batch is added, so that a refused batch leaves the sums and the stream unchanged."""
    _, walk, _, params = st.extra["guard"]
    tables = {id(m.weight) for m in walk.of(model, params)[1]}
    return any(p._version != v and id(p) not in tables
               for p, v in zip(params, st.extra["versions"]))


def step_guard(names: list[str], params: list[torch.Tensor]) -> tuple:
    """The state :func:`kept` keeps in ``Stream.extra["guard"]`` for a model whose trainable
    parameters are ``names``, ``params`` (an accumulator that knows them passes them here, which
    spares a walk of the model per batch)."""
    return (guard.BufferGuard(), guard.ModuleWalk(), names, params)


def _scatter(rows, cot: torch.Tensor) -> torch.Tensor:
    """Cotangents of the valid rows ``(M, R, C)`` -> of every row of the logits ``(M, NT, C)``."""
    if rows.all_valid:
        return cot
    out = cot.new_zeros(cot.shape[0], rows.flat_all.shape[0], cot.shape[-1])
    out[:, rows.index] = cot
    return out


def kron_pass(model, loader: Iterable, st: Stream, layers: list[cap.Layer], what: str,
              approx: str = "expand", eig: list | None = None, max_batches: int | None = None,
              chunk: int | None = None, sums: list[LayerSums] | None = None) -> list[LayerSums]:
    """One pass for ``what`` in ``kfac`` (factors A, G), ``ekfac`` (``D`` in the eigenbasis
    ``eig = [(U_A, U_G)]``) or ``quasi_diag`` (squared gradients and weight-bias cross terms),
    added to ``sums`` (new ones if ``None``)."""
    sums = [LayerSums() for _ in layers] if sums is None else sums
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        kron_batch(model, batch, st, layers, sums, what, approx, eig, chunk)
    return sums


def kron_batch(model, batch, st: Stream, layers: list[cap.Layer], sums: list[LayerSums],
               what: str, approx: str = "expand", eig: list | None = None,
               chunk: int | None = None) -> None:
    """Add one batch to the per-layer ``sums`` (see :func:`kron_pass`) and advance ``st``.

    A batch the guards refuse (its forward wrote into a trainable parameter, see :func:`kept`)
    adds nothing and leaves ``st`` as it was: the write is detected after the forward, before
    any sum is touched. The sums are added to after the backward of the batch's (first) chunk
    of cotangents, so an error raised by the model's forward or backward leaves them as they
    were too, except where a batch needs several chunks (``pair_chunk``) and a later chunk
    fails; sums that were empty before the batch are emptied again on any error."""
    empty = [s.empty for s in sums]
    try:
        with kept(model, st):
            _kron_batch(model, batch, st, layers, sums, what, approx, eig, chunk)
    except BaseException:
        for s, e in zip(sums, empty):
            if e:
                s.clear()
        for layer in layers:
            layer.calls = []
        raise


def _kron_batch(model, batch, st: Stream, layers: list[cap.Layer], sums: list[LayerSums],
                what: str, approx: str, eig: list | None, chunk: int | None) -> None:
    _, walk, _, params = st.extra["guard"]  # the guards' module list (kept per structure)
    with cap.capture(layers, model, walk.of(model, params)[0]), inner_grad.graph_built() as g:
        fw = columns.forward(model, batch, st.fim_type, st.opts)  # (refuses batch statistics)
    if g:
        raise UnsupportedModelError(
            "kfac, ekfac and quasi_diag: a backward with create_graph=True ran "
            "inside the model's forward (an input-gradient feature, an inner optimisation step): "
            "the graph it builds reads the layers' weights again, on paths that do not pass "
            "through their outputs, which the Kronecker and quasi-diagonal representations are "
            "built from; use representation='dense', 'block_diag', 'low_rank' or 'diag' (exact "
            "for such models)")
    if written(model, st):  # refused when the guards exit: nothing is added
        return
    with guard.arithmetic(fw.rows.logits, retained=False):  # the caller's autocast: forward only
        _kron_sums(model, fw, st, layers, sums, what, approx, eig, chunk)


def _kron_sums(model, fw: columns.Forward, st: Stream, layers: list[cap.Layer],
               sums: list[LayerSums], what: str, approx: str, eig: list | None,
               chunk: int | None) -> None:
    """The sums of one batch whose forward ran (:func:`_kron_batch`), autocast off."""
    rows = fw.rows
    flat = rows.flat_all
    graph = cap.check_calls(layers, flat, rows.num_samples)
    kfac = what == "kfac"
    rows_only = [kfac and approx == "expand" and isinstance(layer.module, nn.Conv2d)
                 and all(convgram.worthwhile(layer.module, x) for x, _, _ in layer.calls)
                 for layer in layers]
    # A and EKFAC's projections take a convolution's patches in any order (capture.unfold)
    any_order = what in ("kfac", "ekfac")
    a_in = [None if r else cap.inputs_of(layer, ones=False, any_order=any_order)
            for layer, r in zip(layers, rows_only)]
    orders = [cap.patch_order(layer.module) if a is not None and any_order and
              cap.channels_last_inputs(layer) else None for layer, a in zip(layers, a_in)]
    taps, where = [], {}
    for layer in layers:
        for _, z, _ in layer.calls:
            if id(z) not in where:
                where[id(z)] = len(taps)
                taps.append(z)
    # before anything of the batch is added; once per layout of the model's structure
    seen = st.extra.get("apart")  # the model structure's verdicts (an accumulator's, a refit's)
    if seen is None:
        seen = st.extra["apart"] = structure.of(model).apart
    check_apart(layers, taps, where, rows, graph, seen)
    per_pair = 4 * sum(z.numel() for z in taps)
    for k, cot in enumerate(_cotangents(fw, st, "sample", per_pair, chunk)):
        grads = columns.batched_grad(flat, [cap.grad_input(t) for t in taps],
                                     _scatter(rows, cot))
        if k == 0:  # every call reaches the logits; A once the first backward has succeeded
            uses.check_reached(layers, grads, where)
        if kfac and k == 0:
            _add_all_inputs(layers, sums, a_in, orders, fw.mask, approx)
        for j, layer in enumerate(layers):
            g = cap.out_grads(layer, [grads[where[id(z)]] for _, z, _ in layer.calls])
            add_grads(layer, sums[j], a_in[j], g, what, approx, None if eig is None else eig[j],
                      orders[j])
    for layer in layers:
        layer.calls = []
    st.advance(rows)


def _add_all_inputs(layers, sums, a_in, orders, mask, approx: str) -> None:
    """KFAC's input second moments of every layer (``a_in[j] is None``: a convolution's, from
    its input rows)."""
    for j, (layer, a, s) in enumerate(zip(layers, a_in, sums)):
        dt = acc_dtype(layer.calls[0][1])
        if a is None:
            add_conv_inputs(layer, s, dt)
            continue
        add_inputs(layer, s, a, cap.positions_of(layer, mask), approx, dt, orders[j])


def layer_info(layer: cap.Layer) -> dict[str, Any]:
    """The plain-data description of a layer kept by the matrices (and their files)."""
    info = {"name": layer.name, "weight": layer.weight, "bias": layer.bias, "O": layer.O,
            "In": layer.In}
    if layer.kind != "linear":
        info["kind"] = layer.kind
    if layer.row0 or layer.bias_row0:
        info["row0"], info["bias_row0"] = layer.row0, layer.bias_row0
    return info
