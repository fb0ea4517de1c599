"""The one rule for fimfast's own arithmetic: float64 stays float64, everything else is float32.

Squares, sums, states and the fused ops compute in :func:`compute_dtype` of their inputs, so a
bf16/fp16 model is estimated in float32 and a float64 model (the tests' oracles) in float64.
"""

from __future__ import annotations

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """``torch.float64`` if any of ``dtypes`` is float64, else ``torch.float32``."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
