"""A structured Fisher accumulated batch by batch: resumable, and reduced over ranks.

:class:`FisherAccumulator` holds the plain sums of a pass (docs/structured.md, "Accumulating,
resuming, distributed"): KFAC's ``A``, ``G`` and position counts, EKFAC's refitted ``D``, the
quasi-diagonal's squares and cross terms, the dense family's ``sum g g^T`` (or low-rank rows),
and the random stream's position. Sums of shards add up to the sums of their union, so

* ``state_dict()`` / ``load_state_dict()`` resume an interrupted pass bit for bit (the same
  additions in the same order, the stream continuing at the same counter);
* under ``torch.distributed`` (``distributed="auto"`` and a process group of more than one rank)
  reading the result sums the states over the ranks into new tensors (the local state is left as
  it is), so EXACT / EMPIRICAL equal one process on the union of the shards; random types draw
  on each rank from the seed mixed with the rank (:func:`fimfast.distributed.rank_seed`).
  EKFAC's eigenbasis is taken from the reduced factors (``start_refit`` is collective too).
  ``low_rank`` gathers the ranks' gradient rows instead, stacked in rank order
  (:func:`fimfast.structured.reduce.reduce_state`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import torch

from fimfast import distributed as dist_mod
from fimfast.estimator import _default_seed
from fimfast.finite import all_finite, gram_finite, grams_finite, is_square_dense
from fimfast.grad_mode import autograd_on
from fimfast.structured import engine, gram, structure
from fimfast.structured.dense import PairAccumulator
from fimfast.structured.kron import EKFACFIM, KFACFIM, QuasiDiagFIM
from fimfast.structured.sums import LayerSums, half_gram
from fimfast.types import FIMType, check_reduction

_STATE_VERSION = 1


class FisherAccumulator:
    """Batch-by-batch accumulation of a structured Fisher (the engine of
    :func:`fimfast.fisher`; arguments as there). ``representation="ekfac"`` has two phases:
    ``update`` the factors, :meth:`start_refit`, ``update`` again over the data (the refit of
    the diagonal), then :meth:`result`."""

    def __init__(self, model: torch.nn.Module, fim_type: FIMType | str = "exact",
                 representation: str = "kfac", reduction: str = "mean", *,
                 kfac_approx: str = "expand", max_rows: int | None = 100_000,
                 pair_chunk: int | None = None, distributed: str = "auto", group: Any = None,
                 **opts: Any):
        from fimfast.structured import api

        if representation not in api.REPRESENTATIONS or representation == "diag":
            raise ValueError("representation must be one of "
                             f"{tuple(r for r in api.REPRESENTATIONS if r != 'diag')} (use "
                             f"fimfast.DiagFisher for 'diag'); got {representation!r}")
        if distributed not in ("auto", "none"):
            raise ValueError(f"distributed must be 'auto' or 'none'; got {distributed!r}")
        api.check_count(max_rows, "max_rows")
        self.fim_type = FIMType.parse(fim_type)
        check_reduction(reduction)
        self.model, self.representation, self.reduction = model, representation, reduction
        self.kfac_approx, self.pair_chunk = kfac_approx, pair_chunk
        self.distributed, self.group = distributed, group
        o, odict = api._options_and_dict(representation, opts, kfac_approx, None, pair_chunk)
        self._structure = structure.of(model)
        self.names, self.params = list(self._structure.names), list(self._structure.params)
        seed = o.seed if o.seed is not None else _default_seed()
        rank = dist_mod.world(group)[0] if distributed == "auto" else 0
        self.stream = engine.Stream(self.fim_type, o, dist_mod.rank_seed(seed, rank))
        self._guard = self._structure.step_guard(model)
        self.seed = seed
        self.shapes = [tuple(p.shape) for p in self.params]
        self._layout = [(tuple(p.shape), p.dtype, p.device) for p in self.params]
        self.phase = "factors"
        self._consumed = False  # result(consume=True) handed KFAC's sums over: see _live
        self.eig: list | None = None
        self.kfac: KFACFIM | None = None
        self.meta = {"fim_type": self.fim_type.value, "representation": representation,
                     "reduction": reduction, "names": self.names, "options": odict}
        if representation in ("dense", "block_diag", "low_rank"):
            dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
            self.acc = PairAccumulator(representation, self.names, self.shapes, dtype,
                                       self.params[0].device, max_rows)
            self.layers = []
        else:
            self.layers = structure.layers(self._structure, model, representation)
            api.check_approx(self.layers, representation, kfac_approx)
            self.sums = [LayerSums() for _ in self.layers]
            if representation in ("kfac", "ekfac"):
                self.meta["kfac_approx"] = kfac_approx

    # -- accumulation ------------------------------------------------------------------------ #
    @autograd_on(backend=lambda acc: acc.stream.opts.backend)
    def update(self, batch: Any) -> None:
        """Add one batch (refused, with nothing added, when the model's trainable parameters
        changed since the accumulator was made: see :func:`check_same_parameters`)."""
        self._live()
        check_same_parameters(self.model, self._structure, self._layout)
        self.stream.extra.setdefault("guard", self._guard)
        self.stream.extra.setdefault("apart", self._structure.apart)
        if self.representation in ("dense", "block_diag", "low_rank"):
            engine.dense_pass(self.model, [batch], self.stream, self.params, self.acc, None,
                              self.pair_chunk)
            return
        what = {"kfac": "kfac", "quasi_diag": "quasi_diag"}.get(self.representation, "kfac")
        if self.phase == "refit":
            what = "ekfac"
        approx = "expand" if what == "ekfac" else self.kfac_approx
        engine.kron_batch(self.model, batch, self.stream, self.layers, self.sums, what, approx,
                          self.eig, self.pair_chunk)

    def add(self, loader: Iterable, max_batches: int | None = None) -> FisherAccumulator:
        """Add every batch of ``loader`` (at most ``max_batches``)."""
        from fimfast.loaders import check_loader
        from fimfast.structured.api import check_count

        check_count(max_batches, "max_batches")
        check_loader(loader)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            self.update(batch)
        return self

    def start_refit(self) -> None:
        """EKFAC: fix the eigenbasis of the (reduced) factors and start the refit pass (the
        random stream continues)."""
        self._live()
        if self.representation != "ekfac" or self.phase != "factors":
            raise ValueError(f"start_refit is for representation='ekfac' after its factor pass; "
                             f"this accumulator is {self.representation!r} in phase "
                             f"{self.phase!r}")
        self.kfac = self._kfac(consume=True)  # the factor sums are replaced below
        self.eig = [(e[1], e[3]) for e in self.kfac.eig()]
        st = self.stream
        self.stream = engine.Stream(st.fim_type, st.opts, st.seed, st.offset)
        self.sums = [LayerSums() for _ in self.layers]
        self.phase = "refit"

    # -- reading ------------------------------------------------------------------------------ #
    def result(self, consume: bool = False):
        """The structured Fisher of everything added (summed over ranks, see the module
        docstring). ``consume=True`` lets KFAC's factors reuse the accumulator's buffers (no
        copies); the accumulator is then refused by every method but ``load_state_dict``
        (its sums are the result's factors, scaled and mirrored in place)."""
        self._live()
        sums, count, batches = self._reduced()
        if count == 0:
            raise ValueError("no batch was added (loader yielded no batch)")
        check_finite_sums(self, sums)
        sc = 1.0 if self.reduction == "sum" else 1.0 / count
        meta = {**self.meta, "count": count, "batches": batches, "seed": self.seed}
        if self.representation in ("dense", "block_diag", "low_rank"):
            return sums.result(sc, meta)
        info = structure.infos(self._structure, self.layers)
        if self.representation == "quasi_diag":
            return QuasiDiagFIM(self.names, self.shapes, info, [s.D * sc for s in sums],
                                [None if s.cross is None else s.cross * sc for s in sums], meta)
        if self.representation == "kfac":
            A, G = _factors(self.layers, sums, sc, consume or sums is not self.sums)
            self._consumed = consume and sums is self.sums
            return KFACFIM(self.names, self.shapes, info, A, G, meta)
        if self.phase != "refit":
            raise ValueError("representation='ekfac': call start_refit() and add the data again "
                             "(the refit of the diagonal) before result()")
        meta = {**dict(self.kfac.meta), **meta, "representation": "ekfac"}
        return EKFACFIM(self.names, self.shapes, info, [e[0] for e in self.eig],
                        [e[1] for e in self.eig], [s.D * sc for s in sums], meta)

    def _kfac(self, consume: bool = False) -> KFACFIM:
        sums, count, batches = self._reduced()
        if count == 0:
            raise ValueError("no batch was added (loader yielded no batch)")
        check_finite_sums(self, sums)  # before the sums are consumed
        sc = 1.0 if self.reduction == "sum" else 1.0 / count
        meta = {**self.meta, "count": count, "batches": batches, "seed": self.seed}
        info = structure.infos(self._structure, self.layers)
        A, G = _factors(self.layers, sums, sc, consume or sums is not self.sums)
        return KFACFIM(self.names, self.shapes, info, A, G, meta)

    def _reduced(self):
        """``(sums or pair accumulator, rows, batches)``, summed over ranks when distributed."""
        local = self.acc if not self.layers else self.sums
        st = self.stream
        if not dist_mod.active(self.distributed, self.group):
            return local, st.count, st.batches
        for s in local if self.layers else []:
            s.settle()
        from fimfast.structured.reduce import reduce_state

        return reduce_state(self, local)

    # -- state --------------------------------------------------------------------------------- #
    def state_dict(self) -> dict[str, Any]:
        """The accumulated sums, the phase and the stream position (tensors cloned)."""
        from fimfast.structured.reduce import state_of

        self._live()
        for s in self.sums if self.layers else []:
            s.settle()
        return state_of(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` of an accumulator with the same model layout,
        representation, ``fim_type``, reduction and options."""
        from fimfast.structured.reduce import load_state

        load_state(self, state)
        self._consumed = False  # the sums are the loaded ones

    def _live(self) -> None:
        if self._consumed:
            raise ValueError("this FisherAccumulator's sums were handed to result(consume=True) "
                             "(they are that result's factors now); make a new accumulator, or "
                             "call result() without consume to keep accumulating")

    def signature(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "representation": self.representation,
                "fim_type": self.fim_type.value, "reduction": self.reduction,
                "kfac_approx": self.kfac_approx, "names": list(self.names),
                "shapes": [list(s) for s in self.shapes],
                "options": self.stream.opts.to_dict()}

    def crc(self) -> int:
        return zlib.crc32(repr(sorted((k, repr(v)) for k, v in self.signature().items()
                                      if k != "options")).encode())


def check_same_parameters(model: torch.nn.Module, made: structure.Structure,
                          layout: list[tuple]) -> None:
    """Raise a ``ValueError`` naming ``model`` when its trainable parameters are no longer the
    tensors the accumulator was made for (a parameter added, removed, frozen or replaced by a new
    tensor, or one of them reshaped or moved to another dtype or device; ``layout``: the
    ``(shape, dtype, device)`` of each when it was made): the pass differentiates the parameters
    it found when it was made, so a replaced one would get no gradient from the batches after
    the change."""
    now = structure.of(model)
    if now is made:  # the same structure key: the same tensors, shapes, dtypes and devices
        return
    same = now.names == made.names and all(a is b for a, b in zip(now.params, made.params))
    if same and all(p.shape == s and p.dtype is dt and p.device == dev
                    for p, (s, dt, dev) in zip(now.params, layout)):
        return
    old = {n: (q, *lay) for n, q, lay in zip(made.names, made.params, layout)}
    added = sorted(set(now.names) - set(old))
    removed = sorted(set(old) - set(now.names))
    changed = sorted(n for n, p in zip(now.names, now.params) if n in old and (
        p is not old[n][0] or tuple(p.shape) != old[n][1]))
    moved = sorted(n for n, p in zip(now.names, now.params) if n in old and (
        p.dtype != old[n][2] or p.device != old[n][3]))
    what = (f"added {added[:5]}, removed or frozen {removed[:5]}, replaced or reshaped "
            f"{changed[:5]}, moved to another dtype or device {moved[:5]}"
            if added or removed or changed or moved else "the same parameters in another order")
    raise ValueError(
        f"model: its trainable parameters changed since this FisherAccumulator was made: {what}; "
        "nothing of the batch was added (make a new accumulator for the changed model)")


def check_finite_sums(acc: FisherAccumulator, sums) -> None:
    """Refuse to read sums with a NaN or an infinite entry (a ``ValueError`` naming the layer or
    representation): finite logits can still come from layer inputs whose squares overflow
    (``1e20`` in float32), and a factor, an eigenbasis or a solve of such sums is no number."""
    if not acc.layers:
        a = sums
        parts = [("sum", a.sum)] if a.kind == "dense" else \
            [("block", t) for t in a.sums] if a.kind == "block_diag" else \
            [("rows", t) for t in a.rows]
        gram = a.kind != "low_rank"  # dense and block sums are positive semi-definite
        where = [f"representation={acc.representation!r}" for k, t in parts
                 if _not_finite(t, False, gram)]
    elif _grams_finite(sums):
        return
    else:
        where = [f"layer {layer.name!r} ({f})" for layer, sm in zip(acc.layers, sums)
                 for f in LayerSums.FIELDS
                 if _not_finite(getattr(sm, f), f in sm.unset, f in ("A", "G"))]
    if where:
        raise ValueError(f"the accumulated sums of {where[0]} are not finite (NaN/Inf): a layer's "
                         "inputs or output gradients overflow their dtype (float32: squares "
                         "above 3e38); scale the inputs, or use a float64 model")


def _grams_finite(sums: list[LayerSums]) -> bool:
    """Whether every layer's sums are finite, settled at once (every factor by
    :func:`fimfast.finite.grams_finite`, one gather of their diagonals, and one read of the other
    fields); ``False`` also where that does not settle it (then each field is read on its own)."""
    grams, rest = [], []
    for sm in sums:
        for f in LayerSums.FIELDS:
            t = getattr(sm, f)
            if t is None:
                continue
            if f in ("A", "G") and is_square_dense(t):
                grams.append(t)
            elif f in sm.unset or t.is_sparse:
                return False
            else:
                rest.append(t)
    return grams_finite(grams) is True and all_finite(rest)


def _not_finite(t, upper: bool, gram: bool) -> bool:
    """Whether the sums ``t`` hold a NaN/Inf; ``gram``: a sum of outer products (KFAC's ``A`` and
    ``G``, the dense and block sums), read from its diagonal where that settles it
    (:func:`fimfast.finite.gram_finite`: a factor of (a) is not read whole on every result)."""
    if t is None:
        return False
    if gram and (ok := gram_finite(t)) is not None:
        return not ok
    if t.is_sparse:
        t = t.coalesce().values()
    elif upper:  # the entries below the diagonal are unspecified (LayerSums.unset)
        t = t.triu()
    return not all_finite([t])


def _factors(layers, sums: list[LayerSums], sc: float, inplace: bool):
    """KFAC's ``A`` (mean over positions) and ``G`` (scaled by ``sc``) from the sums, symmetric
    or completed where read (:func:`~fimfast.structured.sums.half_gram`); in the sums' own
    buffers if ``inplace``."""
    A, G = [], []
    for layer, s in zip(layers, sums):
        a, g, sa = s.A, s.G, 1.0 / max(s.npos, 1.0)
        g = half_gram(g, inplace, sc)  # every kind's G is a Gram matrix
        if a.is_sparse:  # an embedding's reduce rows: the factor of the mean
            A.append(gram.scaled(a, s.npos))
            G.append(g)
            continue
        if layer.kind != "embedding":  # LayerNorm's (D I', D I') too
            a = half_gram(a, inplace, sa)
        else:
            a = a.mul_(sa) if inplace else a * sa
        A.append(a)
        G.append(g)
    return A, G
