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
    """Resume ``acc`` from ``sd`` (:func:`state_of`), all or nothing: a state refused part-way
    (a key or tensor missing) leaves ``acc`` as it was."""
    keep = {k: getattr(acc, k) for k in ("stream", "phase", "sums", "kfac", "eig")
            if hasattr(acc, k)}
    pair = getattr(acc, "acc", None) if not acc.layers else None
    keep_pair = dict(vars(pair)) if pair is not None else None
    try:
        _load_state(acc, sd)
    except Exception as e:
        for k, v in keep.items():
            setattr(acc, k, v)
        if pair is not None:
            vars(pair).clear()
            vars(pair).update(keep_pair)
        if isinstance(e, (KeyError, IndexError, TypeError, AttributeError)):
            raise ValueError("state: not a complete FisherAccumulator.state_dict() "
                             f"({type(e).__name__}: {e}); nothing was loaded") from e
        raise


def _load_state(acc, sd: dict[str, Any]) -> None:
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
    phase = sd["phase"]
    if phase not in _PHASES or (phase == "refit" and acc.representation != "ekfac"):
        raise ValueError(f"state: phase {phase!r} is not one of this accumulator's")
    if acc.layers and len(sd["sums"]) != len(acc.layers):
        raise ValueError(f"state holds the sums of {len(sd['sums'])} layers; this accumulator "
                         f"has {len(acc.layers)}")
    acc.stream = engine.Stream(acc.fim_type, acc.stream.opts, s["seed"], s["offset"], s["count"],
                               s["batches"])
    acc.phase = phase
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
    _check_pair_state(a, sd)
    if a.kind == "dense":
        a.sum = _clone(sd["sum"])
    elif a.kind == "block_diag":
        a.sums = [_clone(s) for s in sd["block_sums"]]
    else:
        a.rows = [_clone(r) for r in sd["rows"]]
        a.nrows = sum(r.shape[0] for r in a.rows)


def _check_pair_state(a, sd: dict[str, Any]) -> None:
    """The tensors of a dense, block-diagonal or low-rank state have this layout's shapes."""
    P, off = a.layout.numel(), a.layout.offsets
    if a.kind == "dense":
        want, got = [(P, P)], [sd["sum"]]
    elif a.kind == "block_diag":
        want = [(off[j] - off[i],) * 2 for i, j in a.blocks]
        got = list(sd["block_sums"])
    else:
        got = list(sd["rows"])
        want = [(r.shape[0] if isinstance(r, torch.Tensor) else -1, P) for r in got]
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in got]
    if shapes != want:
        raise ValueError(f"state: the {a.kind} sums have shapes {shapes[:4]}; this accumulator's "
                         f"layout needs {want[:4]}")


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
