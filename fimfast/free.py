"""A Fisher-like diagonal recycled from Adam's squared-gradient accumulator (no extra pass).

Li, Dangel, Tam & Raffel, *Fishers for Free? Approximating the Fisher Information Matrix by
Recycling the Squared Gradient Accumulator* (2025) call this the "Squisher" and find that it does
about as well as a Fisher diagonal in merging, pruning, continual learning and uncertainty. What it
is, exactly (derived from Adam's update rule; ``benchmarks/free_fisher.py`` measures the gaps):

* Adam/AdamW keep, per coordinate, ``v_t = beta2 v_{t-1} + (1 - beta2) gbar_t^2`` where ``gbar_t``
  is the **mini-batch gradient of the mean loss** over the ``B`` samples of step ``t``:
  ``gbar = (1/B) sum_n g_n`` with ``g_n`` the per-sample gradient of ``-log p(y_n | x_n)``.
* ``v_hat = v_t / (1 - beta2^t)`` (Adam's bias correction) is a weighted average of ``gbar^2``
  over the last ``~1/(1 - beta2)`` steps (1,000 for ``beta2 = 0.999``), at the parameters of
  **those** steps, not of the final model.
* For i.i.d. samples ``E[gbar_i^2] = (1/B) E[g_i^2] + (1 - 1/B) (E g_i)^2``. So
  ``B * v_hat`` estimates ``E[g_i^2] + (B - 1) (E g_i)^2``: the diagonal of the **empirical
  Fisher per sample** (``fimfast.FIMType.EMPIRICAL`` with ``reduction="mean"``, observed labels)
  plus ``B - 1`` times the squared mean gradient, which is small only near a stationary point
  of the training loss. This is what :func:`from_optimizer` returns with ``batch_size=B``.

It is **not the Fisher**: the empirical Fisher uses the observed labels instead of labels drawn
from the model (Kunstner et al., 2019, show how the two differ), and on top of that the
accumulator mixes past parameters and carries the mean-gradient term. Assumptions behind the
scale: the loss is the mean cross-entropy over ``B`` samples with nothing added (Adam's own L2
``weight_decay`` adds ``lambda * theta`` to ``gbar``; AdamW's decoupled decay does not), no
gradient clipping changed ``gbar``, and with gradient accumulation ``B`` is the effective batch
(micro-batch times accumulation steps; the mean over micro-batches).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fimfast.diagfim import DiagFIM

__all__ = ["from_optimizer"]

ESTIMATOR = "adam_exp_avg_sq"


def from_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    batch_size: int | None = None,
    bias_correction: bool = True,
    reduction: str = "mean",
    n_data: int | None = None,
) -> DiagFIM:
    """Adam's (or AdamW's) ``exp_avg_sq`` as a DiagFIM keyed by the model's parameter names.

    Args:
        optimizer: a ``torch.optim`` optimizer with an ``exp_avg_sq`` state (Adam, AdamW, NAdam,
            RAdam), after at least one step.
        model: the module whose parameters the optimizer updates (names come from it).
        batch_size: ``B``, the number of samples the loss was averaged over at each step. Given,
            the result is ``B * v_hat``, an estimate of the per-sample empirical Fisher diagonal
            (plus ``(B - 1) (E g)^2``, see the module docstring). ``None``: ``v_hat`` itself, the
            EMA of squared mini-batch gradients.
        bias_correction: divide by ``1 - beta2^t`` (Adam's own correction; ``t`` is the
            parameter's step count).
        reduction: ``"mean"`` (per sample), or ``"sum"`` (times ``n_data``, the training set
            size, for uses such as a Laplace posterior that need a sum over the data).
        n_data: the training set size, for ``reduction="sum"``.

    Returns:
        A :class:`DiagFIM` over the trainable parameters the optimizer holds, float32 (float64
        for float64 parameters), with ``meta["fim_type"] = "adam_exp_avg_sq"``, ``beta2``,
        ``step``, ``batch_size`` and ``reduction``.

    Raises:
        TypeError: the optimizer keeps no ``exp_avg_sq``.
        ValueError: a parameter has no state yet (no step taken), the optimizer holds parameters
            the model lacks, or an argument is invalid.
    """
    _check_args(optimizer, model, batch_size, reduction, n_data)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    betas, steps = set(), set()
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        beta2 = float(group.get("betas", (None, None))[1] or 0.0)
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        if wd > 0 and not (decoupled or group.get("decoupled_weight_decay", False)):
            warnings.warn(
                f"the optimizer's L2 weight_decay={wd} was added to the gradients before they were "
                "squared: exp_avg_sq includes weight_decay * theta",
                stacklevel=2,
            )
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in model")
            v, t = _exp_avg_sq(optimizer, p, names[id(p)], beta2, bias_correction)
            if batch_size is not None:
                v.mul_(batch_size)
            if reduction == "sum":
                v.mul_(n_data)
            out[names[id(p)]] = v
            betas.add(beta2)
            steps.add(t)
    if not out:
        raise ValueError("the optimizer holds no trainable parameter of model")
    order = [n for n, _ in model.named_parameters() if n in out]
    return DiagFIM(
        {n: out[n] for n in order},
        _meta(reduction, batch_size, betas, steps, bias_correction, n_data),
    )


def _meta(reduction, batch_size, betas, steps, bias_correction, n_data) -> dict:
    return {
        "fim_type": ESTIMATOR,
        "estimator": ESTIMATOR,
        "reduction": reduction,
        "batch_size": batch_size,
        "beta2": sorted(betas)[0] if len(betas) == 1 else sorted(betas),
        "step": max(steps),
        "bias_correction": bias_correction,
        "count": n_data if reduction == "sum" else None,
        "note": (
            "EMA of squared mini-batch gradients of the mean loss"
            + (" times the batch size: ~ empirical Fisher per sample" if batch_size else "")
            + "; not the Fisher"
        ),
    }


def _check_args(optimizer, model, batch_size, reduction, n_data) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not hasattr(optimizer, "state") or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch.optim optimizer; got {type(optimizer)}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1 or None; got {batch_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if reduction == "sum" and (not isinstance(n_data, int) or n_data < 1):
        raise ValueError(f"reduction='sum' needs n_data, the training set size; got {n_data!r}")


def _exp_avg_sq(
    optimizer, p: torch.Tensor, name: str, beta2: float, bias_correction: bool
) -> tuple[torch.Tensor, int]:
    """A copy of the parameter's ``exp_avg_sq`` (bias-corrected if asked) and its step count."""
    state = optimizer.state.get(p, {})
    if "exp_avg_sq" not in state:
        if not state and any("exp_avg_sq" in s for s in optimizer.state.values()):
            raise ValueError(
                f"parameter {name!r} has no optimizer state yet (no step with a gradient for it)"
            )
        raise TypeError(
            f"{type(optimizer).__name__} keeps no exp_avg_sq for {name!r} (an "
            "Adam-family optimizer after at least one step is needed)"
        )
    v = state["exp_avg_sq"].detach()
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    v = v.to(dt).clone()
    t = int(state["step"]) if "step" in state else 0
    if bias_correction:
        if t < 1:
            raise ValueError(f"{name!r}: step count {t}; no update was taken")
        v.div_(1.0 - beta2**t)
    return v, t
