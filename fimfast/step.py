"""The contract between the estimator object and its three estimate paths.

:class:`fimfast.estimator.DiagFisher` runs the model's forward, then hands one :class:`Step` to
the path that fits its type and options; every path has the same signature,

    ``estimate(step: Step, cap) -> list[torch.Tensor]``

and returns this batch's estimate, one fresh tensor per parameter of ``step.params`` (shaped like
it, in ``step.dtypes``; zeros for a parameter the logits do not depend on; a sparse COO tensor
for a table of which only some rows got an estimate, see :class:`fimfast.batch_sums.Sums`), or,
when the step allows it (``Step.defer_square``), the same estimate as :class:`Squares` still to
be squared, or as the :class:`fimfast.batch_sums.Sums` that holds it with squared products and
table rows still to be added (:meth:`fimfast.batch_sums.Sums.fold_into`):

- :func:`fimfast.hutchinson.estimate` (HUTCHINSON family; ``cap`` is ``None``),
- :func:`fimfast.lm_head.estimate` (HUTCHINSON family with the ``lm_head`` option; ``cap`` is
  the head's :class:`fimfast.lm_head.HeadCapture`),
- :meth:`fimfast.persample.Engine.estimate` (EXACT, EMPIRICAL, MONTE_CARLO; ``cap`` is the
  forward's :class:`fimfast.hooks.Capture`, or ``None`` for the generic path only).

The estimator then folds the tensors into its state. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fimfast.known_finite import square_reported
from fimfast.sparse_tables import row_squares
from fimfast.types import FIMType, Options

if TYPE_CHECKING:
    from fimfast.batch import Rows

__all__ = ["Squares", "Step"]


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
        defer_square: the caller folds a :class:`Squares` result into its state itself (the
            estimator object does; any other caller gets plain tensors).
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
    defer_square: bool = False

    def zeros(self, i: int) -> torch.Tensor:
        """A zero estimate for parameter ``i`` (its shape and device, dtype ``dtypes[i]``)."""
        p = self.params[i]
        return torch.zeros(p.shape, dtype=self.dtypes[i], device=p.device)

    def filled(self, acc: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """``acc`` with zeros for the parameters nothing was added to."""
        return [a if a is not None else self.zeros(i) for i, a in enumerate(acc)]


class Squares:
    """A batch estimate whose last operation, the square, is left to the consumer.

    The estimate of parameter ``i`` is ``scale * factors[i]**2`` (zeros where ``factors[i]`` is
    ``None``). A state that already holds a sum folds it in with one fused pass,
    ``s += scale * g**2`` (:func:`fimfast.ops.accumulate_`), instead of squaring into a temporary
    and adding that (two passes over every parameter; docs/architecture.md).

    Attributes:
        factors: one tensor per parameter, shaped like it (any floating dtype; a sparse COO
            gradient of a lookup table, :mod:`fimfast.sparse_tables`), or ``None``.
        owned: ``owned[i]`` says ``factors[i]`` is fresh, contiguous, in ``dtypes[i]`` and shares
            storage with nothing else, so :meth:`squares` may square it in place. May be given as
            a function returning that list, called on first use (a state that already holds a sum
            folds the factors in without asking).
        dtypes: the estimate's dtype per parameter.
        scale: multiplier of the squares.
        backend: the kernel backend option of the step (:func:`fimfast.ops.accumulate_`).
    """

    __slots__ = ("factors", "_owned", "dtypes", "scale", "backend", "known")

    def __init__(
        self,
        factors: list[torch.Tensor | None],
        owned: list[bool] | Callable[[], list[bool]],
        dtypes: list[torch.dtype],
        scale: float = 1.0,
        backend: str | None = None,
    ):
        if not callable(owned):
            owned = list(owned)
        if len(factors) != len(dtypes) or (not callable(owned) and len(owned) != len(dtypes)):
            n = "?" if callable(owned) else len(owned)
            raise ValueError(
                f"factors, owned and dtypes differ in length: {len(factors)}, {n}, {len(dtypes)}"
            )
        self.factors, self._owned, self.dtypes = list(factors), owned, list(dtypes)
        self.scale, self.backend = float(scale), backend
        self.known: list[bool] | None = None  # set by squares()

    @property
    def owned(self) -> list[bool]:
        """The ``owned`` flags (computed now if they were given as a function)."""
        if callable(self._owned):
            owned = list(self._owned())
            if len(owned) != len(self.factors):
                raise ValueError(
                    f"owned gave {len(owned)} flags for {len(self.factors)} factors"
                )
            self._owned = owned
        return self._owned

    def squares(
        self, shapes: list[tuple[int, ...]] | None = None, devices: list | None = None
    ) -> list[torch.Tensor]:
        """The estimate as fresh tensors (owned factors are squared in place and returned);
        :attr:`known` then says, per tensor, whether it is known finite (a zero estimate is; a
        square written by torch's kernel or a table's rows are not known).

        ``shapes`` and ``devices`` place the zeros of ``None`` factors; without them every factor
        must be set."""
        out: list[torch.Tensor | None] = []
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (g, own, dt) in enumerate(zip(self.factors, self.owned, self.dtypes)):
            if g is None or g.layout != torch.strided:
                if shapes is None or devices is None:
                    raise ValueError(
                        f"factors[{i}] is None or sparse and no shapes/devices were given"
                    )
                if g is not None:  # a row-sparse table gradient: its squares at its rows
                    rows[i] = row_squares(g, dt)
                out.append(None)
            else:
                out.append(g if own else g.detach().to(dt, copy=True).contiguous())
        live = [t for t in out if t is not None]
        # the extension's loop reports whether each square is finite (fimfast.known_finite)
        told = square_reported(live, self.scale) if live else []
        if told is None:  # one foreach launch for every square
            torch._foreach_mul_(live, live)
            if self.scale != 1.0:
                torch._foreach_mul_(live, self.scale)
        told = iter(told or [False] * len(live))
        self.known = [next(told) if t is not None else i not in rows for i, t in enumerate(out)]
        for i, t in enumerate(out):
            if t is None:
                out[i] = torch.zeros(shapes[i], dtype=self.dtypes[i], device=devices[i])
                if i in rows:
                    r, sq = rows[i]
                    out[i].index_add_(0, r, sq, alpha=self.scale)
        return out
