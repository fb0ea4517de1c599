"""The layout of the logits: batch axis first, class axis last, never guessed.

:func:`layout` turns the logits a model returns (and labels and attention mask with them) into
fimfast's ``(N, C)`` or ``(N, T, C)`` rows layout before :func:`fimfast.batch.rows` validates them.
What is refused and why: ``docs/exactness.md``.
"""

from __future__ import annotations

from typing import Any

import torch


def layout(
    logits: torch.Tensor,
    labels: Any,
    mask: Any,
    class_dim: int | None,
    batch_dim: int,
    likelihood: str,
    hf_output: bool,
) -> tuple[torch.Tensor, Any, Any]:
    """Put the logits in fimfast's layout: batch first, classes last, at most one axis between.

    2-D logits are ``(N, C)``. For logits of 3 or more dims the class axis is never guessed:
    ``class_dim`` names it; without it, a Hugging Face output (``.logits``) is ``(N, T, C)`` by
    that library's convention, and categorical labels decide when their shape fits exactly one
    of the two layouts (``(N, T, C)`` with labels ``(N, T)``; ``CrossEntropyLoss``'s
    ``(N, C, d1, ...)`` with labels ``(N, d1, ...)``); anything else is refused. ``batch_dim``
    names the batch axis (``1`` for sequence-first ``(T, N, C)`` logits). The axes between are
    flattened into one token axis; labels and an attention mask of the same leading shape follow
    the logits.

    Raises:
        ValueError: the class or batch axis is out of range, ambiguous or unknown (the message
            names ``class_dim``/``batch_dim``).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        return logits, labels, mask  # rows() raises the error that names the problem
    D = logits.dim()
    if class_dim is not None and not -D <= class_dim < D:
        raise ValueError(
            f"fim_opts['class_dim'] = {class_dim} is out of range for logits of shape "
            f"{tuple(logits.shape)}"
        )
    if D == 2:  # (N, C): batch_dim names the inputs' batch axis only
        if class_dim is not None and class_dim % D != 1:
            raise ValueError(
                f"2-D logits must be (N, C) (class_dim=-1 or 1); got class_dim={class_dim} for "
                f"shape {tuple(logits.shape)}"
            )
        return logits, labels, mask
    if batch_dim >= D:
        raise ValueError(
            f"fim_opts['batch_dim'] = {batch_dim} is out of range for logits of shape "
            f"{tuple(logits.shape)}"
        )
    b = batch_dim
    c = _class_axis(logits, labels, class_dim, b, likelihood, hf_output)
    if c == b:
        raise ValueError(f"fim_opts['class_dim'] and fim_opts['batch_dim'] are the same axis ({c})")
    if (b, c) == (0, D - 1) and D == 3:
        return logits, labels, mask
    middle = [d for d in range(D) if d not in (b, c)]
    lg = logits.permute(b, *middle, c)
    lead = tuple(lg.shape[:-1])
    out = lg.reshape(lead[0], -1, lg.shape[-1])

    def follow(t: Any, what: str) -> Any:  # labels / mask laid out like the logits less classes
        if not isinstance(t, torch.Tensor):
            return t
        if likelihood != "categorical" and t.shape == logits.shape:
            return t.permute(b, *middle, c).reshape(out.shape)
        keep = [d if d < c else d - 1 for d in (b, *middle)]
        if t.dim() == D - 1:
            want = tuple(logits.shape[:c] + logits.shape[c + 1 :])
            if tuple(t.shape) != want:  # a permuted reshape would scramble them silently
                raise ValueError(
                    f"{what} must have shape {want}, laid out like the logits of shape "
                    f"{tuple(logits.shape)} without their class axis (batch_dim={b}); got "
                    f"{tuple(t.shape)}"
                )
            return t.permute(*keep).reshape(out.shape[:-1])
        return t

    return out, follow(labels, "labels"), follow(mask, "attention_mask")


def _class_axis(logits, labels, class_dim, b, likelihood, hf_output) -> int:
    D = logits.dim()
    if class_dim is not None:
        return class_dim % D
    if hf_output:
        return D - 1
    shape = tuple(logits.shape)
    if isinstance(labels, torch.Tensor) and likelihood == "categorical":
        want = tuple(labels.shape)
        fits = [c for c in (D - 1, 1) if c != b and want == shape[:c] + shape[c + 1 :]]
        if len(fits) == 1:
            return fits[0]
        if len(fits) > 1:
            raise ValueError(
                f"logits of shape {shape} with labels of shape {tuple(labels.shape)} fit both "
                "(N, T, C) and (N, C, d...) layouts: pass fim_opts['class_dim'] (-1 or 1)"
            )
    raise ValueError(
        f"logits of shape {shape} have {D} dims and fimfast does not guess the class axis: pass "
        "fim_opts['class_dim'] (class_dim=-1 for token-level (N, T, C) logits, class_dim=1 for "
        "CrossEntropyLoss's (N, C, d1, ...) layout)"
    )


def of_output(output: Any, logits: torch.Tensor, labels: Any, mask: Any, opts: Any):
    """:func:`layout` for the logits of a model ``output`` with the options ``opts``
    (``class_dim``, ``batch_dim``, ``likelihood``): ``(logits, labels, mask)``."""
    hf = not isinstance(output, torch.Tensor) and (
        hasattr(output, "logits") or (isinstance(output, dict) and "logits" in output)
    )
    return layout(logits, labels, mask, opts.class_dim, opts.batch_dim, opts.likelihood, hf)
