"""``torch.distributed``: the estimate reduced over ranks, and wrapped models (docs/math.md §9).

Each rank accumulates the Fisher of its own shard of the data. Reading the estimate
(:meth:`fimfast.DiagFisher.result`, :func:`fimfast.get_diag_fim`) with ``distributed="auto"`` (the
default) and an initialised process group of more than one rank sums the states and the row counts
over the ranks into **new** tensors: the local state is never modified, so reading twice (or
stepping on after a read) never counts a shard twice. Every rank must read (it is a collective).

* EXACT / EMPIRICAL over R ranks equal the single-process estimate on the union of the shards (up
  to float32 summation order); the random types equal it in law: every rank draws its probes from
  its own stream (the seed is mixed with the rank), so probes are independent across ranks.
* ``reduction="mean"`` divides the summed state by the summed count: exact for shards of any size.
* ``ema``: with ``reduction="sum"`` the EMA of the union's batch sums is the sum of the ranks'
  EMAs (exact); with ``"mean"`` the ranks' EMAs are averaged, which is the EMA of the union's batch
  means when every rank's batches have equal row counts. Every rank must have taken the same
  number of steps (checked).
* Without an initialised group, with one rank, or with ``distributed="none"``, nothing is reduced.

Wrapped models:

* ``DistributedDataParallel``: ``step`` runs the wrapped module's own forward (``model.module``),
  so a Fisher-only step runs no DDP machinery at all: no reducer bookkeeping, no buffer broadcast,
  no collective (ranks may take different numbers of steps). The probe backward is a
  ``torch.autograd.grad``, which captures the gradients at the parameters without running their
  ``AccumulateGrad`` nodes, where DDP's reducer hooks live: no gradient all-reduce is launched
  (verified with a DDP communication hook that counts its calls: zero calls for any number of
  Fisher steps, and the next training backward synchronises as usual). ``train_step`` runs the
  DDP forward and back-propagates the loss with ``torch.autograd.backward``, so the training
  gradients are all-reduced exactly once, as in ordinary DDP training.
* FSDP2 (``torch.distributed.fsdp.fully_shard``): the forward all-gathers each unit's parameters
  into full-size plain tensors, registers them on the module and uses them as the graph's leaves;
  fimfast takes the parameters *after* the forward, so ``torch.autograd.grad`` gives each rank's
  full-size, un-reduced local gradient, the state is a full-size float32 tensor per parameter on
  every rank (not sharded) and the reduction happens at read time as above. A unit that reshards
  right after its forward (``reshard_after_forward=True``, the default of non-root units) leaves
  nothing to differentiate (the sharded ``DTensor`` is not in the graph, every gradient would be
  ``None``): such a step is refused with that reason; use ``reshard_after_forward=False`` for the
  Fisher. The forward all-gathers, so ranks step in lockstep.
* FSDP1 (``FullyShardedDataParallel``): ``torch.autograd.grad`` does not reach its flat sharded
  parameters (every gradient comes back ``None``); such a model is refused with that reason.
"""

from __future__ import annotations

import copy
import sys
import zlib
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel  # imported by torch itself

from fimfast.state import State

# golden-ratio increment of a 64-bit Weyl sequence: seeds of different ranks differ in all bits
_RANK_STRIDE = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    """Whether a default process group exists."""
    return (_IS_INITIALIZED or _is_initialized())[0]()


def _is_initialized() -> list:
    """``[torch.distributed.is_initialized]`` (a function returning ``False`` where
    ``torch.distributed`` is not available), looked up once and kept in
    :data:`_IS_INITIALIZED`: a step asks at least once."""
    dist = _dist()
    _IS_INITIALIZED.append(dist.is_initialized if dist.is_available() else bool)
    return _IS_INITIALIZED


_IS_INITIALIZED: list = []


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when ``torch.distributed`` is not in use."""
    if not initialized():
        return 0, 1
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def active(mode: str, group: Any = None) -> bool:
    """Whether an estimator with ``distributed=mode`` reduces over ``group`` now."""
    return mode == "auto" and world(group)[1] > 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank`` draws its probes with (rank 0 keeps ``seed``)."""
    if rank == 0:
        return int(seed)
    return (int(seed) + rank * _RANK_STRIDE) & _MASK64


def reduced_state(state: State, group: Any = None) -> State:
    """A copy of ``state`` whose values, count and steps are summed over the ranks of ``group``.

    ``state`` itself is left untouched. Collective: every rank of ``group`` must call it.

    Raises:
        ValueError: the ranks disagree on the parameters, reduction or EMA, or (with an EMA) on
            the number of steps.
    """
    dist = _dist()
    rank, size = world(group)
    values = state.values
    dev = values[0].device if values else torch.device("cpu")
    names_crc = zlib.crc32("\0".join(state.names).encode())
    shapes_crc = zlib.crc32(repr(state.shapes).encode())
    ema_code = -1 if state.ema is None else int(round(state.ema * 1e9))
    meta = torch.tensor(
        [
            names_crc,
            shapes_crc,
            ("sum", "mean").index(state.reduction),
            ema_code,
            state.steps,
            state.count,
        ],
        dtype=torch.int64,
        device=dev,
    )
    gathered = [torch.empty_like(meta) for _ in range(size)]
    dist.all_gather(gathered, meta, group=group)
    table = torch.stack(gathered).cpu().tolist()
    for r, row in enumerate(table):
        if row[:4] != table[0][:4]:
            what = ["parameter names", "parameter shapes", "reduction", "ema"][
                next(i for i in range(4) if row[i] != table[0][i])
            ]
            raise ValueError(
                f"distributed: rank {r} and rank 0 disagree on the {what} of the estimator; every "
                "rank must estimate the same model with the same reduction and ema"
            )
    steps = [row[4] for row in table]
    if state.ema is not None and len(set(steps)) > 1:
        raise ValueError(
            f"distributed: an EMA state needs the same number of steps on every rank; got steps "
            f"{steps} for ranks 0..{size - 1} (use ema=None, or feed every rank the same number "
            "of batches)"
        )
    out = copy.copy(state)
    out.values = _all_reduce_sum(values, group)
    out.count = sum(row[5] for row in table)
    if state.ema is None:
        out.steps = sum(steps)
    else:
        out.steps = steps[0]
        if state.reduction == "mean":
            torch._foreach_div_(out.values, float(size))
    return out


def _all_reduce_sum(values: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """New tensors: ``values`` summed over ranks, one flat all-reduce per dtype."""
    dist = _dist()
    out: list[torch.Tensor | None] = [None] * len(values)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, v in enumerate(values):
        by_dtype.setdefault(v.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([values[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        pos = 0
        for i in idx:
            n = values[i].numel()
            out[i] = flat[pos : pos + n].view(values[i].shape)
            pos += n
    return out  # type: ignore[return-value]


def forward_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward a Fisher-only step runs: DDP's wrapped module, else ``model``."""
    ddp = _DDP_TYPES.get(type(model))
    if ddp is None:  # (DistributedDataParallel is an ABC: its isinstance check runs Python)
        ddp = _DDP_TYPES[type(model)] = isinstance(model, DistributedDataParallel)
    return model.module if ddp else model


_DDP_TYPES: dict[type, bool] = {}  # model class -> whether it is a DistributedDataParallel


def is_ddp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper."""
    return isinstance(model, DistributedDataParallel)


def check_model(model: torch.nn.Module) -> None:
    """Refuse wrappers whose parameters ``torch.autograd.grad`` cannot reach (FSDP1)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "model: FullyShardedDataParallel (FSDP1) is not supported: torch.autograd.grad does "
            "not reach its flat sharded parameters (every gradient comes back None). Wrap the "
            "model with torch.distributed.fsdp.fully_shard (FSDP2) or DistributedDataParallel"
        )


def check_params_after_forward(names: list[str], params: list[torch.Tensor]) -> None:
    """Refuse a step whose parameters are sharded ``DTensor`` s after the forward (FSDP2 resharded).

    Such parameters are not leaves of the graph the forward built, so every gradient would come
    back ``None`` and the estimate would silently be zero.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in zip(names, params) if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"model: parameters {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are sharded "
            "DTensors after the forward (an FSDP2 unit with reshard_after_forward=True): the "
            "forward's graph holds their all-gathered copies, not them, so no gradient reaches "
            "them. Wrap with fully_shard(..., reshard_after_forward=False) to estimate the Fisher"
        )
