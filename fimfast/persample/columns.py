"""The output-side columns ``u`` of one step (docs/math.md §3-§4)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fimfast import likelihoods
from fimfast._lazy import once
from fimfast.dtypes import compute_dtype
from fimfast.ops.softmax_rest import softmax_rest
from fimfast.types import FIMType, Options

# columns of EXACT formed at once by Columns.span up to this many elements (256 KiB in float32)
WHOLE_ELEMS = 1 << 16


class Columns:
    """The columns ``u`` of one step, any subset at a time.

    EXACT, categorical: the ``C - 1`` columns of the reduced factor ``B`` with ``B^T B = I(z)``
    obtained by taking the last class as reference (the Fisher of the ``C - 1`` free natural
    parameters ``z_c - z_C`` is ``diag(p') - p' p'^T``, ``p' = p_{<C}``, and its factor
    ``diag(sqrt p') - alpha sqrt p' p'^T`` needs ``2 alpha - alpha^2 (1 - p_C) = 1``, i.e.
    ``alpha = 1 / (1 + sqrt p_C)``). As a vector of logits, column ``c < C - 1`` is
    ``sqrt(p_c) (e_c - alpha q)`` with ``q = p`` except ``q_C = p_C + sqrt(p_C)``. EXACT,
    bernoulli/gaussian: the ``C`` diagonal columns of :func:`fimfast.likelihoods.exact_columns`.
    EMPIRICAL/MONTE_CARLO: the score columns of :func:`fimfast.likelihoods.score_columns`
    (same labels, same draws).

    Attributes:
        num: number of columns.
    """

    def __init__(
        self,
        flat: torch.Tensor,
        labels: torch.Tensor | None,
        fim_type: FIMType,
        opts: Options,
        seed: int,
        offset: int,
    ):
        dt = compute_dtype(flat.dtype)
        self.R, self.C = flat.shape
        self.dtype = dt
        self.device = flat.device
        lk = opts.likelihood
        self.block: torch.Tensor | None = None
        self._squares: dict[torch.dtype, torch.Tensor] = {}  # see squares
        self._flat, self.lk, self.sigma2 = flat, lk, opts.sigma2
        self.categorical = fim_type == FIMType.EXACT and lk == "categorical"
        if fim_type == FIMType.EXACT:
            self.num = self.C - 1 if self.categorical else self.C
        else:
            self.block = likelihoods.score_columns(flat, labels, fim_type, opts, seed, offset)
            self.num = self.block.shape[0]

    # everything below is computed on first use: a logits head in closed form needs only root
    @once
    def z(self) -> torch.Tensor:
        """``(R, C)`` the logits, detached, in float32 (float64 for float64 logits)."""
        flat = self._flat
        return (flat.detach() if flat.requires_grad else flat).to(self.dtype)

    @once
    def _soft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``p`` and ``1 - p``, the latter exact at a confident row's leading class."""
        soft = softmax_rest(self.z)
        return soft.p, soft.one_minus()

    @once
    def p(self) -> torch.Tensor:
        return self._soft[0]

    @once
    def diag(self) -> torch.Tensor:
        """``(R, num)`` entry of column ``k`` at class ``k``: ``sqrt(p_k) (1 - alpha p_k)`` as
        ``sqrt(p_k) (sqrt(p_C) + 1 - p_k) / (1 + sqrt(p_C))`` (no difference of numbers near 1 on a
        confident row); the column scale of a diagonal factor."""
        if not self.categorical:
            return self.sp
        sref = self.sp[:, -1:]
        return self.sp[:, : self.num] * (sref + self._soft[1][:, : self.num]) / (1.0 + sref)

    @once
    def sp(self) -> torch.Tensor:
        """``(R, C)`` column scales: ``sqrt p`` (categorical), ``sqrt(diag I)`` otherwise."""
        if self.categorical:
            return torch.sqrt(self.p)
        return torch.sqrt(likelihoods.diag_core(self.z, self.lk, self.sigma2))

    @once
    def naq(self) -> torch.Tensor | None:
        """``-alpha q`` of the reduced categorical factor (``None`` for diagonal factors): ``q``
        over ``-(1 + sqrt p_C)``, so that the product of a column is its off-class part, the
        negation exact (no operator of its own)."""
        if not self.categorical:
            return None
        sref = self.sp[:, -1:]
        q = self.p.clone()
        q[:, -1:].add_(sref)  # in place on the view (an indexed += writes it back: a copy more)
        return q.div_(-1.0 - sref)

    @once
    def root(self) -> torch.Tensor:
        """``(R, C)`` with ``root^2 = sum_k u_k^2`` per row (``diag I(z)`` for EXACT); a single
        score column is returned as it is, sign included, ``block[0]`` (the column that
        :mod:`fimfast.persample.onecol` back-propagates); otherwise only its square is used."""
        if self.block is not None:
            return self.block[0] if self.num == 1 else self.block.square().sum(0).sqrt_()
        if self.categorical:
            return (self.p * self._soft[1]).sqrt_()
        return self.sp

    @property
    def S(self) -> torch.Tensor:
        """``(R, C)`` ``sum_k u_k^2`` per row (``diag I(z)`` for EXACT)."""
        return self.root.square()

    def squares(self, dt: torch.dtype) -> torch.Tensor:
        """:attr:`S` in ``dt``, formed once per dtype (not to be written). For the categorical
        EXACT it is ``p (1 - p)`` itself (``diag I(z)``, docs/math.md §3; ``1 - p`` exact at a
        confident row's leading class): no
        square root to square again; otherwise ``root^2``."""
        S = self._squares.get(dt)
        if S is None:
            if self.categorical and self.z.dtype == dt:
                S = self.p * self._soft[1]
            else:
                root = self.root
                S = root.square() if root.dtype == dt else root.to(dt).square_()
            self._squares[dt] = S
        return S

    def take(self, ks: torch.Tensor) -> torch.Tensor:
        """Columns ``ks`` (int64 ``(M,)``): ``(M, R, C)`` in float32/float64."""
        if self.block is not None:
            return self.block.index_select(0, ks)
        M = ks.numel()
        sp = self.sp.index_select(1, ks).t().unsqueeze(-1)  # (M, R, 1)
        if self.naq is None:
            cols = torch.zeros(M, self.R, self.C, dtype=self.dtype, device=sp.device)
        else:
            cols = torch.mul(sp, self.naq.unsqueeze(0))
        # the entry at class k of column k: one scatter (an indexed write is three kernels)
        d = self.diag.index_select(1, ks).t().unsqueeze(-1)
        return cols.scatter_(2, ks.view(M, 1, 1).expand(M, self.R, 1), d)

    def span(self, k0: int, k1: int) -> torch.Tensor:
        """Columns ``k0 .. k1 - 1``, ``(k1 - k0, R, C)``: not to be written. Score columns are a
        view of their block; the columns of EXACT are formed all at once, in one pass, and viewed
        where they are at most :data:`WHOLE_ELEMS` elements (a chunk of them then costs no
        operator at all), else ``k1 - k0`` at a time. Either way each element is the same
        product as :meth:`take` forms (elementwise operators), bit for bit."""
        every = k0 == 0 and k1 >= self.num
        if self.block is not None:
            return self.block if every else self.block[k0:k1]
        if self.num * self.R * self.C <= WHOLE_ELEMS:
            return self._whole if every else self._whole[k0:k1]
        return self.take(torch.arange(k0, k1, device=self.device))

    @once
    def _whole(self) -> torch.Tensor:
        """Every column, as :meth:`take` forms them (the same products), with the entry of
        column ``k`` at class ``k`` written on the diagonal view ``(k, r, k)``: no index."""
        sp = self.sp[:, : self.num]  # (R, num)
        if self.naq is None:
            cols = torch.zeros(self.num, self.R, self.C, dtype=self.dtype, device=sp.device)
        else:
            cols = torch.mul(sp.t().unsqueeze(-1), self.naq.unsqueeze(0))
        cols.diagonal(0, 0, 2).copy_(self.diag)
        return cols

    def every(self) -> torch.Tensor:
        """All columns at once, ``(num, R, C)`` (the score columns as they are: not to be
        written)."""
        if self.block is not None:
            return self.block
        return self.take(torch.arange(self.num, device=self.device))

    def blocks(self, chunk: int) -> Iterator[torch.Tensor]:
        """All columns, ``chunk`` at a time."""
        dev = self.device
        for k0 in range(0, self.num, chunk):
            yield self.take(torch.arange(k0, min(self.num, k0 + chunk), device=dev))
