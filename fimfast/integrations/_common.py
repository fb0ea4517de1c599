"""What the framework callbacks share: when to estimate, with which estimator, and saving."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fimfast.diagfim import DiagFIM
from fimfast.estimator import DiagFisher
from fimfast.free import from_optimizer
from fimfast.merge import save_fisher

WHEN = ("step", "end")
ADAM = "adam"


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (tensor, tuple/list, mapping) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / compiled wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return model


class Accumulator:
    """One Fisher accumulated during or after training (see the callbacks' docstrings)."""

    def __init__(
        self,
        fim_type: str,
        when: str,
        every_n_steps: int,
        max_batches: int | None,
        reduction: str,
        ema: float | None,
        save_path: str | os.PathLike | None,
        revision: str | None,
        opts: dict[str, Any],
    ):
        if when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}; got {when!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps must be an integer >= 1; got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1; got {every_n_steps!r}")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be an integer >= 1 or None; got {max_batches!r}")
        if fim_type == ADAM and when != "end":
            raise ValueError("fim_type='adam' reads the optimizer at the end: use when='end'")
        self.fim_type = fim_type
        self.when = when
        self.every_n_steps = every_n_steps
        self.max_batches = max_batches
        self.reduction = reduction
        self.ema = ema
        self.save_path = save_path
        self.revision = revision
        self.opts = dict(opts)
        self.estimator: DiagFisher | None = None
        self.fisher: DiagFIM | None = None
        self._it: Iterator | None = None
        if fim_type != ADAM:  # validate the type and options now, not after hours of training
            from fimfast.types import FIMType, Options, check_ema, check_reduction

            FIMType.parse(fim_type)
            Options.from_dict(self.opts)
            check_reduction(reduction)
            check_ema(ema)

    def begin(self) -> None:
        """A training starts: forget the estimate of a previous one (a callback reused for the
        next task, possibly with another model, starts a new estimate)."""
        self.estimator, self.fisher, self._it = None, None, None

    def _est(self, model: nn.Module) -> DiagFisher:
        if self.estimator is not None and self.estimator.model is not model:
            raise ValueError("FisherCallback: the model changed during one training; the "
                             "estimate belongs to one model")
        if self.estimator is None:
            self.estimator = DiagFisher(
                model, self.fim_type, reduction=self.reduction, ema=self.ema, **self.opts
            )
        return self.estimator

    def _device(self, model: nn.Module) -> torch.device:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _next(self, loader: Iterable) -> Any:
        if self._it is None:
            self._it = iter(loader)
        try:
            return next(self._it)
        except StopIteration:  # cycle
            self._it = iter(loader)
            return next(self._it)

    def step(self, model: nn.Module, batch: Any) -> None:
        """Fold one batch into the estimate, with the model in eval mode (dropout off) for it."""
        model = unwrap(model)
        was = model.training
        model.eval()
        try:
            self._est(model).step(to_device(batch, self._device(model)))
        finally:
            model.train(was)

    def step_from(self, model: nn.Module, loader: Iterable) -> None:
        self.step(model, self._next(loader))

    def run(self, model: nn.Module, loader: Iterable) -> None:
        """One pass at the current parameters (a new estimate)."""
        self.estimator = None
        for i, batch in enumerate(loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            self.step(model, batch)

    def finish(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        batch_size: int | None = None,
        output_dir: str | None = None,
        save: bool = True,
    ) -> DiagFIM:
        """Read the estimate (a collective under torch.distributed: every rank calls this) and
        write it (where ``save``: rank 0 only) to ``save_path`` or
        ``output_dir/fisher.safetensors``."""
        model = unwrap(model)
        if self.fim_type == ADAM:
            if optimizer is None:
                raise ValueError("fim_type='adam' needs the optimizer; the trainer gave none")
            self.fisher = from_optimizer(optimizer, model, batch_size=batch_size)
        else:
            if self.estimator is None:
                raise RuntimeError(
                    "no batch reached the Fisher estimator: give a dataloader or train for at "
                    "least every_n_steps steps"
                )
            self.fisher = self.estimator.result()
        path = self.save_path
        if path is None and output_dir is not None:
            path = os.path.join(output_dir, "fisher.safetensors")
        if path and save:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_fisher(self.fisher, path, model=model, revision=self.revision)
            self.saved_path = str(path)
        return self.fisher
