"""Dense, block-diagonal and low-rank Fisher matrices, from per-(row, column) parameter gradients.

``F = sum_r J_r^T I(z_r) J_r = sum_pairs g g^T`` with ``g = J_r^T u`` for the output-side columns
``u`` of :mod:`fimfast.structured.columns`. One batched backward per chunk of pairs gives their
``(M, P)`` gradients; the dense matrix accumulates ``G^T G``, the block-diagonal one ``G_b^T G_b``
per module block, the low-rank one keeps the (scaled) rows ``G`` themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fimfast.structured.base import (
    StructuredFIM,
    check_dense_size,
    check_draws,
    check_invertible,
    register,
)


def module_blocks(names: list[str]) -> list[tuple[int, int]]:
    """Contiguous ``[i, j)`` ranges of parameter indices owned by the same module (the name
    before the last dot: ``"0.weight"`` and ``"0.bias"`` form block ``"0"``)."""
    blocks: list[tuple[int, int]] = []
    prefix = None
    for i, n in enumerate(names):
        p = n.rsplit(".", 1)[0] if "." in n else ""
        if p != prefix or not blocks:
            blocks.append((i, i + 1))
            prefix = p
        else:
            blocks[-1] = (blocks[-1][0], i + 1)
    return blocks


@register("dense")
class DenseFIM(StructuredFIM):
    """The full ``(P, P)`` Fisher (NNGeometry's ``PMatDense``)."""

    def __init__(self, names, shapes, data: torch.Tensor, meta: Mapping | None = None):
        super().__init__(names, shapes, meta)
        P = self.numel()
        if tuple(data.shape) != (P, P):
            raise ValueError(f"data must have shape ({P}, {P}); got {tuple(data.shape)}")
        self.data = data
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def to_dense(self) -> torch.Tensor:
        """The ``(P, P)`` matrix."""
        return self.data

    def _mv(self, x):
        return self.data @ x.to(self.dtype)

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors, cached."""
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.data)
        return self._eig

    def _solve(self, x, d):
        ev, V = self.eigh()
        check_invertible([ev], d)
        return V @ ((V.T @ x.to(self.dtype)) / (ev + d))

    def inverse(self, damping: float = 1e-3) -> DenseFIM:
        """``(F + damping I)^{-1}`` from the eigendecomposition."""
        from fimfast.structured.base import check_damping

        d = check_damping(damping)
        ev, V = self.eigh()
        check_invertible([ev], d)
        return DenseFIM(self.names, self.shapes, (V / (ev + d)) @ V.T,
                        {**self.meta, "inverse_damping": d})

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from ``N(0, F)`` as ``(n, P)`` rows ``F^{1/2} eps`` (from the
        eigendecomposition; negative eigenvalues taken as 0), as ``EKFACFIM.sample``: what
        ``KFACFIM.inverse`` returns for an embedding's ``reduce`` factor is a ``DenseFIM``, which
        had no ``sample``."""
        check_draws(n)
        ev, V = self.eigh()
        e = torch.randn(n, ev.numel(), generator=generator, dtype=ev.dtype, device=ev.device)
        return (e * ev.clamp_min(0).sqrt()) @ V.T

    def _diag(self):
        return self.data.diagonal().clone()

    def trace(self) -> float:
        return float(self.data.double().trace())

    def frobenius_norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.data.double()))

    def _tensors(self):
        return {"data": self.data}

    @classmethod
    def _from_tensors(cls, names, shapes, t, extra, meta):
        return cls(names, shapes, t["data"], meta)


@register("block_diag")
class BlockDiagFIM(StructuredFIM):
    """One dense block per module (its weight and bias together); zero between modules
    (NNGeometry's ``PMatBlockDiag``).

    Attributes:
        blocks: ``[(first, stop)]`` parameter-index ranges of each block.
        data: one ``(P_b, P_b)`` tensor per block.
    """

    def __init__(self, names, shapes, data: list[torch.Tensor], blocks=None, meta=None):
        super().__init__(names, shapes, meta)
        self.blocks = [tuple(b) for b in (module_blocks(self.names) if blocks is None else blocks)]
        if len(data) != len(self.blocks):
            raise ValueError(f"data must hold {len(self.blocks)} blocks; got {len(data)}")
        for (i, j), b in zip(self.blocks, data):
            n = self.offsets[j] - self.offsets[i]
            if tuple(b.shape) != (n, n):
                raise ValueError(f"block of {self.names[i:j]} must be ({n}, {n}); got "
                                 f"{tuple(b.shape)}")
        self.data = list(data)

    @property
    def dtype(self):
        return self.data[0].dtype

    def ranges(self):
        """``(start, stop)`` flat positions of each block."""
        return [(self.offsets[i], self.offsets[j]) for i, j in self.blocks]

    def to_dense(self):
        self._dense_check()
        P = self.numel()
        M = torch.zeros(P, P, dtype=self.dtype, device=self.data[0].device)
        for (a, b), blk in zip(self.ranges(), self.data):
            M[a:b, a:b] = blk
        return M

    def _mv(self, x):
        x = x.to(self.dtype)
        return torch.cat([blk @ x[a:b] for (a, b), blk in zip(self.ranges(), self.data)])

    def _check_blocks(self, d: float) -> None:
        """With ``damping == 0``: the eigenvalues of every block (:func:`check_invertible`)."""
        if d == 0:
            check_invertible([torch.linalg.eigvalsh(blk) for blk in self.data], d)

    def _solve(self, x, d):
        self._check_blocks(d)
        x = x.to(self.dtype)
        out = []
        for (a, b), blk in zip(self.ranges(), self.data):
            M = blk.clone()
            M.diagonal().add_(d)
            out.append(torch.linalg.solve(M, x[a:b]))
        return torch.cat(out)

    def inverse(self, damping: float = 1e-3) -> BlockDiagFIM:
        """``(F + damping I)^{-1}``, block by block."""
        from fimfast.structured.base import check_damping

        d = check_damping(damping)
        self._check_blocks(d)
        inv = []
        for blk in self.data:
            M = blk.clone()
            M.diagonal().add_(d)
            inv.append(torch.linalg.inv(M))
        return BlockDiagFIM(self.names, self.shapes, inv, self.blocks,
                            {**self.meta, "inverse_damping": d})

    def _diag(self):
        return torch.cat([blk.diagonal() for blk in self.data])

    def trace(self):
        return float(sum(blk.double().trace() for blk in self.data))

    def frobenius_norm(self):
        return math.sqrt(float(sum((blk.double() ** 2).sum() for blk in self.data)))

    def _tensors(self):
        return {f"block{i}": b for i, b in enumerate(self.data)}

    def _extra(self):
        return {"blocks": self.blocks}

    @classmethod
    def _from_tensors(cls, names, shapes, t, extra, meta):
        data = [t[f"block{i}"] for i in range(len(extra["blocks"]))]
        return cls(names, shapes, data, extra["blocks"], meta)


@register("low_rank")
class LowRankFIM(StructuredFIM):
    """``F = L^T L`` with a factor ``L`` of ``m`` rows (NNGeometry's ``PMatLowRank``).

    Without truncation the rows of ``L`` are the per-(row, column) gradients (scaled for the
    reduction), so the representation is exact with rank at most ``m``; with ``rank=r`` it is the
    best rank-``r`` approximation, ``L = diag(s) V^T`` from the top-``r`` singular triplets.
    """

    def __init__(self, names, shapes, factor: torch.Tensor, meta=None):
        super().__init__(names, shapes, meta)
        if factor.dim() != 2 or factor.shape[1] != self.numel():
            raise ValueError(f"factor must be (m, {self.numel()}); got {tuple(factor.shape)}")
        self.factor = factor
        self._svd = None

    @property
    def dtype(self):
        return self.factor.dtype

    @property
    def rank(self) -> int:
        """Number of rows of the factor (an upper bound on the rank)."""
        return int(self.factor.shape[0])

    def truncated(self, rank: int) -> LowRankFIM:
        """The best rank-``rank`` approximation (top singular triplets of ``L``)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
        s, V = self.eig()
        k = min(rank, s.numel())
        return LowRankFIM(self.names, self.shapes, s[:k].sqrt().unsqueeze(1) * V[:, :k].T,
                          {**self.meta, "rank": k})

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending) and ``(P, k)`` eigenvectors of ``F`` (non-zero part)."""
        if self._svd is None:
            _, s, Vh = torch.linalg.svd(self.factor, full_matrices=False)
            self._svd = (s**2, Vh.T)
        return self._svd

    def to_dense(self):
        self._dense_check()
        return self.factor.T @ self.factor

    def _mv(self, x):
        return self.factor.T @ (self.factor @ x.to(self.dtype))

    def _solve(self, x, d):
        if d <= 0:
            raise ValueError("damping must be > 0 for a low-rank matrix (it is singular)")
        x = x.to(self.dtype)
        ev, V = self.eig()
        c = V.T @ x
        return V @ (c / (ev + d)) + (x - V @ c) / d

    def _diag(self):
        return (self.factor**2).sum(0)

    def trace(self):
        return float((self.factor.double() ** 2).sum())

    def frobenius_norm(self):
        """``||L^T L||_F = ||L L^T||_F``, from the Gram matrix of the smaller side (before, the
        ``m x m`` one: 80 GB in float64 for the 100000 rows ``max_rows`` allows)."""
        L = self.factor.double()
        return float(torch.linalg.matrix_norm(L @ L.T if L.shape[0] <= L.shape[1] else L.T @ L))

    def _tensors(self):
        return {"factor": self.factor}

    @classmethod
    def _from_tensors(cls, names, shapes, t, extra, meta):
        return cls(names, shapes, t["factor"], meta)


class PairAccumulator:
    """Accumulates per-pair parameter gradients ``(M, P)`` into a dense, block or low-rank sum."""

    def __init__(self, kind: str, names, shapes, dtype, device, max_rows: int | None = None):
        self.kind = kind
        self.layout = StructuredFIM(names, shapes, None)
        P = self.layout.numel()
        self.dtype = dtype
        if kind == "dense":
            check_dense_size(P, "representation='dense'")
            self.sum = torch.zeros(P, P, dtype=dtype, device=device)
        elif kind == "block_diag":
            self.blocks = module_blocks(self.layout.names)
            off = self.layout.offsets
            for i, j in self.blocks:
                check_dense_size(off[j] - off[i], f"the block of {names[i:j]}")
            self.sums = [torch.zeros(off[j] - off[i], off[j] - off[i], dtype=dtype, device=device)
                         for i, j in self.blocks]
        else:
            self.rows: list[torch.Tensor] = []
            self.nrows = 0
            self.max_rows = max_rows

    def add(self, G: torch.Tensor) -> None:
        """Add the outer products of the rows of ``G`` (``(M, P)``)."""
        G = G.to(self.dtype)
        if self.kind == "dense":
            self.sum.addmm_(G.T, G)
        elif self.kind == "block_diag":
            off = self.layout.offsets
            for (i, j), s in zip(self.blocks, self.sums):
                g = G[:, off[i]:off[j]]
                s.addmm_(g.T, g)
        else:
            nrows = self.nrows + G.shape[0]  # counted once the rows are kept
            if self.max_rows is not None and nrows > self.max_rows:
                raise ValueError(
                    f"representation='low_rank' keeps every gradient row: {nrows} rows of "
                    f"P={self.layout.numel()} exceed max_rows={self.max_rows}; use fewer "
                    "batches, a random fim_type (HUTCHINSON: num_probes rows per batch) or "
                    "representation='kfac'"
                )
            self.rows.append(G)
            self.nrows = nrows

    def mark(self) -> int | None:
        """Where a batch starts: the number of kept row blocks (``low_rank``; else ``None``)."""
        return len(self.rows) if self.kind == "low_rank" else None

    def drop_from(self, mark: int | None) -> None:
        """Forget the row blocks kept since :meth:`mark` (a batch that failed part-way)."""
        if mark is not None:
            del self.rows[mark:]
            self.nrows = sum(r.shape[0] for r in self.rows)

    def result(self, scale: float, meta) -> StructuredFIM:
        lay = self.layout
        if self.kind == "dense":
            return DenseFIM(lay.names, lay.shapes, self.sum * scale, meta)
        if self.kind == "block_diag":
            return BlockDiagFIM(lay.names, lay.shapes, [s * scale for s in self.sums],
                                self.blocks, meta)
        L = torch.cat(self.rows) * math.sqrt(scale)
        return LowRankFIM(lay.names, lay.shapes, L, meta)
