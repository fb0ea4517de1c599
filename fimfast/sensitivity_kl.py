"""``measure_kl``: the measured change of the predictive distribution, the quantity that
:func:`fimfast.sensitivity.predicted_change` predicts (re-exported there).

The reference and the perturbed forward of a batch run with the same random state, so a model in
train mode (dropout) is measured on one sampled sub-network, as the Fisher of a train-mode step is
that sub-network's (a zero perturbation measures 0); buffers that a forward writes (BatchNorm's
running statistics in train mode) are put back afterwards, with the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fimfast.loaders import check_loader

__all__ = ["measure_kl"]


@torch.no_grad()
def measure_kl(
    model: nn.Module,
    delta: Mapping[str, torch.Tensor],
    inputs: Iterable[Any],
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> float:
    """Mean over input rows of ``KL(p_theta || p_{theta + delta})`` of a softmax classifier
    (float64 arithmetic on the logits); parameters and buffers are restored afterwards.

    Args:
        model: the classifier.
        delta: ``{name: perturbation}``.
        inputs: an iterable of batches (one batch is refused: pass ``[batch]``); each is passed
            to ``forward(model, batch)`` (default: ``model(batch)`` for a tensor,
            ``model(batch[0])`` for a tuple or list, ``model(**batch)`` for a mapping without its
            ``labels``).
        forward: how to get ``(N, C)`` logits from a batch (token logits: flatten them to one
            row per token, ``lambda m, b: m(b).flatten(0, -2)``, for the KL per token).

    Both forwards of a batch draw the same random numbers (dropout: the same masks); the default
    generator ends as the reference forwards leave it.
    """
    check_loader(inputs, "inputs")
    fwd = forward or _default_forward
    params = dict(model.named_parameters())
    for n in delta:
        if n not in params:
            raise ValueError(f"delta[{n!r}]: the model has no parameter {n!r}")
    batches = list(inputs)
    saved = {n: params[n].detach().clone() for n in delta}
    buffers = [(b, b.clone()) for b in model.buffers()]
    states, ref = [], []
    try:
        for b in batches:
            states.append(_rng_state())
            ref.append(_log_probs(fwd(model, b)))
        after = _rng_state()
        for n, d in delta.items():
            params[n].add_(d.to(params[n]))
        total, rows = 0.0, 0
        for b, lp, st in zip(batches, ref, states):
            _set_rng_state(st)
            lq = _log_probs(fwd(model, b))
            total += float((lp.exp() * (lp - lq)).sum())
            rows += lp.shape[0]
        _set_rng_state(after)
    finally:
        for n, v in saved.items():
            params[n].copy_(v)
        for b, v in buffers:
            b.copy_(v)
    return total / max(rows, 1)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(
            "measure_kl needs (N, C) logits from forward (one row per input); got shape "
            f"{tuple(logits.shape)}: pass forward= returning them (token logits flattened to one "
            "row per token for the KL per token)"
        )
    return torch.log_softmax(logits.double(), -1)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    return out.logits if hasattr(out, "logits") else out
