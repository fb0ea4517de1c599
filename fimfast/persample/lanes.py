"""The squares of a prepared one-column step, folded into the state by the extension in one call.

A prepared EMPIRICAL or one-draw MONTE_CARLO step (:mod:`fimfast.persample.prepared`) forms, per
closed-form group of the logits layer and per lane of :func:`fimfast.persample.onecol.layout`,
the squares ``S = G**2`` of its output side, adds a bias's ``S.sum(0)`` to a :class:`Sums` slot
and keeps a weight's product ``S^T A**2`` for the state to add by ``addmm_``
(:meth:`Sums.defer`, :meth:`Sums.fold_into`): about twenty Python calls and a dozen operators
called from Python, each read cold after the step's backward. :class:`Lanes` is a :class:`Sums`
that can keep those lanes unformed instead (:meth:`Lanes.keep`) where every product would be kept
for the state anyway (the ``cpp`` backend folds, within the memory budget, every slot once, no
row block, CPU tensors, autocast off); the commit into a state that holds a sum already then
runs the extension's ``fold_lanes`` (csrc/fold_lanes.cpp): the same operators on the same
operands in one C++ call, every square formed before the first value is written; the first
estimate of a state (a reset one, as the seed API's cycle resets it every batch) is formed into
fresh values by its ``form_lanes`` (csrc/form_lanes.cpp), which also tells which values are
known finite (:mod:`fimfast.known_finite`). Anything else (no extension, an extension without
those functions, a case the extension declines) forms the lanes here by the Python code first
and goes on as a :class:`Sums`: the same numbers, bit for bit (tests/test_fold_lanes.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fimfast import _env, _ext
from fimfast.batch_sums import _ITEMSIZE, Sums
from fimfast.known_finite import formed_lanes

__all__ = ["Lanes"]


class Lanes(Sums):
    """A :class:`Sums` whose lanes may be kept unformed (see the module docstring).

    Attributes:
        kept: ``(entries, form)`` while the lanes are unformed: ``entries`` the arguments of
            ``fold_lanes`` after the values (``G``, ``A``, weight slots, bias slots,
            ``transposed``; ``-1`` and ``None`` for what an entry lacks), ``form()`` the Python
            code adding them into this :class:`Sums`; ``None`` once formed.
    """

    def __init__(self, shapes: list, dtypes: list[torch.dtype], devices: list[torch.device]):
        super().__init__(shapes, dtypes, devices)
        self.kept: tuple | None = None
        self.known: list[bool] | None = None  # set by tensors() where the extension formed them

    def keep(self, entries: tuple, form: Callable[[], None]) -> bool:
        """Keep the lanes ``entries`` unformed, ``form()`` forming them by the Python path when
        the extension does not (see :attr:`kept`); ``False``, keeping nothing, unless the Python
        path would keep every product for the state (:meth:`Sums.defer`) and the extension has
        ``fold_lanes``."""
        G, A, W, B, _ = entries
        if (not self.fold or self.slots.count(None) != len(self.slots) or self.products
                or self.rows or self.scales):
            return False
        if (_HOST[0] if _HOST else _host()) is None or torch.is_autocast_enabled("cpu"):
            return False
        taken: set = set()
        size = 0
        for g, a, w, b in zip(G, A, W, B):
            if not g.is_cpu or (w >= 0 and not a.is_cpu):
                return False
            for i in (w, b):
                if i >= 0:
                    if i in taken:  # two parts of one slot add up before the value
                        return False
                    taken.add(i)
            if w >= 0:
                dt = self.dtypes[w]
                size += (g.numel() + a.numel()) * (_ITEMSIZE.get(dt) or torch.finfo(dt).bits // 8)
        if self._budget is None:
            self._budget = _env.memory_budget_bytes()
        if size > self._budget:  # Sums.defer would form some products itself
            return False
        self.kept = (entries, form)
        return True

    def _formed(self) -> None:
        """Form the kept lanes by the Python path (nothing when none are kept)."""
        kept, self.kept = self.kept, None
        if kept is not None:
            kept[1]()

    def fold_into(self, values: list[torch.Tensor]) -> None:
        """:meth:`Sums.fold_into`, the kept lanes by the extension's one call where it takes
        them."""
        if self.kept is not None:
            fn = _HOST[0] if _HOST else _host()
            if fn is not None and fn(values, *self.kept[0]):
                self.kept = None
                return
            self._formed()
        super().fold_into(values)

    def tensors(self) -> list[torch.Tensor]:
        """:meth:`Sums.tensors`, the kept lanes formed first: by the extension's one call into
        fresh values where it takes them (``form_lanes``, csrc/form_lanes.cpp, the same numbers
        bit for bit), :attr:`known` then saying which values are known finite
        (:mod:`fimfast.known_finite`)."""
        if self.kept is not None:
            values = [torch.empty(s, dtype=d, device=dev)
                      for s, d, dev in zip(self.shapes, self.dtypes, self.devices)]
            known = formed_lanes(values, self.kept[0])
            if known is not None:
                self.kept, self.known = None, known
                return values
        self._formed()
        return super().tensors()


def _host():
    """The extension's ``fold_lanes`` (``None`` without it or in a build older than it), looked
    up once and kept in :data:`_HOST`."""
    _HOST[:] = [_ext.host_function("fold_lanes")]
    return _HOST[0]


_HOST: list = []
