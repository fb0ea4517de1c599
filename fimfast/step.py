"""The contract between the estimator object and its three estimate paths.

:class:`fimfast.estimator.DiagFisher` runs the model's forward, then hands one :class:`Step` to
the path that fits its type and options; every path has the same signature,

    ``estimate(step: Step, cap) -> list[torch.Tensor]``

and returns this batch's estimate, one fresh tensor per parameter of ``step.params`` (shaped like
it, in ``step.dtypes``; zeros for a parameter the logits do not depend on; a sparse COO tensor
for a table of which only some rows got an estimate, see :class:`fimfast.state.Sums`):

- :func:`fimfast.hutchinson.estimate` (HUTCHINSON family; ``cap`` is ``None``),
- :func:`fimfast.lm_head.estimate` (HUTCHINSON family with the ``lm_head`` option; ``cap`` is
  the head's :class:`fimfast.lm_head.HeadCapture`),
- :meth:`fimfast.persample.Engine.estimate` (EXACT, EMPIRICAL, MONTE_CARLO; ``cap`` is the
  forward's :class:`fimfast.hooks.Capture`, or ``None`` for the generic path only).

The estimator then folds the tensors into its state. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fimfast.types import FIMType, Options

if TYPE_CHECKING:
    from fimfast.batch import Rows

__all__ = ["Step"]


@dataclass(frozen=True)
class Step:
    """What an estimate path reads of one step.

    Attributes:
        rows: the valid rows of the batch (:class:`fimfast.batch.Rows`), logits attached to the
            graph of the forward.
        params: the trainable parameters, in the order of the result.
        fim_type: the estimator's type.
        opts: validated options.
        seed: the generator seed of the estimator.
        offset: the first counter of this step (a step uses
            :func:`fimfast.likelihoods.counters_used` counters from it).
        dtypes: the dtype of each parameter's estimate (float32, or float64 for float64
            parameters; :func:`fimfast.dtypes.compute_dtype`).
        retain_graph: keep the graph of the logits usable after the estimate (``train_step``
            back-propagates the loss through it afterwards); ``False`` lets the last backward
            free its buffers as it goes.
        names: parameter names, for log lines (``None``: indices).
    """

    rows: Rows
    params: list[torch.Tensor]
    fim_type: FIMType
    opts: Options
    seed: int
    offset: int
    dtypes: list[torch.dtype]
    retain_graph: bool = False
    names: list[str] | None = None

    def zeros(self, i: int) -> torch.Tensor:
        """A zero estimate for parameter ``i`` (its shape and device, dtype ``dtypes[i]``)."""
        p = self.params[i]
        return torch.zeros(p.shape, dtype=self.dtypes[i], device=p.device)

    def filled(self, acc: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """``acc`` with zeros for the parameters nothing was added to."""
        return [a if a is not None else self.zeros(i) for i, a in enumerate(acc)]
