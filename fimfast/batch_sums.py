"""One batch estimate of the per-sample engine, before the state adds it (:class:`Sums`), and
the squared products it may leave to the state to form (:class:`Product`): see
:meth:`fimfast.state.State.commit`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fimfast import _env


class Product(NamedTuple):
    """A squared product still to form: ``(G^2)^T (A^2)`` laid out ``(O, I)``, or ``(A^2)^T
    (G^2)`` ``(I, O)`` for a weight stored transposed (docs/math.md §4: the squares of a layer
    without weight sharing, ``sum_n S_n (x) a_n^2``).

    Attributes:
        G: ``(N, O)`` output side; with ``squared``, already the squares ``S``.
        A: ``(N, I)`` input side.
        block: the rows ``(start, stop)`` of the parameter's first dim it fills (``None``: all).
        transposed: the parameter is stored ``(I, O)``.
        squared: ``G`` holds squares already.
    """

    G: torch.Tensor
    A: torch.Tensor
    block: tuple[int, int] | None
    transposed: bool
    squared: bool

    def operands(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``a @ b`` the product, squares taken in ``dt`` (fresh tensors)."""
        G = self.G.to(dt) if self.squared else _square(self.G, dt)
        A = _square(self.A, dt)
        return (A.t(), G) if self.transposed else (G.t(), A)


# bytes per entry of the accumulation dtypes (compute_dtype: float32 or float64)
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}


def _square(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t**2`` in ``dt``, one fresh tensor (a widened copy is squared in place)."""
    return t.square() if t.dtype == dt else t.to(dt).square_()


class Sums:
    """One batch estimate, one slot per parameter, allocated on first use.

    :meth:`add` adopts a fresh full-size result as the slot when the slot is still empty, so a
    parameter whose estimate is one product (the common case) costs neither a zeroed temporary nor
    an extra pass over it (measured on a 535k-parameter MLP: 0.5 ms of a 7 ms EMPIRICAL step).
    :meth:`add_rows` keeps the rows of a table that a step touched as they are: :meth:`tensors`
    gives them as a sparse tensor, which :meth:`State.commit` adds at those rows only (an
    EmbeddingBag of 20000 x 64 and 16 bags of ~50 ids: 0.04 ms instead of 1.5 ms for a zeroed
    table and a pass over it, against a 1.5 ms training step).
    """

    def __init__(self, shapes: list, dtypes: list[torch.dtype], devices: list[torch.device]):
        self.shapes = [tuple(s) for s in shapes]
        self.dtypes = list(dtypes)
        self.devices = list(devices)
        self.slots: list[torch.Tensor | None] = [None] * len(self.shapes)
        self.rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.products: dict[int, list[Product]] = {}
        self.fold = False  # whether :meth:`defer` may keep products for the state to fold
        self._pending = 0  # bytes of the squares of the kept products
        self.scales: dict[int, torch.Tensor] = {}  # slot -> factor of its whole sum (scale)
        self._budget: int | None = None  # FIMFAST_MEMORY_BUDGET_MB, read at the first defer

    def scale(self, i: int, chain: torch.Tensor) -> None:
        """Multiply slot ``i``'s sum, once it is complete, by ``chain**2`` elementwise (``chain``
        in the slot's shape): the derivative of ``s = f(p)`` for a parameter whose uses all go
        through ``s``, one ``ds/dp`` for all of them (``hooks.Use.chain``). Its products are
        then formed here, not folded, and its rows kept dense."""
        self.scales[i] = chain.to(self.dtypes[i]).reshape(self.shapes[i])

    def _scaled(self) -> None:
        """Form and scale the scaled slots (in place: slots are fresh tensors, see :meth:`add`)."""
        for i, c in self.scales.items():
            self._form(i)
            self.get(i).mul_(c).mul_(c)
        self.scales.clear()

    def defer(self, i: int, G: torch.Tensor, A: torch.Tensor, block: tuple[int, int] | None = None,
              transposed: bool = False, squared: bool = False) -> bool:
        """Keep ``slot[i][block] += (G^2)^T (A^2)`` (a :class:`Product`) for :meth:`State.commit`
        to add into its values with one matrix product (``addmm_``), with no product-sized
        temporary nor pass over it (0.3 ms of a 4 ms step on a 535k-parameter MLP). Returns
        ``False``, keeping nothing, unless :attr:`fold` is set and the squares of every kept
        product stay within the memory budget (``FIMFAST_MEMORY_BUDGET_MB``): the caller then
        forms the product itself."""
        if not self.fold or i in self.scales:
            return False
        dt = self.dtypes[i]
        size = (G.numel() + A.numel()) * (_ITEMSIZE.get(dt) or torch.finfo(dt).bits // 8)
        if self._budget is None:  # read once per batch estimate
            self._budget = _env.memory_budget_bytes()
        if self._pending + size > self._budget:
            return False
        self._pending += size
        self.products.setdefault(i, []).append(Product(G, A, block, transposed, squared))
        return True

    def _form(self, i: int) -> None:
        """Add the kept products of slot ``i`` into it (a fresh product becomes an empty slot)."""
        for pr in self.products.pop(i, ()):
            a, b = pr.operands(self.dtypes[i])
            if pr.block is None and self.slots[i] is None and i not in self.rows:
                self.slots[i] = _mm(a, b).view(self.shapes[i])
            else:
                t = self.get(i)
                view = t if pr.block is None else t[pr.block[0] : pr.block[1]]
                view.view(a.shape[0], b.shape[1]).addmm_(a, b)

    def get(self, i: int) -> torch.Tensor:
        """Slot ``i``, zero-filled first if it is still empty (for in-place block updates)."""
        t = self.slots[i]
        if t is None:
            t = torch.zeros(self.shapes[i], dtype=self.dtypes[i], device=self.devices[i])
            self.slots[i] = t
            for rid, vals in self.rows.pop(i, ()):
                t.index_add_(0, rid, vals)
        return t

    def add_rows(self, i: int, rid: torch.Tensor, vals: torch.Tensor) -> None:
        """``slot[i][rid] += vals`` (repeated rows add up; ``vals`` fresh, in the slot's dtype).
        An empty slot keeps them as rows while they are few (under a quarter of the table)."""
        if self.slots[i] is None and i not in self.scales:
            kept = self.rows.setdefault(i, [])
            if 4 * (rid.numel() + sum(r.numel() for r, _ in kept)) <= self.shapes[i][0]:
                kept.append((rid, vals))
                return
        self.get(i).index_add_(0, rid, vals)

    def _sparse(self, i: int) -> torch.Tensor:
        kept = self.rows.pop(i)
        rid = torch.cat([r for r, _ in kept]) if len(kept) > 1 else kept[0][0]
        vals = torch.cat([v for _, v in kept]) if len(kept) > 1 else kept[0][1]
        return torch.sparse_coo_tensor(rid.unsqueeze(0), vals, self.shapes[i],
                                       check_invariants=False)

    def add(self, i: int, x: torch.Tensor, block: tuple[int, int] | None = None) -> None:
        """``slot[i][block] += x``; ``x`` must be a fresh tensor the caller no longer uses (it may
        become the slot itself)."""
        shape, dt = self.shapes[i], self.dtypes[i]
        if (block is None and self.slots[i] is None and i not in self.rows
                and x.numel() == math.prod(shape)):
            if x.dtype != dt:
                x = x.to(dt)
            if x.is_contiguous() and x.device == self.devices[i]:
                self.slots[i] = x if x.shape == shape else x.view(shape)
                return
        t = self.get(i)
        view = t if block is None else t[block[0] : block[1]]
        view.add_(x.reshape(view.shape))

    def tensors(self) -> list[torch.Tensor]:
        """Every slot (zeros where nothing was added), kept products formed; a slot kept as rows
        (:meth:`add_rows`) as a sparse COO tensor, uncoalesced (repeated rows add up)."""
        self._scaled()
        for i in list(self.products):
            self._form(i)
        return [self._sparse(i) if i in self.rows else self.get(i) for i in range(len(self.slots))]

    def fold_into(self, values: list[torch.Tensor]) -> None:
        """``values[i] += slot[i]`` for every slot, rows kept as rows (:meth:`add_rows`) by
        ``index_add_`` at those rows, the kept products by ``addmm_`` into the values; the
        squares of every product are formed before the first value is written."""
        scaled = {}
        for i, c in self.scales.items():  # values[i] += (slot c) c: no other temporary
            self._form(i)
            scaled[i] = (self.get(i).mul_(c), c)
        self.scales.clear()
        operands = [(i, pr.block, *pr.operands(values[i].dtype))
                    for i, prs in self.products.items() for pr in prs]
        dense = [i for i in range(len(self.slots)) if self.slots[i] is not None and i not in scaled]
        if dense:
            torch._foreach_add_([values[i] for i in dense], [self.slots[i] for i in dense])
        for i, (t, c) in scaled.items():
            values[i].addcmul_(t, c)
        for i, kept in self.rows.items():  # rows kept as they are: added at those rows
            for rid, vals in kept:
                values[i].index_add_(0, rid, vals)
        for i, block, a, b in operands:
            view = values[i] if block is None else values[i][block[0] : block[1]]
            shape = (a.shape[0], b.shape[1])
            if view.shape != shape:  # a weight of more dims (a convolution's) as (O, I)
                view = view.view(shape)
            view.addmm_(a, b)
        self.products.clear()
        self.rows.clear()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the operands' dtype: a step's first commit runs inside the caller's
    autocast region, which would run ``torch.mm`` in bf16 (the state's first squares then off by
    the bf16 rounding, 3.6e-3 of a layer's largest entry). ``addmm_`` into a slot is in place,
    which autocast leaves alone."""
    kind = a.device.type
    if not torch.is_autocast_enabled(kind):
        return torch.mm(a, b)
    with torch.autocast(kind, enabled=False):
        return torch.mm(a, b)
