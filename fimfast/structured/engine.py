"""Passes over the data: per-pair parameter gradients (dense family) and per-layer sums
(Kronecker family), with the output-side columns of :mod:`fimfast.structured.columns`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fimfast import _env, likelihoods
from fimfast.structured import capture as cap
from fimfast.structured import columns
from fimfast.types import FIMType, Options


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
            yield from columns.one_row_per_sample(cols, rows.sample, m)


def dense_pass(model, loader: Iterable, st: Stream, params: list[torch.Tensor], acc,
               max_batches: int | None = None, chunk: int | None = None) -> None:
    """Add ``g g^T`` of every (row, column) parameter gradient ``g`` into ``acc``."""
    P = sum(p.numel() for p in params)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        fw = columns.forward(model, batch, st.fim_type, st.opts)
        flat = fw.rows.flat_all
        for cot in _cotangents(fw, st, "row", 8 * P, chunk):
            full = _scatter(fw.rows, cot)
            grads = columns.batched_grad(flat, params, full)
            acc.add(torch.cat([
                (torch.zeros((full.shape[0],) + tuple(p.shape), dtype=p.dtype, device=p.device)
                 if g is None else g).reshape(full.shape[0], -1)
                for p, g in zip(params, grads)], 1))
        st.advance(fw.rows)


def _scatter(rows, cot: torch.Tensor) -> torch.Tensor:
    """Cotangents of the valid rows ``(M, R, C)`` -> of every row of the logits ``(M, NT, C)``."""
    if rows.all_valid:
        return cot
    out = cot.new_zeros(cot.shape[0], rows.flat_all.shape[0], cot.shape[-1])
    out[:, rows.index] = cot
    return out


@dataclass
class LayerSums:
    """Per-layer sums of one Kronecker-family pass."""

    A: torch.Tensor | None = None  # (I', I') input second moments (sum)
    npos: float = 0.0  # positions (or samples, for reduce) summed into A
    G: torch.Tensor | None = None  # (O, O) output-gradient second moments
    D: torch.Tensor | None = None  # (O, I') squared projected gradients (EKFAC, quasi-diag)
    cross: torch.Tensor | None = None  # (O, I) weight-bias cross terms (quasi-diag)


def kron_pass(model, loader: Iterable, st: Stream, layers: list[cap.Layer], what: str,
              approx: str = "expand", eig: list | None = None, max_batches: int | None = None,
              chunk: int | None = None) -> list[LayerSums]:
    """One pass for ``what`` in ``kfac`` (factors A, G), ``ekfac`` (``D`` in the eigenbasis
    ``eig = [(U_A, U_G)]``) or ``quasi_diag`` (squared gradients and weight-bias cross terms)."""
    sums = [LayerSums() for _ in layers]
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with cap.capture(layers):
            fw = columns.forward(model, batch, st.fim_type, st.opts)
        rows = fw.rows
        flat = rows.flat_all
        cap.check_calls(layers, flat, rows.num_samples)
        a_in = [cap.inputs_of(layer) for layer in layers]
        if what == "kfac":
            for layer, a, s in zip(layers, a_in, sums):
                _add_inputs(s, a, cap.positions_of(layer, fw.mask), approx)
        taps = [z for layer in layers for _, z in layer.calls]
        per_pair = 4 * sum(z.numel() for z in taps)
        for cot in _cotangents(fw, st, "sample", per_pair, chunk):
            grads = columns.batched_grad(flat, taps, _scatter(rows, cot))
            k = 0
            for j, layer in enumerate(layers):
                n = len(layer.calls)
                g = cap.out_grads(layer, grads[k : k + n])
                k += n
                _add_grads(sums[j], a_in[j], g, what, approx, None if eig is None else eig[j],
                           layer.bias is not None)
        for layer in layers:
            layer.calls = []
        st.advance(rows)
    return sums


def _add_inputs(s: LayerSums, a: torch.Tensor, w: torch.Tensor | None, approx: str) -> None:
    a = a.to(_acc_dtype(a))
    if approx == "expand":
        a2 = a.reshape(-1, a.shape[-1])
        if w is None:  # every position counts: one (I', N T) x (N T, I') product
            A = a2.T @ a2
            npos = float(a2.shape[0])
        else:
            w2 = w.reshape(-1, 1).to(a.dtype)
            A = (a2 * w2).T @ a2
            npos = float(w2.sum())
    else:  # reduce: the mean input over the positions of each sample
        if w is None:
            abar = a.mean(1)
        else:
            w = w.to(a.dtype)
            abar = (a * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        A = abar.T @ abar
        npos = float(a.shape[0])
    s.A = A if s.A is None else s.A + A
    s.npos += npos


def _add_grads(s: LayerSums, a: torch.Tensor, g: torch.Tensor, what: str, approx: str,
               eig: tuple[torch.Tensor, torch.Tensor] | None, bias: bool) -> None:
    """``g``: ``(M, N, T, O)`` output gradients of ``M`` cotangents; ``a``: ``(N, T, I')``."""
    dt = _acc_dtype(g)
    g = g.to(dt)
    a = a.to(dt)
    O = g.shape[-1]
    if what == "kfac":
        gg = g.reshape(-1, O) if approx == "expand" else g.sum(2).reshape(-1, O)
        G = gg.T @ gg
        s.G = G if s.G is None else s.G + G
        return
    if what == "ekfac":
        ua, ug = eig
        g, a = g @ ug.to(dt), a @ ua.to(dt)
    want_cross = what == "quasi_diag" and bias
    if g.shape[2] == 1:  # one position: (g a^T)^2 = g^2 a^2 summed without per-pair matrices
        g2 = (g[:, :, 0] ** 2).sum(0)  # (N, O)
        D = g2.T @ (a[:, 0] ** 2)
        cross = g2.T @ a[:, 0, :-1] if want_cross else None
    else:
        Mp = torch.einsum("mnto,nti->mnoi", g, a)  # per-pair gradients of the (O, I') matrix
        D = (Mp**2).sum((0, 1))
        cross = (Mp[..., :-1] * Mp[..., -1:]).sum((0, 1)) if want_cross else None
    s.D = D if s.D is None else s.D + D
    if cross is not None:
        s.cross = cross if s.cross is None else s.cross + cross


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def layer_info(layer: cap.Layer) -> dict[str, Any]:
    """The plain-data description of a layer kept by the matrices (and their files)."""
    return {"name": layer.name, "weight": layer.weight, "bias": layer.bias, "O": layer.O,
            "In": layer.In}
