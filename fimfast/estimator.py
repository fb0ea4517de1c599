"""DiagFisher: the object API. Orchestration only: batch -> factor -> engine -> state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch

from fimfast import batch as batchlib
from fimfast import hutchinson, likelihoods, persample
from fimfast.diagfim import DiagFIM
from fimfast.ops import registry
from fimfast.state import State
from fimfast.types import (
    FIMType,
    Options,
    check_ema,
    check_reduction,
    check_type_likelihood,
)

__all__ = ["DiagFisher", "diag_fisher", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters with ``requires_grad`` (tied weights once)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return [n for n, _ in named], [p for _, p in named]


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
            ``seed``, ``backend``, ``likelihood``, ...).

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
        check_type_likelihood(self.fim_type, self.opts.likelihood)
        registry.check_backend(self.opts.backend, _device_of(model))
        names, params = trainable_parameters(model)
        self.names = names
        self.state = State(names, params, self.reduction, self.ema)
        self.seed = self.opts.seed if self.opts.seed is not None else _default_seed()
        self.offset = 0
        self._persample = persample.Engine()

    # -- configuration ---------------------------------------------------------------------- #
    def set_options(self, opts: dict[str, Any] | None) -> None:
        """Replace the options (validated); a new ``seed`` restarts the random stream."""
        new = Options.from_dict(opts)
        check_type_likelihood(self.fim_type, new.likelihood)
        registry.check_backend(new.backend, _device_of(self.model))
        if new.seed is not None and new.seed != self.seed:
            self.seed, self.offset = new.seed, 0
        self.opts = new

    def reset(self) -> None:
        """Forget the accumulated state (the random stream continues)."""
        names, params = trainable_parameters(self.model)
        self.names = names
        self.state = State(names, params, self.reduction, self.ema)

    # -- steps -------------------------------------------------------------------------------- #
    def _params(self) -> list[torch.Tensor]:
        names, params = trainable_parameters(self.model)
        self.state.check_params(names, params)
        return params

    def _forward(self, batch: Any) -> tuple[Any, batchlib.Rows]:
        fwd = self.opts.forward_fn
        if fwd is None:
            inputs, labels, mask = batchlib.split(batch)  # clear errors for bad structure
        else:
            labels, mask = batchlib.labels_of(batch)
        try:
            if fwd is not None:
                output = fwd(self.model, batch)
            elif isinstance(inputs, dict):
                output = self.model(**inputs)
            else:
                output = self.model(inputs)
        except (TypeError, ValueError, RuntimeError, IndexError, AssertionError) as exc:
            raise _with_context(exc, "batch: the model's forward failed on this batch") from exc
        logits = batchlib.logits_of(output)
        need = self.fim_type == FIMType.EMPIRICAL
        rows = batchlib.rows(
            logits, labels, mask, self.opts.likelihood, self.opts.ignore_index, need
        )
        likelihoods.check_top_k(self.fim_type, self.opts, rows.flat.shape[1])
        return output, rows

    def _capture(self, params: list[torch.Tensor]):
        """Context of the forward: layer capture for the per-sample engine (removed on exit)."""
        if self.fim_type.is_per_sample:
            return self._persample.capture(self.model, params)
        return nullcontext()

    def _estimate(
        self, rows: batchlib.Rows, params: list[torch.Tensor], retain_graph: bool, cap=None
    ) -> list[torch.Tensor]:
        acc = self.state.temporaries()
        o = self.opts
        if not self.fim_type.is_per_sample:
            hutchinson.estimate(
                rows.flat,
                params,
                self.fim_type,
                o,
                self.seed,
                self.offset,
                acc,
                retain_graph=retain_graph,
            )
            return acc
        self._persample.estimate(
            rows, params, self.fim_type, o, self.seed, self.offset, acc, cap
        )
        return acc

    def _commit(self, acc: list[torch.Tensor], rows: batchlib.Rows) -> None:
        self.state.commit(acc, rows.count)
        R, C = rows.flat.shape
        self.offset += likelihoods.counters_used(self.opts.num_probes, R, C)

    def step(self, batch: Any) -> None:
        """Estimate on one batch and fold it into the state (all or nothing)."""
        params = self._params()
        with self._capture(params) as cap:
            _, rows = self._forward(batch)
        acc = self._estimate(rows, params, retain_graph=False, cap=cap)
        self._commit(acc, rows)

    def train_step(self, batch: Any, loss_fn: Callable | None = None) -> torch.Tensor:
        """One forward for both training gradients (added to ``.grad``) and the Fisher.

        The loss is ``loss_fn(logits, labels)`` (default: mean cross-entropy with
        ``ignore_index`` for categorical, ``BCEWithLogits`` for bernoulli, MSE for gaussian) over
        the valid rows. HUTCHINSON types reuse the training forward; per-sample types back-propagate
        their columns through the same graph.

        Returns:
            The loss, detached.
        """
        params = self._params()
        with self._capture(params) as cap:
            _, rows = self._forward(batch)
        if rows.labels is None:
            raise ValueError("batch: train_step needs labels; the batch has none")
        loss_fn = loss_fn or _default_loss(self.opts)
        loss = loss_fn(rows.flat, rows.labels)
        acc = self._estimate(rows, params, retain_graph=True, cap=cap)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        self._commit(acc, rows)
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)
        return loss.detach()

    # -- results ------------------------------------------------------------------------------ #
    def result(self) -> DiagFIM:
        """The current estimate as a :class:`DiagFIM` (raises before any step)."""
        values = self.state.read()
        meta = {
            "fim_type": self.fim_type.value,
            "reduction": self.reduction,
            "ema": self.ema,
            "count": self.state.count,
            "steps": self.state.steps,
            "names": list(self.names),
            "options": self.opts.to_dict(),
        }
        return DiagFIM(dict(zip(self.names, values)), meta)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: state, seed, offset, type and options."""
        return {
            "fim_type": self.fim_type.value,
            "seed": self.seed,
            "offset": self.offset,
            "options": self.opts.to_dict(),
            "state": self.state.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same model structure, type, reduction and ema)."""
        if FIMType.parse(sd["fim_type"]) != self.fim_type:
            raise ValueError(
                f"state_dict: saved for fim_type={sd['fim_type']!r}; this estimator is "
                f"{self.fim_type.value!r}"
            )
        self.state.load_state_dict(sd["state"])
        self.seed = int(sd["seed"])
        self.offset = int(sd["offset"])


def _with_context(exc: Exception, context: str) -> Exception:
    try:
        return type(exc)(f"{context} ({type(exc).__name__}: {exc})")
    except Exception:  # an exception class with a different constructor
        return exc


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _default_loss(opts: Options) -> Callable:
    if opts.likelihood == "categorical":
        return lambda z, y: torch.nn.functional.cross_entropy(z, y)
    if opts.likelihood == "bernoulli":
        return lambda z, y: torch.nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype))
    return lambda z, y: torch.nn.functional.mse_loss(z, y.to(z.dtype)) / (2 * opts.sigma2)


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
        loader: an iterable of batches.
        fim_type, reduction, ema, **opts: as for :class:`DiagFisher`.
        progress: show a tqdm progress bar.
        max_batches: stop after this many batches.

    Returns:
        The :class:`DiagFIM` after the last batch.
    """
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
