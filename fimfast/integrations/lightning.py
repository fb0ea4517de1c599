"""Lightning integration: a callback that accumulates a Fisher diagonal and saves it.

Works with ``lightning`` (``lightning.pytorch``) or the standalone ``pytorch_lightning`` package,
whichever is installed (``lightning`` first). Unlike the Hugging Face ``Trainer``, Lightning hands
callbacks the training batch, so:

* ``when="step"``: every ``every_n_steps`` training batches, that very batch is folded in (after
  the optimizer step, at the updated parameters); ``ema=beta`` follows the recent parameters.
* ``when="end"``: one pass over ``dataloader`` (default: the trainer's training dataloader) at the
  final parameters, at most ``max_batches`` batches.
* ``fim_type="adam"``: the free estimate from the first optimizer's ``exp_avg_sq`` at the end
  (:func:`fimfast.from_optimizer`; ``batch_size`` defaults to the rows of the last training
  batch x ``accumulate_grad_batches`` x world size; it is not the Fisher, see
  :mod:`fimfast.free`).

The LightningModule must return logits when called on a batch's inputs (``module(x)`` for
``(x, y)`` batches, ``module(**batch)`` for mappings); otherwise pass ``forward_fn=lambda module,
batch: ...`` (an option of :class:`fimfast.DiagFisher`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

try:  # the unified package first, then the standalone one
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning.callbacks import Callback

import torch

from fimfast.diagfim import DiagFIM
from fimfast.integrations._common import Accumulator

__all__ = ["FisherCallback"]


class FisherCallback(Callback):
    """Estimate a Fisher diagonal during or after ``Trainer.fit`` and save it.

    Args:
        fim_type: a fimfast type (``"exact"``, ``"empirical"``, ``"hutchinson"``, ...) or
            ``"adam"``.
        when: ``"step"`` or ``"end"``.
        dataloader: batches for ``when="end"`` (default: the trainer's training dataloader).
        every_n_steps: with ``when="step"``, use every this many training batches.
        max_batches: with ``when="end"``, at most this many batches.
        reduction, ema: as for :class:`fimfast.DiagFisher` (``reduction="mean"`` by default).
        save_path: where to write the Fisher; default ``<default_root_dir>/fisher.safetensors``;
            ``False`` keeps it in memory only.
        revision: recorded as ``model_revision``.
        batch_size: ``B`` for ``fim_type="adam"`` (inferred when ``None``).
        **opts: options of :class:`fimfast.DiagFisher`.

    After ``fit``, ``callback.fisher`` holds the :class:`~fimfast.DiagFIM`.
    """

    def __init__(
        self,
        fim_type: str = "exact",
        when: str = "end",
        dataloader: Iterable | None = None,
        every_n_steps: int = 1,
        max_batches: int | None = None,
        reduction: str = "mean",
        ema: float | None = None,
        save_path: str | os.PathLike | bool | None = None,
        revision: str | None = None,
        batch_size: int | None = None,
        **opts: Any,
    ):
        super().__init__()
        self._acc = Accumulator(
            fim_type, when, every_n_steps, max_batches, reduction, ema,
            None if save_path is False else save_path, revision, opts,
        )  # fmt: skip
        self._no_save = save_path is False
        self.dataloader = dataloader
        self.batch_size = batch_size
        self._seen = 0
        self._last_rows: int | None = None

    @property
    def fisher(self) -> DiagFIM | None:
        """The estimate after ``fit`` (``None`` before)."""
        return self._acc.fisher

    @property
    def estimator(self):
        """The :class:`fimfast.DiagFisher` (``None`` before the first batch or for ``"adam"``)."""
        return self._acc.estimator

    def on_train_start(self, trainer, pl_module):
        self._acc.begin()
        self._seen, self._last_rows = 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        self._last_rows = _rows(batch)
        acc = self._acc
        if acc.when == "step" and self._seen % acc.every_n_steps == 0:
            acc.step(pl_module, batch)

    def on_train_end(self, trainer, pl_module):
        acc = self._acc
        if acc.when == "end" and acc.fim_type != "adam":
            loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
            if loader is None:
                raise ValueError("FisherCallback: no dataloader given and the trainer has none")
            acc.run(pl_module, loader)
        bs = self.batch_size
        if bs is None and self._last_rows is not None:
            bs = self._last_rows * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            bs *= int(getattr(trainer, "world_size", 1) or 1)
        opt = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else None
        acc.finish(
            pl_module,
            optimizer=opt,
            batch_size=bs,
            output_dir=None if self._no_save else trainer.default_root_dir,
            save=trainer.is_global_zero and not self._no_save,
        )


def _rows(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
    return None
