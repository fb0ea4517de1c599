"""The softmax with ``1 - p`` of its leading classes, accurate on confident rows (torch).

On a confident row (in float32, the top logit about 11 or more above the others) ``1 - p_max`` is
within a few hundred ulps of 1: formed as ``1 - p`` it is a difference of numbers near 1 and
keeps none of its relative accuracy. With ``e = exp(z - max)`` and ``S = sum e``, a leading class
(``z_c == max``) has ``e_c = 1`` exactly, and ``1 - p_c = (S - 1) / S`` with ``S - 1`` summed from
the other classes' exponentials (the ``e`` below the max, plus 1 for each further tied class):
no difference of numbers near 1 is formed. The other classes have ``p_c <= 1/2``, so their
``1 - p_c`` is accurate as it is.

The same split serves HUTCHINSON's mix ``u = w - p (sum w)`` (``w = sqrt(p) xi``): at a leading
class, with ``d_below`` and ``d_lead`` the sums of ``w`` below the max and at it (the tied classes'
``w`` have one magnitude, so ``k = d_lead / w_c`` is an exact integer),
``u_c = w_c (below + ties - k) / S - p_c d_below``: ``ties - k`` is twice the number of tied
classes of the other sign, and no difference of numbers near 1 (or near 1/2, two tied classes of
one sign) is formed. Every backend of :func:`fimfast.ops.probe_logit_grad` forms these so:
:mod:`fimfast.ops.triton.probe_logit_grad`, :mod:`fimfast.ops.triton.lm_head_probe` (the sums
carried online over column tiles) and csrc/cuda/probe_logit_grad.cu as here;
csrc/cpu/probe_logit_grad_kernel.h in units of ``p``, and only on the rows where the plain forms
cancel (a leading class above 1/2, or tied leading classes), so that its softmax is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Soft(NamedTuple):
    """A row softmax split at its leading classes (``z_c`` equal to the row max, ``e_c = 1``):
    ``p`` the probabilities, ``lead`` their mask, ``below`` ``(..., 1)`` the sum of the other
    classes' ``e``, ``ties`` the number of leading classes, ``s = below + ties`` the sum."""

    p: torch.Tensor
    lead: torch.Tensor
    below: torch.Tensor
    ties: torch.Tensor
    s: torch.Tensor

    @property
    def q(self) -> torch.Tensor:
        """``(..., 1)`` ``1 - p`` of a leading class, ``(below + ties - 1) / s``."""
        return (self.below + (self.ties - 1)) / self.s

    def one_minus(self) -> torch.Tensor:
        """``1 - p`` of every class: :attr:`q` at the leading classes (the others have
        ``p <= 1/2``)."""
        return torch.where(self.lead, self.q.expand_as(self.p), 1 - self.p)


def softmax_rest(z: torch.Tensor) -> Soft:
    """:class:`Soft` of logits ``z`` (``(..., C)``, softmax over the last axis)."""
    m = z.amax(-1, keepdim=True)
    lead = z == m
    e = torch.exp(z - m)  # 1 at a leading class; nan throughout a row whose max is not finite
    below = torch.where(lead, torch.zeros_like(z), e).sum(-1, keepdim=True)
    below = torch.where(torch.isfinite(m), below, torch.full_like(below, float("nan")))
    ties = lead.sum(-1, keepdim=True).to(z.dtype)
    s = below + ties
    return Soft(e / s, lead, below, ties, s)


def score(soft: Soft, y: torch.Tensor) -> torch.Tensor:
    """``e_y - p`` with ``1 - p_y`` accurate; ``y`` int64 labels ``(..., R)`` for ``p`` of
    ``(R, C)``; returns ``(..., R, C)``."""
    p = soft.p
    out = (-p).expand(*y.shape, p.shape[-1]).clone()
    at = y.unsqueeze(-1)
    om = soft.one_minus().expand_as(out)
    out.scatter_(-1, at, torch.gather(om, -1, at))
    return out


def mix(w: torch.Tensor, soft: Soft) -> torch.Tensor:
    """HUTCHINSON's ``u = w - p sum(w)`` over the last axis (``w`` ``(..., R, C)``), at the
    leading classes as the module docstring forms it."""
    p, lead = soft.p, soft.lead
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    d_below = torch.where(lead, zero, w).sum(-1, keepdim=True)
    d_lead = torch.where(lead, w, zero).sum(-1, keepdim=True)
    at_lead = w * ((soft.below + (soft.ties - d_lead / w)) / soft.s) - p * d_below
    return torch.where(lead, at_lead, w - p * (d_below + d_lead))


def mix_at(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`mix` of ``w`` at logits ``z`` (in ``w``'s dtype): the cotangent at the logits of
    ``sum w * log_softmax(z)``, which torch's own ``log_softmax`` backward forms as
    ``w - p sum(w)`` with the cancellation at a confident row's leading class."""
    return mix(w, softmax_rest(z.detach().to(w.dtype)))
