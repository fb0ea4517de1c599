"""Which values of a state are known finite, so that a read checks only the others.

A read of an estimate refuses a NaN/Inf (:meth:`fimfast.state.State.read`); checking every
value costs one pass over the state (535k floats on a 784-512-256-10 MLP: about 0.1 ms, 3% of
its step), paid per batch by the seed API's cycle ``zero_diag_fim`` + ``diag_fim_step`` +
``get_diag_fim``. The passes that write a first estimate can tell the same at almost no cost,
and report it per value:

- the squares of a one-probe HUTCHINSON step's gradients (:meth:`fimfast.step.Squares.squares`)
  by the extension's ``square_finite`` (csrc/cpu/squares_finite.cpp), whose loop knows whether
  each square it writes is finite;
- the lanes of a prepared EMPIRICAL or one-draw MONTE_CARLO step
  (:meth:`fimfast.persample.lanes.Lanes.tensors`) by the extension's ``form_lanes``
  (csrc/form_lanes.cpp), which bounds every product by the largest squares of its operands.

A record holds, per value, the tensor and its version counter when it was known finite
(:func:`record`); a value replaced since, or written in place by anything (its version moves),
is unknown again (:func:`unknown`). The state drops its record at every commit that does not
report, so a kernel writing without moving the version (the extension's ``accumulate``) is never
trusted; a read that checked a value records it.
"""

from __future__ import annotations

import torch

from fimfast import _ext

__all__ = ["formed_lanes", "record", "square_reported", "unknown"]


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter, ``None`` for an inference tensor (it keeps none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def record(values: list[torch.Tensor], known: list[bool] | None) -> list | None:
    """The record of ``values`` whose ``known[i]`` says it is finite (``None``: nothing known)."""
    if known is None or len(known) != len(values):
        return None
    return [(v, ver) if k and (ver := _version(v)) is not None else None
            for v, k in zip(values, known)]


def unknown(values: list[torch.Tensor], rec: list | None) -> list[int]:
    """The indices of ``values`` that ``rec`` does not vouch for: every one without a record,
    else those replaced or written since it was made."""
    if rec is None or len(rec) != len(values):
        return list(range(len(values)))
    return [i for i, (v, r) in enumerate(zip(values, rec))
            if r is None or r[0] is not v or _version(v) != r[1]]


def square_reported(tensors: list[torch.Tensor], scale: float) -> list[bool] | None:
    """``t = t * t * scale`` in place for every tensor, as ``torch._foreach_mul_`` (bit for bit),
    by the extension's ``square_finite`` with whether each result is finite; ``None``, with
    nothing written, without the extension or where it declines (then the caller squares)."""
    fn = _HOST[0] if _HOST else _host()[0]
    return None if fn is None else fn(tensors, float(scale))


def formed_lanes(values: list[torch.Tensor], entries: tuple) -> list[bool] | None:
    """The kept lanes ``entries`` (:class:`fimfast.persample.lanes.Lanes`) formed into the fresh
    ``values`` by the extension's ``form_lanes``, with whether each value is known finite;
    ``None``, with nothing written, without the extension or where it declines."""
    fn = _HOST[1] if _HOST else _host()[1]
    return None if fn is None else fn(values, *entries)


def _host() -> list:
    """``[square_finite, form_lanes]`` of the extension (``None`` where missing), looked up
    once and kept in :data:`_HOST`."""
    _HOST[:] = [_ext.host_function("square_finite"), _ext.host_function("form_lanes")]
    return _HOST


_HOST: list = []
