"""Accumulated state of one estimator: sums, counts, EMA, and its ``state_dict`` (docs/math.md §9).

A step computes its batch estimate into temporaries and calls :meth:`State.commit` only once
everything succeeded, so a failing step leaves the state bit-identical.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch

from fimfast import known_finite, ops
from fimfast.batch_sums import Sums
from fimfast.dtypes import compute_dtype
from fimfast.finite import all_finite
from fimfast.sparse_tables import row_squares
from fimfast.step import Squares


def _adoptable(new: list[torch.Tensor], shapes: list, dtypes: list, devices: list) -> list[bool]:
    """Which of ``new`` can become the values as they are: the state's shape, dtype and device,
    dense tensors that own their whole storage and share it with no other entry, none attached to
    a graph."""
    if len(new) != len(shapes):
        return [False] * len(new)
    ptrs = [
        b.untyped_storage().data_ptr() if b.layout == torch.strided else None for b in new
    ]
    uses = collections.Counter(ptrs)
    return [
        b.layout == torch.strided
        and uses[p] == 1
        and tuple(b.shape) == tuple(shape)
        and b.dtype == dt
        and b.device == dev
        and not b.requires_grad
        and b.is_contiguous()
        and b.untyped_storage().nbytes() == b.numel() * b.element_size()
        for b, p, shape, dt, dev in zip(new, ptrs, shapes, dtypes, devices)
    ]


def _dense_in(factors: list, dtypes: list[torch.dtype]) -> bool:
    """Whether every factor is set, dense and of the state's dtype (told by loops in C)."""
    try:
        return set(map(_LAYOUT, factors)) == _STRIDED and list(map(_DTYPE, factors)) == dtypes
    except AttributeError:  # a factor is None
        return False


_LAYOUT, _DTYPE, _STRIDED = attrgetter("layout"), attrgetter("dtype"), {torch.strided}


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to ``t``. On the CPU a copy-on-write clone (``torch._lazy_clone``): the
    data is copied at the first write to either tensor, so a state read and then reset
    (``zero_diag_fim`` + ``diag_fim_step`` + ``get_diag_fim`` per batch) never copies its values;
    elsewhere an ordinary clone (a kernel in the stream order of the writes around it, where a
    device allocator's copy-on-write copy is not)."""
    if t.is_cpu and _LAZY_CLONE is not None:  # (no device object made)
        return _LAZY_CLONE(t)
    return t.clone()


_LAZY_CLONE = getattr(torch, "_lazy_clone", None)


class State:
    """Per-parameter accumulators of one estimator.

    ``reduction="sum"`` keeps the sum over rows; ``"mean"`` keeps the sum and the row count and
    divides at read time, so the mean is exact over batches of different sizes. With ``ema=beta``
    each batch estimate ``B_t`` (sum or mean of the batch) enters ``m = beta m + (1 - beta) B_t``,
    read with Adam-style bias correction ``m / (1 - beta^t)``.
    """

    def __init__(
        self, names: list[str], params: list[torch.Tensor], reduction: str, ema: float | None
    ):
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self.dtypes = [compute_dtype(p.dtype) for p in params]
        self.reduction = reduction
        self.ema = ema
        self.devices = [p.device for p in params]
        # allocated on first use: a first commit adopts its batch estimate (see commit), so a
        # reset followed by one step never writes zeros
        self._values: list[torch.Tensor] | None = None
        self.count = 0  # rows (samples or tokens) seen
        self.steps = 0  # committed batches
        self._zero = True  # values are zeros (nothing committed or loaded)
        self._finite: list | None = None  # which values are known finite (known_finite.record)

    @property
    def values(self) -> list[torch.Tensor]:
        """The accumulators, one per parameter (zeros until something was committed)."""
        if self._values is None:
            self._values = [
                torch.zeros(s, dtype=d, device=dev)
                for s, d, dev in zip(self.shapes, self.dtypes, self._devices())
            ]
        return self._values

    @values.setter
    def values(self, vals: list[torch.Tensor]) -> None:
        self._values = list(vals)
        self._finite = None  # nothing known of new values until a kernel or a read tells

    def _devices(self) -> list[torch.device]:
        # a State unpickled from a version without lazy values has them already
        return getattr(self, "devices", None) or [v.device for v in self._values]

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("_finite", None)  # a copy's values are new tensors: nothing known of them
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        if "values" in d:  # pickled by a version that stored the list itself
            d["_values"] = d.pop("values")
        d.pop("_finite", None)
        self.__dict__.update(d)

    def sums(self) -> Sums:
        """Empty slots shaped like the state, for one batch estimate (see :class:`Sums`)."""
        return Sums(self.shapes, self.dtypes, self._devices())

    def check_params(self, names: list[str], params: list[torch.Tensor]) -> None:
        """Raise when the model's trainable parameters differ from those the state was made for."""
        # a torch.Size equals the tuple of its sizes: no tuple per parameter in the usual case
        if names == self.names and [p.shape for p in params] == self.shapes:
            return
        shapes = [tuple(p.shape) for p in params]
        if names != self.names or shapes != self.shapes:
            added = sorted(set(names) - set(self.names))
            removed = sorted(set(self.names) - set(names))
            changed = sorted(
                n
                for n, s in zip(names, shapes)
                if n in self.names and self.shapes[self.names.index(n)] != s
            )
            what = (f"added {added}, removed {removed}, reshaped {changed}"
                    if added or removed or changed else
                    "the same parameters in another order (a forward that deletes and registers "
                    "a parameter again moves it to the end of named_parameters())")
            raise ValueError(
                "model: its trainable parameters changed since the state was created "
                f"(zero_diag_fim / DiagFisher): {what}; call zero_diag_fim (or reset()) to start "
                "a new estimate"
            )

    def commit(
        self, batch_estimate: list[torch.Tensor] | Squares | Sums, count: int, owned: bool = False
    ) -> None:
        """Fold one batch estimate (a sum over ``count`` rows) into the state.

        ``owned=True`` says the tensors are fresh and referenced by nothing else: the first commit
        into a state that is still all zeros (and keeps a sum) then takes them as its values instead
        of adding them to zeros (one pass over every parameter less: 0.25 ms of a 6 ms step on a
        535k-parameter MLP). A :class:`fimfast.step.Squares` estimate is squared and added in one
        fused pass (torch's multi-tensor ``addcmul``, or :func:`fimfast.ops.accumulate_` for the
        exponential average and low-precision gradients); a sparse table gradient at its rows.
        A :class:`Sums` (always owned) adds its kept products (:meth:`Sums.defer`) by one
        ``addmm_`` each and its rows by ``index_add_`` into a sum that is not all zeros
        (:meth:`Sums.fold_into`).
        """
        # getattr: a State unpickled from a version without the flag never adopts
        pristine = getattr(self, "_zero", False)
        self._finite = known = None  # written below: known again only where a kernel tells
        if isinstance(batch_estimate, Sums):
            owned = True
            if self.ema is None and not pristine:
                batch_estimate.fold_into(self.values)
                self._zero = False
                self.count += int(count)
                self.steps += 1
                return
            sums, batch_estimate = batch_estimate, batch_estimate.tensors()
            known = getattr(sums, "known", None)  # a Lanes the extension formed
        if isinstance(batch_estimate, Squares):
            if self.ema is None and pristine:
                self.values = batch_estimate.squares(self.shapes, self._devices())
                known = batch_estimate.known
            else:
                self._fold_squares(batch_estimate, count)
        elif self.ema is None and owned and pristine:
            self.values = self._adopted(batch_estimate)
        elif self.ema is None:
            torch._foreach_add_(self.values, batch_estimate)  # sparse entries: at their rows
        else:
            est = [b.to_dense() if b.layout != torch.strided else b for b in batch_estimate]
            if self.reduction == "mean":
                est = torch._foreach_div(est, float(count))
            torch._foreach_lerp_(self.values, est, 1.0 - self.ema)
        if self.ema is None and pristine:  # the values are the estimate: what it told of it
            self._finite = known_finite.record(self.values, known)
        self._zero = False
        self.count += int(count)
        self.steps += 1

    def add_squares(
        self, factors: list[torch.Tensor | None], count: int, fold: Callable | None = None
    ) -> bool:
        """Commit the batch estimate ``sum_i factors[i]**2`` (a one-probe step's gradients, over
        ``count`` rows) in one multi-tensor ``addcmul``, when that is all :meth:`commit` of their
        :class:`Squares` would do: a sum (no EMA) that already holds one, every factor dense in
        the state's dtype. ``False``, with nothing changed, otherwise. ``fold`` (the extension's
        ``fold_squares``, csrc/cpu/fold_squares.cpp) runs the same arithmetic, bit for bit, on
        CPU tensors, or answers ``False`` with nothing written and ``addcmul`` runs."""
        pristine = getattr(self, "_zero", False)  # as commit reads it
        if self.ema is not None or pristine or not _dense_in(factors, self.dtypes):
            return False
        self._finite = None
        if fold is None or not fold(self.values, factors):
            torch._foreach_addcmul_(self.values, factors, factors, value=1.0)
        self.count += int(count)
        self.steps += 1
        return True

    def _adopted(self, est: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first estimate of a state that keeps a sum, as its values: each entry that can be
        taken as it is (:func:`_adoptable`), the others (sparse rows, shared storage) added to
        zeros."""
        ok = _adoptable(est, self.shapes, self.dtypes, self._devices())
        if len(ok) != len(self.shapes):
            raise ValueError(
                f"batch estimate has {len(est)} tensors; the state has {len(self.shapes)}"
            )
        return [
            b if take else torch.zeros(s, dtype=d, device=dev).add_(b)
            for b, take, s, d, dev in zip(est, ok, self.shapes, self.dtypes, self._devices())
        ]

    def _fold_squares(self, sq: Squares, count: int) -> None:
        """``s += scale g**2`` (or the EMA update with it) for every set factor, in one pass."""
        if self.ema is None and _dense_in(sq.factors, self.dtypes):  # the usual sum: one call
            g = sq.factors
            torch._foreach_addcmul_(self.values, g, g, value=sq.scale)
            return
        scale, mode, beta = sq.scale, "sum", 0.0
        if self.ema is not None:
            mode, beta = "ema", self.ema
            if self.reduction == "mean":
                scale /= float(count)
        values = self.values
        factors = list(sq.factors)
        for i, g in enumerate(factors):
            if g is not None and g.layout != torch.strided:
                if mode == "sum":  # a row-sparse table gradient: added at its rows only
                    rows, g2 = row_squares(g, values[i].dtype)
                    values[i].index_add_(0, rows, g2, alpha=scale)
                    factors[i] = None
                else:  # an average decays every row
                    factors[i] = g.to_dense()
        live = [i for i, g in enumerate(factors) if g is not None]
        if mode == "ema" and len(live) < len(values):  # a zero estimate still decays the average
            dead = set(range(len(values))) - set(live)
            torch._foreach_mul_([values[i] for i in sorted(dead)], beta)
        if mode == "sum":  # same dtype: torch's fused multi-tensor addcmul is this pass
            same = [i for i in live if factors[i].dtype == values[i].dtype]
            if same:
                g = [factors[i] for i in same]
                torch._foreach_addcmul_([values[i] for i in same], g, g, value=scale)
            live = [i for i in live if factors[i].dtype != values[i].dtype]
        by_device: dict[torch.device, list[int]] = {}
        for i in live:  # squares in the state's dtype; one device per kernel call
            by_device.setdefault(values[i].device, []).append(i)
        for idx in by_device.values():
            ops.accumulate_(
                [values[i] for i in idx], [factors[i] for i in idx], mode, beta, scale,
                backend=sq.backend,
            )

    def read(self) -> list[torch.Tensor]:
        """The current estimate, one new tensor per parameter."""
        if self.steps == 0:
            raise RuntimeError(
                "no step has been taken: call diag_fim_step / DiagFisher.step before reading"
            )
        values = self.values
        if self.ema is not None:
            out = torch._foreach_div(values, 1.0 - self.ema**self.steps)
        elif self.reduction == "mean":
            out = torch._foreach_div(values, float(self.count))
        else:
            out = [_copy(v) for v in values]
        # a value known finite reads finite with a sum, or a mean over count >= 1 rows (x / c,
        # c >= 1, cannot overflow); an average's bias correction divides by 1 - beta^t <= 1
        rec = getattr(self, "_finite", None)
        trusted = self.ema is None and (self.reduction == "sum" or self.count >= 1)
        todo = known_finite.unknown(values, rec if trusted else None)
        if todo:
            _check_finite_read([self.names[i] for i in todo], [out[i] for i in todo])
            if trusted:  # out finite: the values are (a division by c >= 1 keeps an Inf/NaN)
                self._finite = known_finite.record(values, [True] * len(values))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters, enough to resume accumulation."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "reduction": self.reduction,
            "ema": self.ema,
            "count": self.count,
            "steps": self.steps,
            "values": {n: v.clone() for n, v in zip(self.names, self.values)},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (names and shapes must match). Everything is checked
        before anything is assigned: a refused state leaves this one as it was."""
        missing = [k for k in ("names", "shapes", "reduction", "ema", "count", "steps", "values")
                   if not isinstance(sd, dict) or k not in sd]
        if missing:
            raise ValueError(f"state_dict: not a state of DiagFisher.state_dict(); missing "
                             f"{missing}")
        if list(sd["names"]) != self.names or [tuple(s) for s in sd["shapes"]] != self.shapes:
            raise ValueError(
                "state_dict: parameter names/shapes differ from this estimator's "
                f"({len(sd['names'])} saved vs {len(self.names)} here)"
            )
        if sd["reduction"] != self.reduction or sd["ema"] != self.ema:
            raise ValueError(
                f"state_dict: saved with reduction={sd['reduction']!r}, ema={sd['ema']!r}; this "
                f"estimator has reduction={self.reduction!r}, ema={self.ema!r}"
            )
        values = [_loaded(sd["values"], n, s, v) for n, s, v in
                  zip(self.names, self.shapes, self.values)]
        count, steps = counter_of(sd, "count"), counter_of(sd, "steps")
        self.values = values
        self._zero = False
        self.count = count
        self.steps = steps


def _check_finite_read(names: list[str], values: list[torch.Tensor]) -> None:
    """Refuse to hand out an estimate with a NaN or an infinite entry (one host read): the logits
    of a step can be finite while a layer's inputs overflow float32 in its squares (``0 * inf``
    in front of a saturated activation), and a NaN would otherwise reach every later read."""
    if all_finite(values):
        return
    bad = [n for n, v in zip(names, values) if not all_finite([v])]
    raise ValueError(f"the accumulated estimate of {bad[:3]} has non-finite entries (NaN/Inf): a "
                     "step's layer inputs or gradients overflowed their dtype (float32: squares "
                     "above 3e38); reset() and scale the inputs, or use a float64 model")


def _loaded(saved: Any, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """``saved[name]`` as a tensor like ``like``, refused unless of ``shape`` and finite."""
    v = saved.get(name) if isinstance(saved, dict) else None
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(shape):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"state_dict['values'][{name!r}] must be a tensor of shape "
                         f"{tuple(shape)}; got {got}")
    if not all_finite([v]):
        raise ValueError(f"state_dict['values'][{name!r}] has non-finite entries (NaN/Inf)")
    return v.to(device=like.device, dtype=like.dtype)


def counter_of(sd: dict[str, Any], key: str) -> int:
    """``sd[key]``, refused unless an integer ``>= 0`` (``ValueError`` naming the key)."""
    v = sd[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"state_dict[{key!r}] must be an integer >= 0; got {v!r}")
    return v
