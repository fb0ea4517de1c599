"""The comparison rules of the op tests, against an independent float64 truth on the same rounded
inputs (tests/ops/spec.py): the torch reference within a few ulps of its compute dtype, and a
kernel as wrong as torch in the same dtype, plus a few ulps."""

from __future__ import annotations

import torch
from tolerances import KERNEL_SLACK_ULPS


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """max |x - truth| / max |truth| (absolute error when the truth is all zeros)."""
    x = x.detach().to("cpu", torch.float64)
    truth = truth.detach().to("cpu", torch.float64)
    if x.shape != truth.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != {tuple(truth.shape)}")
    if truth.numel() == 0:
        return 0.0
    scale = float(truth.abs().max())
    return float((x - truth).abs().max()) / (scale if scale > 0 else 1.0)


def assert_kernel_close(
    kernel: torch.Tensor,
    ref: torch.Tensor,
    truth: torch.Tensor,
    factor: float = 1.0,
    what: str = "",
) -> None:
    """err(kernel) <= factor * err(ref) + KERNEL_SLACK_ULPS * eps(kernel's dtype)."""
    assert kernel.dtype == ref.dtype, f"{what}: dtype {kernel.dtype} != reference {ref.dtype}"
    assert kernel.shape == ref.shape, f"{what}: shape {tuple(kernel.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(kernel).all()), f"{what}: non-finite values"
    ek = rel_err(kernel, truth)
    et = rel_err(ref, truth)
    bound = factor * et + KERNEL_SLACK_ULPS * torch.finfo(kernel.dtype).eps
    assert ek <= bound, f"{what}: kernel error {ek:.3g} > {bound:.3g} (torch error {et:.3g})"


def assert_reference_close(ref: torch.Tensor, truth: torch.Tensor, what: str = "",
                           ulps: float = KERNEL_SLACK_ULPS) -> None:
    """The torch reference against the independent truth: err <= ulps * eps(ref's dtype)."""
    assert bool(torch.isfinite(ref).all()), f"{what}: non-finite values in the reference"
    err = rel_err(ref, truth)
    bound = ulps * torch.finfo(ref.dtype).eps
    assert err <= bound, f"{what}: reference error {err:.3g} > {bound:.3g} against the definition"


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (2-D) in a ``contiguous``, ``transposed`` or ``sliced`` layout."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":  # column-major storage
        return t.t().contiguous().t()
    if kind == "sliced":  # every other column of a wider buffer, row stride > width
        wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 3, dtype=t.dtype, device=t.device)
        wide[:, 1 : 1 + 2 * t.shape[1] : 2] = t
        return wide[:, 1 : 1 + 2 * t.shape[1] : 2]
    raise KeyError(kind)
