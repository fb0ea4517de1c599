"""Hugging Face ``transformers`` integration: a Fisher callback and an EWC-regularised Trainer.

``FisherCallback`` accumulates any fimfast estimator while a ``Trainer`` trains, or once training
ends, and saves the result as a Fisher file (:func:`fimfast.save_fisher`, with the model's
fingerprint). ``Trainer`` callbacks do not receive the training batch, so:

* ``when="step"``: every ``every_n_steps`` optimizer steps the callback draws the next batch of its
  own ``dataloader`` (default: the trainer's training dataloader, iterated separately, so the
  batches are the training distribution but not the very batches of the optimizer steps) and folds
  it in at the current parameters. With ``ema=beta`` the estimate follows the recent parameters.
* ``when="end"``: at the end of training, one pass over ``dataloader`` (default: the training
  dataloader), at most ``max_batches`` batches, at the final parameters. This is the Fisher EWC,
  merging and Laplace need.
* ``fim_type="adam"``: at the end, the free ``fimfast.from_optimizer`` estimate from the
  trainer's Adam/AdamW (``B`` = per-device batch x gradient accumulation x world size; see
  :mod:`fimfast.free`: it is not the Fisher).

The estimator runs with the model in eval mode (dropout off) and restores the mode afterwards;
batches go to the model's device; ``labels`` are taken out of mapping batches as fimfast always
does (only EMPIRICAL uses them).

``EWCTrainer`` is a ``Trainer`` whose loss is the model's loss plus ``ewc()``
(:class:`fimfast.EWC`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from transformers import Trainer, TrainerCallback

from fimfast.diagfim import DiagFIM
from fimfast.ewc import EWC
from fimfast.integrations._common import Accumulator

__all__ = ["EWCTrainer", "FisherCallback"]


class FisherCallback(TrainerCallback):
    """Estimate a Fisher diagonal during or after ``Trainer.train`` and save it.

    Args:
        fim_type: a fimfast type (``"exact"``, ``"empirical"``, ``"monte_carlo"``,
            ``"hutchinson"``, ...) or ``"adam"`` (the optimizer's ``exp_avg_sq``).
        when: ``"step"`` or ``"end"`` (see the module docstring).
        dataloader: batches to estimate on (default: the trainer's training dataloader).
        every_n_steps: with ``when="step"``, estimate on one batch every this many steps.
        max_batches: with ``when="end"``, at most this many batches.
        reduction: ``"mean"`` (per sample, the default) or ``"sum"``.
        ema: ``None`` or a decay for an exponential moving average of batch estimates.
        save_path: where to write the Fisher; default ``<output_dir>/fisher.safetensors``;
            ``False`` to keep it in memory only (``callback.fisher``).
        revision: recorded as ``model_revision`` in the file.
        **opts: options of :class:`fimfast.DiagFisher` (``num_probes``, ``seed``, ...).

    After training, ``callback.fisher`` holds the :class:`~fimfast.DiagFIM`.
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
        **opts: Any,
    ):
        self._acc = Accumulator(
            fim_type, when, every_n_steps, max_batches, reduction, ema,
            None if save_path is False else save_path, revision, opts,
        )  # fmt: skip
        self._no_save = save_path is False
        self.dataloader = dataloader

    @property
    def fisher(self) -> DiagFIM | None:
        """The estimate after training (``None`` before)."""
        return self._acc.fisher

    @property
    def estimator(self):
        """The :class:`fimfast.DiagFisher` (``None`` before the first batch or for ``"adam"``)."""
        return self._acc.estimator

    def _loader(self, kwargs: dict[str, Any]) -> Iterable:
        loader = self.dataloader if self.dataloader is not None else kwargs.get("train_dataloader")
        if loader is None:
            raise ValueError("FisherCallback: no dataloader given and the trainer passed none")
        return loader

    def on_train_begin(self, args, state, control, **kwargs):
        self._acc.begin()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        acc = self._acc
        if acc.when == "step" and state.global_step % acc.every_n_steps == 0:
            acc.step_from(kwargs["model"], self._loader(kwargs))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        acc = self._acc
        model = kwargs["model"]
        if acc.when == "end" and acc.fim_type != "adam":
            acc.run(model, self._loader(kwargs))
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        batch *= max(1, getattr(args, "world_size", 1))
        acc.finish(
            model,
            optimizer=kwargs.get("optimizer"),
            batch_size=batch,
            output_dir=None if self._no_save else args.output_dir,
            save=state.is_world_process_zero and not self._no_save,
        )
        return control


class EWCTrainer(Trainer):
    """A ``Trainer`` that adds an EWC penalty to the model's loss.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        ewc: a :class:`fimfast.EWC` built on the same model (for example from the Fisher a
            :class:`FisherCallback` saved after the previous task:
            ``EWC(model, fimfast.load_fisher(path, model), lam=...)``).

    The logged loss includes the penalty.
    """

    def __init__(self, *args: Any, ewc: EWC, **kwargs: Any):
        if not isinstance(ewc, EWC):
            raise TypeError(f"ewc must be a fimfast.EWC; got {type(ewc).__name__}")
        super().__init__(*args, **kwargs)
        self.ewc = ewc

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        """The model's loss plus ``self.ewc()`` (read at the parameters of ``model``)."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = out if return_outputs else (out, None)
        from fimfast.integrations._common import unwrap

        loss = loss + self.ewc(unwrap(model)).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss
