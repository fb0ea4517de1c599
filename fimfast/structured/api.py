"""``fimfast.fisher``: one call for every representation of the Fisher (docs/structured.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fimfast.estimator import diag_fisher
from fimfast.grad_mode import autograd_on
from fimfast.loaders import check_loader
from fimfast.structured import engine
from fimfast.structured.accumulate import FisherAccumulator
from fimfast.structured.base import StructuredFIM
from fimfast.structured.kron import EKFACFIM, KFACFIM
from fimfast.types import FIMType, Options, check_reduction

REPRESENTATIONS = ("diag", "quasi_diag", "kfac", "ekfac", "block_diag", "low_rank", "dense")
KFAC_APPROX = ("expand", "reduce")


@autograd_on
def fisher(
    model: torch.nn.Module,
    loader: Iterable,
    fim_type: FIMType | str = "exact",
    representation: str = "kfac",
    reduction: str = "mean",
    *,
    kfac_approx: str = "expand",
    rank: int | None = None,
    max_rows: int | None = 100_000,
    max_batches: int | None = None,
    pair_chunk: int | None = None,
    distributed: str = "auto",
    **opts: Any,
):
    """The Fisher of ``model`` on ``loader`` in a chosen representation.

    Args:
        model: the network (its mode, parameters and ``.grad`` are left as they are).
        loader: an iterable of batches (any form ``DiagFisher`` accepts). ``ekfac`` makes two
            passes over it (factors, then the refit of the diagonal), so it must be re-iterable.
        fim_type: EXACT, EMPIRICAL, MONTE_CARLO or a HUTCHINSON type (see docs/structured.md for
            the matrix each estimates).
        representation: ``diag`` (a :class:`~fimfast.DiagFIM`), ``quasi_diag``, ``kfac``,
            ``ekfac``, ``block_diag``, ``low_rank`` or ``dense``.
        reduction: ``sum`` over rows (samples or unmasked tokens), or ``mean``.
        kfac_approx: weight sharing (sequence positions, convolution locations) in KFAC:
            ``expand`` (every position is an example) or ``reduce`` (positions summed first).
        rank: ``low_rank`` only: keep the top-``rank`` eigenpairs (``None``: the exact factor).
        max_rows: ``low_rank`` only: refuse to keep more gradient rows than this (under
            ``torch.distributed``: the rows of all ranks together).
        max_batches: stop after this many batches.
        pair_chunk: cotangents per batched backward (default: from ``FIMFAST_MEMORY_BUDGET_MB``).
        distributed: ``"auto"``: under ``torch.distributed`` with more than one rank, the sums are
            added over the ranks (collective; each rank passes its own shard); ``"none"``: this
            rank's data only (see :class:`~fimfast.structured.FisherAccumulator`); for
            ``diag`` the option of the same name of :class:`~fimfast.DiagFisher`.
        **opts: estimator options (``num_probes``, ``seed``, ``likelihood``, ``sigma2``,
            ``ignore_index``, ``forward_fn``, ``shift_labels``, ``top_k``, ``backend``).

    Returns:
        A :class:`~fimfast.DiagFIM` for ``diag``, otherwise a
        :class:`~fimfast.structured.StructuredFIM` (``DenseFIM``, ``BlockDiagFIM``,
        ``LowRankFIM``, ``KFACFIM``, ``EKFACFIM`` or ``QuasiDiagFIM``).
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}; got "
                         f"{representation!r}")
    fim_type = FIMType.parse(fim_type)
    check_reduction(reduction)
    check_count(max_batches, "max_batches")
    check_loader(loader)
    if representation == "diag":
        _diag_args(kfac_approx, rank, pair_chunk, max_rows, distributed)
        return diag_fisher(model, loader, fim_type, reduction=reduction,
                           max_batches=max_batches, distributed=distributed, **opts)
    _check_args(representation, kfac_approx, rank, pair_chunk)  # the options: by the accumulator
    if representation == "ekfac" and iter(loader) is loader:
        raise ValueError("representation='ekfac' makes two passes over the data (factors, then "
                         "the refit of the diagonal); loader must be re-iterable (a list or a "
                         "DataLoader), not an iterator")
    acc = FisherAccumulator(model, fim_type, representation, reduction, kfac_approx=kfac_approx,
                            max_rows=max_rows, pair_chunk=pair_chunk, distributed=distributed,
                            **opts)
    acc.add(loader, max_batches)
    if representation == "ekfac":
        acc.start_refit()
        acc.add(loader, max_batches)
    out = acc.result(consume=True)
    return out.truncated(rank) if rank is not None else out


def check_count(value, name: str) -> None:
    """``value`` is ``None`` or an integer ``>= 1`` (``ValueError`` naming ``name``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None; got {value!r}")


def _diag_args(kfac_approx: str, rank, pair_chunk, max_rows, distributed: str) -> None:
    """``representation="diag"`` (a ``DiagFisher`` pass) takes none of the structured options;
    ``distributed`` is passed on as its option of the same name."""
    given = [n for n, v, default in (("kfac_approx", kfac_approx, "expand"), ("rank", rank, None),
                                     ("pair_chunk", pair_chunk, None),
                                     ("max_rows", max_rows, 100_000)) if v != default]
    if given:
        raise ValueError(f"{', '.join(given)}: not options of representation='diag' (a "
                         "DiagFisher pass); leave them unset")
    if distributed not in ("auto", "none"):
        raise ValueError(f"distributed must be 'auto' or 'none'; got {distributed!r}")


def check_approx(layers, representation: str, kfac_approx: str) -> None:
    """EKFAC with ``kfac_approx="reduce"`` on an embedding is refused, naming the module: its
    input factor (rank at most the number of samples, kept as sparse rows) has no complete
    ``V x V`` eigenbasis in which to refit the diagonal (docs/structured.md, "KFAC")."""
    if representation == "ekfac" and kfac_approx == "reduce":
        for layer in layers:
            if layer.kind == "embedding":
                raise ValueError(
                    f"representation='ekfac' with kfac_approx='reduce' is not available for module "
                    f"{layer.name!r} (Embedding): its input factor has rank at most the number of "
                    "samples and is kept as sparse rows, so there is no complete V x V "
                    "eigenbasis to refit the diagonal in; use representation='kfac', "
                    "kfac_approx='expand', or freeze the embedding")


def _options(representation: str, opts: dict, kfac_approx: str, rank, pair_chunk) -> Options:
    """Validated options of a structured representation (errors name the argument)."""
    return _options_and_dict(representation, opts, kfac_approx, rank, pair_chunk)[0]


# validated options and their plain-data view, by the items of ``opts`` with their types (so that
# ``seed=True`` is not taken for ``seed=1``); only plain values (no ``forward_fn``, whose closure
# the cache would keep alive)
_OPTIONS: dict = {}
_PLAIN = (type(None), bool, int, float, str)


def _options_and_dict(representation: str, opts: dict, kfac_approx: str, rank,
                      pair_chunk) -> tuple[Options, dict]:
    """``(options, options.to_dict())`` of :func:`_options` (the options of the same plain items
    are validated once; ``Options`` is frozen, and the dict is a new copy each call)."""
    key = hit = None
    if isinstance(opts, dict) and all(type(v) in _PLAIN for v in opts.values()):
        key = tuple(sorted((k, type(v), v) for k, v in opts.items()))
        hit = _OPTIONS.get(key)
    if hit is None:
        o = Options.from_dict(opts)
        if o.lm_head is not None:
            raise ValueError("fim_opts['lm_head'] is for representation='diag' only (the "
                             "structured representations need the logits); got "
                             f"representation={representation!r}")
        if o.sequence_rows:
            raise ValueError("fim_opts['sequence_rows'] is for representation='diag' only (the "
                             "structured representations take one row per token); got "
                             f"representation={representation!r}")
        hit = (o, o.to_dict())
        if key is not None:
            if len(_OPTIONS) >= 64:
                _OPTIONS.clear()
            _OPTIONS[key] = hit
    _check_args(representation, kfac_approx, rank, pair_chunk)
    return hit[0], dict(hit[1])


def _check_args(representation: str, kfac_approx: str, rank, pair_chunk) -> None:
    if kfac_approx not in KFAC_APPROX:
        raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}; got {kfac_approx!r}")
    if rank is not None and representation != "low_rank":
        raise ValueError(f"rank is for representation='low_rank'; got representation="
                         f"{representation!r}")
    if pair_chunk is not None and (isinstance(pair_chunk, bool) or not isinstance(pair_chunk, int)
                                   or pair_chunk < 1):
        raise ValueError(f"pair_chunk must be an integer >= 1 or None; got {pair_chunk!r}")


def refit_ekfac(F: KFACFIM, model, loader, st: engine.Stream, layers, reduction: str,
                max_batches=None, pair_chunk=None) -> EKFACFIM:
    """EKFAC from KFAC: its eigenbasis, the diagonal refitted by a second pass of per-pair
    squared gradients projected on that basis."""
    eig = [(e[1], e[3]) for e in F.eig()]
    st2 = engine.Stream(st.fim_type, st.opts, st.seed, st.offset)
    sums = engine.kron_pass(model, loader, st2, layers, "ekfac", "expand", eig, max_batches,
                            pair_chunk)
    sc = _scale(st2, reduction)
    meta = _meta(dict(F.meta), st2)
    meta["representation"] = "ekfac"
    return EKFACFIM(F.names, F.shapes, F.layers, [e[0] for e in eig], [e[1] for e in eig],
                    [s.D.mul_(sc) for s in sums], meta)


def _scale(st: engine.Stream, reduction: str) -> float:
    if st.count == 0:
        raise ValueError("loader yielded no batch")
    return 1.0 if reduction == "sum" else 1.0 / st.count


def _meta(meta: dict, st: engine.Stream) -> dict:
    return {**meta, "count": st.count, "batches": st.batches, "seed": st.seed}


__all__ = ["REPRESENTATIONS", "StructuredFIM", "fisher", "refit_ekfac"]
