"""Structured Fisher representations beyond the diagonal: dense, block-diagonal, low-rank,
KFAC, EKFAC and quasi-diagonal (docs/structured.md). Entry point: :func:`fimfast.fisher`."""

from fimfast.structured.accumulate import FisherAccumulator
from fimfast.structured.api import REPRESENTATIONS, fisher, refit_ekfac
from fimfast.structured.base import DENSE_LIMIT, StructuredFIM
from fimfast.structured.dense import BlockDiagFIM, DenseFIM, LowRankFIM
from fimfast.structured.kron import EKFACFIM, KFACFIM, QuasiDiagFIM

load = StructuredFIM.load

__all__ = [
    "DENSE_LIMIT",
    "REPRESENTATIONS",
    "BlockDiagFIM",
    "DenseFIM",
    "EKFACFIM",
    "FisherAccumulator",
    "KFACFIM",
    "LowRankFIM",
    "QuasiDiagFIM",
    "StructuredFIM",
    "fisher",
    "load",
    "refit_ekfac",
]
