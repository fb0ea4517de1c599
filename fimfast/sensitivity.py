"""Fisher sensitivity: which parameters a perturbation (quantisation, pruning) hurts, predicted.

Moving the parameters by ``delta`` changes the model's predictive distribution by

    KL(p_theta || p_{theta + delta}) = 0.5 * delta^T F delta + O(|delta|^3)

per input, with ``F`` the Fisher (per sample: ``reduction="mean"``), which is the Hessian of that
KL at ``delta = 0``. With the **diagonal** this becomes ``0.5 * sum_i F_ii delta_i^2``: exact to
second order for a perturbation of one coordinate, and for a perturbation of many coordinates an
approximation that drops the cross terms ``F_ij delta_i delta_j`` (they cancel on average when
the signs of ``delta`` are independent, as rounding errors nearly are). At a minimum of the
training loss the same quadratic form also predicts the change of the expected loss (the Fisher
equals the Gauss-Newton part of the Hessian), but away from a minimum the loss also has a
first-order term, so the KL is the quantity predicted here (:func:`measure_kl` measures it).

* :func:`traces`: Fisher traces per parameter, module, named group or output channel.
* :func:`predicted_change`: ``0.5 * delta^T diag(F) delta``, total or per tensor.
* :func:`quantize`, :func:`quantization_sensitivity`: round-to-nearest to ``b`` bits per tensor
  or per output channel, and the predicted change of each (tensor, bits), ranked.
* :func:`saliency`, :func:`prune_mask`, :func:`pruning_sensitivity`: Optimal Brain Damage's
  ``0.5 F_ii theta_i^2`` (the predicted change of zeroing one weight), global pruning masks and
  the predicted change of a mask.
* :func:`allocate_bits`: bits per tensor under an average-bits budget, greedily by predicted
  change saved per bit spent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fimfast.entries import check_entries
from fimfast.sensitivity_kl import measure_kl

__all__ = [
    "BitAllocation",
    "Sensitivity",
    "allocate_bits",
    "measure_kl",
    "predicted_change",
    "prune_mask",
    "pruning_sensitivity",
    "quantization_sensitivity",
    "quantize",
    "saliency",
    "traces",
]

FisherLike = Mapping[str, torch.Tensor]


def _named(model: nn.Module | Mapping[str, torch.Tensor], fisher: FisherLike):
    """``{name: parameter}`` for the names in ``fisher``, shapes checked."""
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    out = {}
    for n, f in fisher.items():
        if n not in params:
            raise ValueError(f"fisher[{n!r}]: the model has no parameter {n!r}")
        if tuple(params[n].shape) != tuple(f.shape):
            raise ValueError(
                f"fisher[{n!r}] has shape {tuple(f.shape)}; the parameter has "
                f"{tuple(params[n].shape)}"
            )
        check_entries(f.detach(), f"fisher[{n!r}]", nonnegative=False)
        out[n] = params[n].detach()
    return out


# -- traces ------------------------------------------------------------------------------------ #
def traces(
    fisher: FisherLike,
    by: str | Mapping[str, str | Callable[[str], bool]] = "param",
) -> dict[str, Any]:
    """Fisher traces (sums of diagonal entries, in float64) grouped.

    Args:
        fisher: a :class:`~fimfast.DiagFIM` or ``{name: tensor}``.
        by: ``"param"`` (one entry per tensor), ``"module"`` (tensors grouped by the name before
            their last dot), ``"channel"`` (per tensor, a ``(shape[0],)`` float64 tensor: the
            trace of each output channel / row; 0-d tensors give one entry), or a mapping
            ``{group: regex or predicate(name)}``: each tensor goes to the first group whose
            regex ``re.search``-es its name (or whose predicate is true); tensors no group takes
            are summed under ``"other"`` when there are any.

    Returns:
        ``{key: float}`` (``{name: tensor}`` for ``"channel"``), in first-seen order.
    """
    out: dict[str, Any] = {}
    if by == "channel":
        for n, f in fisher.items():
            f = f.detach().double()
            out[n] = f.reshape(1) if f.dim() == 0 else f.reshape(f.shape[0], -1).sum(1)
        return out
    if isinstance(by, Mapping):
        tests = []
        for g, t in by.items():
            if isinstance(t, str):
                rx = re.compile(t)
                tests.append((g, lambda n, rx=rx: rx.search(n) is not None))
            elif callable(t):
                tests.append((g, t))
            else:
                raise TypeError(f"by[{g!r}] must be a regex string or a callable; got {t!r}")
        for g, _ in tests:
            out[g] = 0.0
        for n, f in fisher.items():
            key = next((g for g, t in tests if t(n)), "other")
            out[key] = out.get(key, 0.0) + float(f.detach().double().sum())
        return out
    if by not in ("param", "module"):
        raise ValueError(f"by must be 'param', 'module', 'channel' or a mapping; got {by!r}")
    for n, f in fisher.items():
        key = n if by == "param" else (n.rsplit(".", 1)[0] if "." in n else "")
        out[key] = out.get(key, 0.0) + float(f.detach().double().sum())
    return out


# -- quadratic form ---------------------------------------------------------------------------- #
def predicted_change(
    fisher: FisherLike, delta: Mapping[str, torch.Tensor], per_tensor: bool = False
) -> float | dict[str, float]:
    """``0.5 * sum_i F_ii delta_i^2`` over the tensors of ``delta`` (float64).

    Args:
        fisher: Fisher diagonal (``reduction="mean"`` for the KL per input).
        delta: ``{name: perturbation}``; names absent from ``delta`` are unperturbed.
        per_tensor: return ``{name: float}`` instead of the total.
    """
    out = {}
    for n, d in delta.items():
        if n not in fisher:
            raise ValueError(f"delta[{n!r}] has no Fisher entry")
        f = fisher[n]
        if tuple(d.shape) != tuple(f.shape):
            raise ValueError(f"delta[{n!r}] has shape {tuple(d.shape)}; expected {tuple(f.shape)}")
        out[n] = 0.5 * float((f.detach().double() * d.detach().double().square()).sum())
    return out if per_tensor else float(sum(out.values()))


# -- quantisation ------------------------------------------------------------------------------ #
def quantize(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Symmetric round-to-nearest quantisation to ``bits`` bits (levels ``-(2^(b-1)-1) ..
    2^(b-1)-1`` times a scale ``max|w| / (2^(b-1)-1)``), per tensor or per output channel (row
    ``w[i]``); returns the dequantised tensor. ``bits >= 16`` returns ``w`` unchanged."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2; got {bits!r}")
    if bits >= 16:
        return w.clone()
    levels = 2 ** (bits - 1) - 1
    if per_channel and w.dim() >= 1:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
        amax = amax.reshape((-1,) + (1,) * (w.dim() - 1))
    else:
        amax = w.detach().abs().max()
    scale = amax.clamp_min(torch.finfo(w.dtype).tiny) / levels
    return torch.round(w / scale).clamp(-levels, levels) * scale


@dataclass(frozen=True)
class Sensitivity:
    """One row of a sensitivity table: perturbing ``name`` (at ``bits``, for quantisation)
    changes the KL by ``predicted``, to second order (diagonal Fisher)."""

    name: str
    predicted: float
    numel: int
    bits: int | None = None


def quantization_sensitivity(
    model: nn.Module,
    fisher: FisherLike,
    bits: Sequence[int] = (2, 3, 4, 8),
    per_channel: bool = False,
) -> list[Sensitivity]:
    """Predicted KL change of quantising each tensor alone, for each bit width, most harmful
    first."""
    params = _named(model, fisher)
    rows = []
    for n, p in params.items():
        for b in bits:
            d = quantize(p, b, per_channel) - p
            rows.append(Sensitivity(n, predicted_change(fisher, {n: d}), p.numel(), b))
    rows.sort(key=lambda r: -r.predicted)
    return rows


# -- pruning ----------------------------------------------------------------------------------- #
def saliency(model: nn.Module, fisher: FisherLike) -> dict[str, torch.Tensor]:
    """Optimal Brain Damage saliencies ``0.5 * F_ii * theta_i^2`` (float64): the predicted KL
    change of zeroing weight ``i`` alone."""
    params = _named(model, fisher)
    return {n: 0.5 * fisher[n].detach().double() * p.double().square() for n, p in params.items()}


def prune_mask(
    model: nn.Module, fisher: FisherLike, sparsity: float, names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Global pruning masks (``True`` = kept) removing the fraction ``sparsity`` of the weights of
    ``names`` (default: every tensor of ``fisher`` with at least 2 dimensions) with the smallest
    saliency."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity!r}")
    sal = saliency(model, fisher)
    names = [n for n in sal if sal[n].dim() >= 2] if names is None else list(names)
    for n in names:
        if n not in sal:
            raise ValueError(f"names: {n!r} has no Fisher entry")
    flat = torch.cat([sal[n].reshape(-1) for n in names])
    k = int(sparsity * flat.numel())
    if k == 0:
        return {n: torch.ones_like(sal[n], dtype=torch.bool) for n in names}
    # ties at the threshold broken by position: exactly k weights are removed
    order = torch.argsort(flat, stable=True)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    out, i = {}, 0
    for n in names:
        out[n] = keep[i : i + sal[n].numel()].reshape(sal[n].shape)
        i += sal[n].numel()
    return out


def pruning_sensitivity(
    model: nn.Module, fisher: FisherLike, masks: Mapping[str, torch.Tensor]
) -> list[Sensitivity]:
    """Predicted KL change of applying each tensor's mask (``False`` = zeroed) alone, most
    harmful first."""
    params = _named(model, fisher)
    rows = []
    for n, m in masks.items():
        if n not in params:
            raise ValueError(f"masks[{n!r}] has no Fisher entry")
        d = -params[n] * (~m.bool()).to(params[n].dtype)
        rows.append(Sensitivity(n, predicted_change(fisher, {n: d}), params[n].numel()))
    rows.sort(key=lambda r: -r.predicted)
    return rows


# -- bit allocation ---------------------------------------------------------------------------- #
@dataclass
class BitAllocation:
    """Bits per tensor (or per output channel) and what they cost.

    Attributes:
        bits: ``{name: bits}``; with ``granularity="channel"``, matrices (2 or more dimensions)
            get an int64 tensor of bits per output channel (row) instead of one number.
        predicted: predicted KL change of quantising everything at its bits (the diagonal model
            adds the changes of separate tensors and rows).
        avg_bits: average bits per weight over the allocated tensors.
        per_channel: whether tensors with one number of bits are quantised with a scale per
            output channel (tensors with bits per channel always are).
    """

    bits: dict[str, int | torch.Tensor]
    predicted: float
    avg_bits: float
    per_channel: bool = False

    def delta(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The perturbation ``quantize(theta, bits) - theta`` of this allocation."""
        params = dict(model.named_parameters())
        out = {}
        for n, b in self.bits.items():
            p = params[n].detach()
            if isinstance(b, torch.Tensor):  # bits per row: per-channel scales
                q = torch.empty_like(p)
                for v in b.unique().tolist():
                    rows = b == v
                    q[rows] = quantize(p[rows], int(v), per_channel=True)
                out[n] = q - p
            else:
                out[n] = quantize(p, int(b), self.per_channel) - p
        return out


def allocate_bits(
    model: nn.Module,
    fisher: FisherLike,
    avg_bits: float,
    choices: Sequence[int] = (2, 3, 4, 8),
    per_channel: bool = False,
    granularity: str = "tensor",
    names: Sequence[str] | None = None,
) -> BitAllocation:
    """Choose bits so that the average bits per weight is at most ``avg_bits`` and the predicted
    KL change is small.

    Greedy: every unit (a tensor, or an output channel with ``granularity="channel"``) starts at
    the fewest bits; then, while the budget allows, the upgrade (one unit to its next choice) with
    the largest predicted change saved per extra bit is taken. Upgrades that no longer fit are
    skipped, so the budget is never exceeded. Per-tensor units leave budget unused when one
    tensor holds most weights (an MLP's first layer); channel units do not.

    Args:
        model: the network.
        fisher: Fisher diagonal (``reduction="mean"``).
        avg_bits: the budget, average bits per weight over the tensors allocated.
        choices: bit widths allowed.
        per_channel: quantise with one scale per output channel instead of per tensor (always
            so for the matrices of ``granularity="channel"``).
        granularity: ``"tensor"`` or ``"channel"`` (bits per output row of every tensor with 2 or
            more dimensions; vectors stay one unit).
        names: tensors to allocate (default: every tensor of ``fisher``).

    Raises:
        ValueError: the budget is below the fewest bits, or an argument is invalid.
    """
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel'; got {granularity!r}")
    params = _named(model, fisher)
    names = list(params) if names is None else list(names)
    choices = sorted(set(int(b) for b in choices))
    if not choices:
        raise ValueError("choices must name at least one bit width")
    if isinstance(avg_bits, (bool, str)) or not math.isfinite(_number(avg_bits)):
        raise ValueError(f"avg_bits must be a finite number; got {avg_bits!r}")
    avg_bits = _number(avg_bits)
    if avg_bits < choices[0]:
        raise ValueError(f"avg_bits={avg_bits!r} is below the fewest bits {choices[0]}")
    units = _units(params, fisher, names, choices, per_channel, granularity)
    total = sum(u[2] for u in units)
    level, used = _greedy(units, choices, avg_bits * total, choices[0] * total)
    bits: dict[str, int | torch.Tensor] = {}
    for (n, r, _, _), lv in zip(units, level):
        if r is None:
            bits[n] = choices[lv]
        else:
            if n not in bits:
                bits[n] = torch.zeros(params[n].shape[0], dtype=torch.int64)
            bits[n][r] = choices[lv]
    pred = float(sum(u[3][lv] for u, lv in zip(units, level)))
    return BitAllocation(bits, pred, used / total, per_channel)


def _number(x: Any) -> float:
    """``float(x)``, NaN for what is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _units(
    params, fisher, names, choices: list[int], per_channel: bool, granularity: str
) -> list[tuple[str, int | None, int, list[float]]]:
    """The units of allocation: (name, row or None, size, [predicted change at each choice])."""
    units: list[tuple[str, int | None, int, list[float]]] = []
    for n in names:
        p, f = params[n], fisher[n].detach().double()
        rows = granularity == "channel" and p.dim() >= 2
        pc = per_channel or rows
        costs = []
        for b in choices:
            d2 = (quantize(p, b, pc) - p).double().square() * f
            costs.append(d2.reshape(p.shape[0], -1).sum(1) * 0.5 if rows else 0.5 * d2.sum())
        if rows:
            size = p[0].numel()
            for r in range(p.shape[0]):
                units.append((n, r, size, [float(c[r]) for c in costs]))
        else:
            units.append((n, None, p.numel(), [float(c) for c in costs]))
    return units


def _greedy(units, choices: list[int], budget: float, used: float) -> tuple[list[int], float]:
    """Greedy upgrades within ``budget`` bits; returns each unit's choice index and bits used."""
    level = [0] * len(units)
    while True:
        best, best_gain = -1, -1.0
        for j, (_, _, size, cost) in enumerate(units):
            i = level[j]
            if i + 1 >= len(choices):
                continue
            extra = (choices[i + 1] - choices[i]) * size
            if used + extra > budget + 1e-9:
                continue
            gain = (cost[i] - cost[i + 1]) / extra
            if gain > best_gain:
                best, best_gain = j, gain
        if best < 0:
            break
        i = level[best]
        used += (choices[i + 1] - choices[i]) * units[best][2]
        level[best] = i + 1
    return level, used
