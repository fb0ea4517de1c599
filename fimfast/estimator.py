"""DiagFisher: the object API. Orchestration only: batch -> factor -> engine -> state."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fimfast import batch as batchlib
from fimfast import distributed, guard, hutchinson, likelihoods, lm_head, persample, prepared
from fimfast.diagfim import DiagFIM
from fimfast.finite import left_out_checked
from fimfast.forward import Forward, default_loss_all_rows
from fimfast.grad_mode import autograd_on
from fimfast.guard import BufferGuard
from fimfast.loaders import check_loader
from fimfast.nograd import NogradWatch, nograd_error
from fimfast.ops import registry
from fimfast.parameters import ParamWalk, check_real, trainable_parameters
from fimfast.persample import prepared as prepared_ps
from fimfast.sparse_tables import candidates, live, sparse_lookups
from fimfast.state import State, counter_of
from fimfast.step import Step
from fimfast.types import FIMType, Options, check_ema, check_reduction, check_type_options

__all__ = ["DiagFisher", "diag_fisher", "trainable_parameters"]

logger = logging.getLogger("fimfast")
_DTENSOR = "torch.distributed.tensor"  # the module of FSDP2's parameters
_ONE_COLUMN = (FIMType.EMPIRICAL, FIMType.MONTE_CARLO)  # the types of fimfast.persample.prepared
# EXACT's cost (one cotangent per (row, class) pair) is announced with a warning from this many on
EXACT_WARN_CLASSES = 4096


def _default_seed() -> int:
    # drawn from torch's default generator, so torch.manual_seed reproduces a run
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class DiagFisher:
    """Accumulates the diagonal Fisher of ``model`` over batches.

    Args:
        model: any ``nn.Module`` whose output gives logits (tensor, tuple, ``.logits``).
        fim_type: a :class:`FIMType` or its string value.
        reduction: ``"sum"`` over rows, or ``"mean"`` (exact over batches of different sizes).
        ema: ``None``, or a decay ``0 < ema < 1`` for an exponential moving average of the
            per-batch estimates (bias-corrected at read time).
        **opts: the options of :class:`fimfast.types.Options` (``num_probes``, ``top_k``,
            ``seed``, ``backend``, ``likelihood``, ``shift_labels``, ``distributed``, ...).

    Precision: states are float32 (float64 for float64 parameters) whatever the parameter dtype,
    chosen when the state is made (here, :meth:`reset`, ``zero_diag_fim``: a model converted
    later by ``model.double()`` adds its steps rounded to float32 until then); bf16/fp16 models
    and ``torch.autocast`` regions are supported: the forward runs as the caller set it up,
    fimfast's own arithmetic (probes, eigenpairs, squares) runs in float32 with autocast
    disabled, and gradients are squared after their conversion to float32.

    Distributed: with ``distributed="auto"`` and an initialised process group, :meth:`result`
    sums states and counts over the ranks (a collective; the local state is untouched, so calling
    it twice never double-counts). See :mod:`fimfast.distributed` for DDP and FSDP.

    Example:
        >>> est = DiagFisher(model, "hutchinson", reduction="mean", num_probes=4)
        >>> for batch in loader:
        ...     est.step(batch)
        >>> fim = est.result()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fim_type: FIMType | str = "hutchinson",
        reduction: str = "sum",
        ema: float | None = None,
        **opts: Any,
    ):
        self.model = model
        self.fim_type = FIMType.parse(fim_type)
        self.reduction = check_reduction(reduction)
        self.ema = check_ema(ema)
        self.opts = Options.from_dict(opts)
        self._opts_given: dict[str, Any] | None = dict(opts)
        check_type_options(self.fim_type, self.opts)
        self._head = lm_head.resolve(model, self.fim_type, self.opts)
        registry.check_backend(self.opts.backend, _device_of(model))
        distributed.check_model(model)
        self._walk = ParamWalk()
        self.reset()
        self.seed = self.opts.seed if self.opts.seed is not None else _default_seed()
        self.offset = 0
        self._persample = persample.Engine()
        self._guard = BufferGuard()
        self._nograd = NogradWatch()
        self._modules = guard.ModuleWalk()
        self._warned_exact = False
        self._restarted = False  # restart() kept a state made before it: see _params
        self._prepared: prepared.Prepared | None = None  # see fimfast.prepared
        self._prepared_ps: prepared_ps.Prepared | None = None  # fimfast.persample.prepared

    @property
    def seed(self) -> int:
        """Seed of this rank's random stream (the base seed, mixed with the rank when reducing)."""
        if distributed.initialized() and distributed.active(
            self.opts.distributed, self.opts.process_group
        ):
            rank, _ = distributed.world(self.opts.process_group)
            return distributed.rank_seed(self._seed, rank)
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)

    # -- configuration ---------------------------------------------------------------------- #
    def set_options(self, opts: dict[str, Any] | None) -> None:
        """Replace the options (validated); a new ``seed`` restarts the random stream."""
        if opts is not None and opts == self._opts_given:
            return  # the same mapping as last time: nothing to validate again
        new = Options.from_dict(opts)
        check_type_options(self.fim_type, new)
        head = lm_head.resolve(self.model, self.fim_type, new)
        registry.check_backend(new.backend, _device_of(self.model))
        if new.seed is not None and new.seed != self._seed:
            self.seed, self.offset = new.seed, 0
        self.opts = new
        self._head = head
        self._opts_given = dict(opts or {})

    def restart(self, reduction: str, ema: float | None, opts: dict[str, Any] | None) -> None:
        """Start over as a new estimator of the same type would (state, reduction, ema,
        options and random stream), keeping the per-structure caches of the engines."""
        reduction, ema = check_reduction(reduction), check_ema(ema)
        if opts is not None and opts == self._opts_given:
            # the mapping validated last time: only the checks against the model run again
            self._head = lm_head.resolve(self.model, self.fim_type, self.opts)
            if self.opts.backend not in (None, "auto"):  # else nothing to check
                registry.check_backend(self.opts.backend, _device_of(self.model))
        else:
            self._opts_given = None
            self.set_options(opts)
        self.reduction, self.ema = reduction, ema
        self.seed = self.opts.seed if self.opts.seed is not None else _default_seed()
        self.offset = 0
        if not self._reset or self.state.reduction != reduction or self.state.ema != ema:
            self.reset()
        # a state kept from a reset() before (zero_diag_fim) is re-made at the next step if the
        # model's parameters changed since, as a new estimator would take them
        self._restarted = True

    def reset(self) -> None:
        """Forget the accumulated state (the random stream continues)."""
        names, params = self._walk.of(self.model)
        check_real(names, params)
        self.names = names
        self.state = State(names, params, self.reduction, self.ema)
        self._checked = (names, self.state)  # the parameter lists this state was checked against
        self._reset = True  # nothing committed or loaded into this state yet

    # -- steps -------------------------------------------------------------------------------- #
    def _params(self) -> list[torch.Tensor]:
        names, params = self._walk.of(self.model)  # the same lists while they hold
        if names is not self._checked[0] or self.state is not self._checked[1]:
            try:
                self.state.check_params(names, params)
            except ValueError:
                if not self._restarted:
                    raise
                self.reset()  # nothing accumulated since the restart: the state follows the model
            self._checked = (names, self.state)
        return params

    def _params_after_forward(self, before: list[torch.Tensor]) -> list[torch.Tensor]:
        # FSDP2 registers the unsharded parameters the forward used: the graph's leaves. Without
        # a process group or DTensor (FSDP2's parameters) the forward cannot have swapped them.
        if _DTENSOR not in sys.modules or not distributed.initialized():
            return before
        params = self._params()
        distributed.check_params_after_forward(self.names, params)
        return params

    def _forward_of(
        self, batch: Any, train: bool = False, head: lm_head.HeadCapture | None = None
    ) -> Forward:
        return Forward(
            self.model, self.fim_type, self.opts, batch, train, head,
            on_rows=self._announce_exact_cost if self.fim_type == FIMType.EXACT else None,
        )

    def _captured_forward(
        self, params: list[torch.Tensor], batch: Any, train: bool = False
    ) -> tuple[Any, batchlib.Rows]:
        """The forward, under the per-sample engine's layer capture for per-sample types:
        ``(capture or None, rows)`` (hooks removed on exit)."""
        if not self.fim_type.is_per_sample:
            # row-sparse table gradients in a Fisher-only step (never in train_step's .grad)
            tables = [] if train else self._sparse_tables(params)
            lookups = sparse_lookups(tables) if tables else _NOTHING
            with self._nograd.watching(self.model, params, lean=True) as seen, lookups:
                rows = self._forward_of(batch, train).run()[1]
            # a reentrant checkpoint runs its segment without gradients, and HUTCHINSON's
            # plain backward reaches its parameters all the same
            if seen and not hutchinson.has_reentrant_checkpoint(rows.flat):
                raise nograd_error(seen, "")
            return None, rows
        cap, (_, rows) = self._persample.forward(
            self.model, params, batchlib.batch_size(batch, self.opts.batch_dim),
            self._forward_of(batch, train),
        )
        return cap, rows

    def _sparse_tables(self, params: list[torch.Tensor]) -> list[torch.nn.Module]:
        """The lookup tables that run sparse in this model's HUTCHINSON steps
        (:func:`fimfast.sparse_tables.candidates`, found once per parameter set)."""
        key = (id(self.model), *map(id, params))
        if getattr(self, "_tables_key", None) != key:
            self._tables_key, self._tables = key, candidates(self.model, params)
        return live(self._tables)  # settings changed since: those tables dense

    def _announce_exact_cost(self, rows: batchlib.Rows) -> None:
        R, C = rows.count, rows.num_classes
        warn = C >= EXACT_WARN_CLASSES and not self._warned_exact
        if not warn and not logger.isEnabledFor(logging.INFO):
            return  # the message would be dropped: not formatted at every step
        msg = (
            f"EXACT back-propagates C = {C} columns of the core FIM factor for each of the "
            f"R = {R} rows of this batch: {R * C} (row, class) backward columns, in chunks "
            "bounded by class_chunk / FIMFAST_MEMORY_BUDGET_MB"
        )
        logger.info(msg)
        if warn:
            warnings.warn(
                msg + f" (about {C} times the cost of one HUTCHINSON probe; HUTCHINSON estimates "
                "the same diagonal without bias in one backward per probe)",
                UserWarning,
                stacklevel=7,  # the caller of step() / train_step()
            )
            self._warned_exact = True

    def _estimate(
        self,
        rows: batchlib.Rows,
        params: list[torch.Tensor],
        retain_graph: bool,
        cap=None,
        head: lm_head.HeadCapture | None = None,
    ) -> list[torch.Tensor]:
        step = Step(
            rows, params, self.fim_type, self.opts, self.seed, self.offset, self.state.dtypes,
            retain_graph=retain_graph, names=self.names, defer_square=True,
        )
        if head is not None:
            return lm_head.estimate(step, head)
        if not self.fim_type.is_per_sample:
            return hutchinson.estimate(step)
        return self._persample.estimate(step, cap)

    def _commit(self, acc: list[torch.Tensor], rows: batchlib.Rows, head=None) -> None:
        acc = left_out_checked(rows, acc, self.names, None if head is None else head.hidden)
        self.state.commit(acc, rows.count, owned=True)  # every estimate path returns fresh tensors
        self._reset = self._restarted = False
        self.offset += likelihoods.counters_used(self.opts.num_probes, rows.count, rows.num_classes)

    @autograd_on(backend=lambda est: est.opts.backend)
    def step(self, batch: Any) -> None:
        """Estimate on one batch and fold it into the state (all or nothing).

        The model's parameters, buffers (BatchNorm's running statistics included), gradients and
        train/eval mode are left as they were (see :mod:`fimfast.guard`); the default random
        generator advances as one forward of the model advances it (dropout), plus one draw
        when the estimator was created without a seed."""
        if self.fim_type in _ONE_COLUMN:
            if prepared_ps.step(self, batch):  # EMPIRICAL or one-draw MONTE_CARLO, prepared
                return
        elif not self.fim_type.is_per_sample and prepared.step(self, batch):
            return  # a one-probe HUTCHINSON step of a plain model
        params = self._params()  # a changed parameter set is refused before the forward
        with guard.step_kept(self._guard, self._modules, self.model, self.names, params):
            if self._head is None:
                cap, rows = self._captured_forward(params, batch)
                head = None
            else:  # HUTCHINSON types only (validated): no layer capture
                cap = None
                with lm_head.capture(self._head) as head:
                    _, rows = self._forward_of(batch, head=head).run()
            if _DTENSOR in sys.modules:  # else no forward swaps the parameters (FSDP2 only)
                params = self._params_after_forward(params)
            # one backward without a retained graph: HUTCHINSON types with one probe
            once = not self.fim_type.is_per_sample and head is None and self.opts.num_probes == 1
            with guard.arithmetic(rows.logits, retained=not once):
                acc = self._estimate(rows, params, retain_graph=False, cap=cap, head=head)
        self._commit(acc, rows, head)

    @autograd_on(backend=lambda est: est.opts.backend)
    def train_step(self, batch: Any, loss_fn: Callable | None = None) -> torch.Tensor:
        """One forward for both training gradients (added to ``.grad``) and the Fisher.

        The loss is ``loss_fn(logits, labels)`` (default: mean cross-entropy with
        ``ignore_index`` for categorical, ``BCEWithLogits`` for bernoulli, MSE for gaussian) over
        the valid rows (with ``shift_labels``, the default loss equals a Hugging Face causal LM's
        own loss). HUTCHINSON types reuse the training forward; per-sample types back-propagate
        their columns through the same graph. The loss gradients are accumulated into ``.grad``
        by ``torch.autograd.backward``; a ``DistributedDataParallel`` model synchronises them as in
        ordinary training (the Fisher backward triggers no all-reduce).

        Returns:
            The loss, detached.
        """
        if self._head is not None:
            raise ValueError(
                "train_step needs the logits for the loss; fim_opts['lm_head'] never forms them: "
                "leave lm_head unset for train_step (or call step() beside your own training step)"
            )
        params = self._params()
        cap, rows = self._captured_forward(params, batch, train=True)
        params = self._params_after_forward(params)
        if rows.labels is None:
            raise ValueError("batch: train_step needs labels; the batch has none")
        if loss_fn is None:
            loss = default_loss_all_rows(self.opts, rows)
        else:
            loss = loss_fn(rows.flat, rows.labels)
        with guard.arithmetic(rows.logits):
            acc = self._estimate(rows, params, retain_graph=True, cap=cap)
        # backward (not autograd.grad): the loss gradients land in .grad without a copy, and a
        # DistributedDataParallel model all-reduces them through its reducer hooks, as in training.
        # Reentrant checkpointing silently drops gradients given inputs=: plain backward there.
        if hutchinson.has_reentrant_checkpoint(loss):
            loss.backward()
        else:
            torch.autograd.backward(loss, inputs=params)
        self._commit(acc, rows)
        return loss.detach()

    # -- results ------------------------------------------------------------------------------ #
    def result(self, local: bool = False) -> DiagFIM:
        """The current estimate as a :class:`DiagFIM` (raises before any step).

        Args:
            local: with ``distributed="auto"`` and an initialised process group of more than one
                rank, the estimate is summed over the ranks (a collective: every rank must call
                it; the local state is not modified). ``local=True`` reads this rank's shard only.
        """
        state, values = self._read(local)
        meta = {
            "fim_type": self.fim_type.value,
            "reduction": self.reduction,
            "ema": self.ema,
            "count": state.count,
            "steps": state.steps,
            "names": list(self.names),
            "options": self.opts.to_dict(),
        }
        return DiagFIM(dict(zip(self.names, values)), meta)

    def _read(self, local: bool = False) -> tuple[State, list[torch.Tensor]]:
        """The state :meth:`result` reads (summed over the ranks unless ``local``) and its
        estimate, one new tensor per parameter of :attr:`names` (``get_diag_fim`` reads this)."""
        state = self.state
        if not local and distributed.active(self.opts.distributed, self.opts.process_group):
            state = distributed.reduced_state(self.state, self.opts.process_group)
        return state, state.read()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: state, seed, offset, type and options."""
        return {
            "fim_type": self.fim_type.value,
            "seed": self._seed,
            "offset": self.offset,
            "options": self.opts.to_dict(),
            "state": self.state.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same model structure, type, reduction and ema), all or
        nothing: a key missing, values of other shapes or not finite are refused first."""
        if FIMType.parse(sd["fim_type"]) != self.fim_type:
            raise ValueError(
                f"state_dict: saved for fim_type={sd['fim_type']!r}; this estimator is "
                f"{self.fim_type.value!r}"
            )
        seed, offset = _stream_of(sd)  # checked before the state is replaced
        self.state.load_state_dict(sd["state"])
        self._reset = self._restarted = False
        self.seed, self.offset = seed, offset


def _stream_of(sd: dict[str, Any]) -> tuple[int, int]:
    """``(seed, offset)`` of a :meth:`DiagFisher.state_dict`, refused with the key named."""
    for k in ("seed", "offset", "state"):
        if k not in sd:
            raise ValueError(f"state_dict: not a DiagFisher.state_dict(); missing {k!r}")
    return counter_of(sd, "seed"), counter_of(sd, "offset")


# a context manager doing nothing (reusable, reentrant)
_NOTHING = contextlib.nullcontext()


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@autograd_on
def diag_fisher(
    model: torch.nn.Module,
    loader: Iterable,
    fim_type: FIMType | str = "hutchinson",
    reduction: str = "sum",
    ema: float | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    **opts: Any,
) -> DiagFIM:
    """One-shot estimate over a data loader.

    Args:
        model: the network.
        loader: an iterable of batches (one batch is refused: pass ``[batch]``).
        fim_type, reduction, ema, **opts: as for :class:`DiagFisher`.
        progress: show a tqdm progress bar.
        max_batches: stop after this many batches.

    Returns:
        The :class:`DiagFIM` after the last batch.
    """
    check_loader(loader)
    est = DiagFisher(model, fim_type, reduction=reduction, ema=ema, **opts)
    it: Iterable = loader
    if progress:
        from tqdm.auto import tqdm

        total = None
        if hasattr(loader, "__len__"):
            total = len(loader)  # type: ignore[arg-type]
            if max_batches is not None:
                total = min(total, max_batches)
        it = tqdm(loader, total=total, desc=f"fimfast {est.fim_type.value}", unit="batch")
    for i, b in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        est.step(b)
    return est.result()
