"""State of a :class:`~fimfast.structured.accumulate.FisherAccumulator`: saved, loaded, and summed
over the ranks of a process group (docs/structured.md, "Accumulating, resuming, distributed")."""

from __future__ import annotations

import copy
from typing import Any

import torch

from fimfast import distributed as dist_mod
from fimfast.structured import engine, gram
from fimfast.structured.kron import KFACFIM
from fimfast.structured.sums import LayerSums

_PHASES = ("factors", "refit")


def _clone(t):
    return None if t is None else t.detach().clone()


def _plain_options(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if not callable(v)}


def state_of(acc) -> dict[str, Any]:
    st = acc.stream
    sd: dict[str, Any] = {
        "signature": acc.signature(), "phase": acc.phase,
        "stream": {"seed": st.seed, "offset": st.offset, "count": st.count,
                   "batches": st.batches},
    }
    if acc.layers:
        sd["sums"] = [{"npos": s.npos, **{k: _clone(getattr(s, k)) for k in LayerSums.FIELDS}}
                      for s in acc.sums]
        if acc.phase == "refit":
            sd["eig"] = [(_clone(ua), _clone(ug)) for ua, ug in acc.eig]
            sd["kfac"] = {"A": [_clone(a) for a in acc.kfac.A],
                          "G": [_clone(g) for g in acc.kfac.G], "meta": dict(acc.kfac.meta)}
        return sd
    a = acc.acc
    if a.kind == "dense":
        sd["sum"] = _clone(a.sum)
    elif a.kind == "block_diag":
        sd["block_sums"] = [_clone(s) for s in a.sums]
    else:
        sd["rows"] = [_clone(r) for r in a.rows]
    return sd


def load_state(acc, sd: dict[str, Any]) -> None:
    if not isinstance(sd, dict) or "signature" not in sd:
        raise ValueError("state must be a dict from FisherAccumulator.state_dict()")
    mine, theirs = acc.signature(), dict(sd["signature"])
    mine["options"] = _plain_options(mine["options"])
    theirs["options"] = _plain_options(theirs.get("options", {}))
    for k in mine:
        if mine[k] != theirs.get(k):
            raise ValueError(f"state was saved by an accumulator with another {k} "
                             f"({theirs.get(k)!r}; this one: {mine[k]!r})")
    s = sd["stream"]
    if s["seed"] != acc.stream.seed:
        raise ValueError(f"state was drawn with seed {s['seed']}; this accumulator draws with "
                         f"{acc.stream.seed} (pass the same seed, and the same rank)")
    acc.stream = engine.Stream(acc.fim_type, acc.stream.opts, s["seed"], s["offset"], s["count"],
                               s["batches"])
    acc.phase = sd["phase"]
    if acc.layers:
        acc.sums = [LayerSums(A=_clone(d["A"]), npos=d["npos"], G=_clone(d["G"]),
                              D=_clone(d["D"]), cross=_clone(d["cross"])) for d in sd["sums"]]
        if acc.phase == "refit":
            k = sd["kfac"]
            info = [engine.layer_info(layer) for layer in acc.layers]
            acc.kfac = KFACFIM(acc.names, acc.shapes, info, k["A"], k["G"], k["meta"])
            acc.eig = [(_clone(ua), _clone(ug)) for ua, ug in sd["eig"]]
        return
    a = acc.acc
    if a.kind == "dense":
        a.sum = _clone(sd["sum"])
    elif a.kind == "block_diag":
        a.sums = [_clone(s) for s in sd["block_sums"]]
    else:
        a.rows = [_clone(r) for r in sd["rows"]]
        a.nrows = sum(r.shape[0] for r in a.rows)


def reduce_state(acc, local):
    """``(summed sums or pair accumulator, rows, batches)`` over the ranks (new tensors).
    Collective: every rank of the group must call it."""
    import torch.distributed as dist

    group = acc.group
    size = dist_mod.world(group)[1]
    st = acc.stream
    low_rank = not acc.layers and local.kind == "low_rank"
    tensors = [] if low_rank else _tensors(acc, local)
    present = local.nrows if low_rank else sum(t is not None for t in tensors)
    dev = acc.params[0].device
    meta = torch.tensor([acc.crc(), _PHASES.index(acc.phase), st.count, st.batches, present],
                        dtype=torch.int64, device=dev)
    table = [torch.empty_like(meta) for _ in range(size)]
    dist.all_gather(table, meta, group=group)
    rows = torch.stack(table).cpu().tolist()
    for r, row in enumerate(rows):
        if row[:2] != rows[0][:2]:
            raise ValueError(f"distributed: rank {r} and rank 0 disagree on the model, "
                             "representation, fim_type, reduction or phase of the accumulator")
        if row[2] == 0 or (row[4] != rows[0][4] and not low_rank):
            raise ValueError(f"distributed: rank {r} added no batch; every rank must add at "
                             f"least one (rows per rank: {[x[2] for x in rows]})")
    count, batches = sum(x[2] for x in rows), sum(x[3] for x in rows)
    if low_rank:
        return _gathered_rows(local, [x[4] for x in rows], group), count, batches
    vals = [t for t in tensors if t is not None and not t.is_sparse]
    rows_of = [gram.gather(t, group) for t in tensors if t is not None and t.is_sparse]
    if acc.layers:
        vals.append(torch.tensor([s.npos for s in local], dtype=torch.float64, device=dev))
    out = iter(dist_mod._all_reduce_sum(vals, group))
    if not acc.layers:
        red = copy.copy(local)
        if red.kind == "dense":
            red.sum = next(out)
        else:
            red.sums = [next(out) for _ in local.sums]
        return red, count, batches
    new, gathered = [], iter(rows_of)
    for s in local:  # an embedding's reduce rows are stacked in rank order, the rest summed
        kw = {k: None if getattr(s, k) is None else
              next(gathered) if getattr(s, k).is_sparse else next(out) for k in LayerSums.FIELDS}
        new.append(LayerSums(**kw))
    npos = next(out).tolist()
    for s, n in zip(new, npos):
        s.npos = n
    return new, count, batches


def _tensors(acc, local) -> list[torch.Tensor | None]:
    if not acc.layers:
        return [local.sum] if local.kind == "dense" else list(local.sums)
    return [getattr(s, k) for s in local for k in LayerSums.FIELDS]


def _gathered_rows(local, nrows: list[int], group):
    """A copy of the low-rank accumulator ``local`` holding the gradient rows of every rank, in
    rank order (the factor of one process that saw the shards one after the other, so ``L^T L``
    is the sum of the ranks' ``L_k^T L_k``). One ``all_gather`` of the rows padded to the
    largest shard. Refused when the rows of all ranks exceed ``max_rows``."""
    import torch.distributed as dist

    total, P = sum(nrows), local.layout.numel()
    if local.max_rows is not None and total > local.max_rows:
        raise ValueError(
            f"representation='low_rank' under torch.distributed gathers every rank's gradient "
            f"rows on every rank: {total} rows (per rank: {nrows}) of P={P} exceed max_rows="
            f"{local.max_rows}; raise max_rows, use fewer batches or a HUTCHINSON fim_type, or "
            "representation='dense' (P x P, summed over ranks)")
    mine = local.rows
    dev = mine[0].device if mine else torch.device("cpu")
    L = torch.cat(mine) if mine else torch.zeros(0, P, dtype=local.dtype, device=dev)
    buf = L.new_zeros(max(nrows), P)
    buf[: L.shape[0]] = L
    parts = [torch.empty_like(buf) for _ in nrows]
    dist.all_gather(parts, buf, group=group)
    red = copy.copy(local)
    red.rows = [p[:n] for p, n in zip(parts, nrows)]
    red.nrows = total
    return red
