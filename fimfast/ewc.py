"""Elastic weight consolidation: a quadratic penalty that keeps parameters where a Fisher says.

For tasks ``t = 1..T`` with Fisher diagonals ``F_t`` taken at the solutions ``theta*_t``:

* EWC (Kirkpatrick et al., 2017), one term per task:
  ``penalty(theta) = lam/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``.
* Online EWC (Schwarz et al., 2018, "Progress & Compress"), ``gamma`` set: one term whose Fisher
  is the decayed sum ``F* <- gamma * F* + F_t`` and whose anchor is the latest solution
  ``theta*_T``: ``penalty(theta) = lam/2 * sum_i F*_i (theta_i - theta*_T,i)^2``.

Only parameters present in the Fisher **and** trainable in the model (``requires_grad``) are
penalised, so a Fisher taken with only adapter (LoRA) parameters trainable gives a penalty on the
adapters alone, and a frozen backbone costs neither memory nor time.

The scale of ``lam`` depends on the Fisher's reduction: with ``reduction="mean"`` (the Fisher per
sample) ``lam`` plays the role of the number of samples of the old task; a ``reduction="sum"``
Fisher already carries that factor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fimfast.diagfim import DiagFIM
from fimfast.entries import check_entries, nonnegative_number

__all__ = ["EWC"]


class EWC(nn.Module):
    """The EWC penalty ``lam/2 * sum_t (theta - theta*_t)^T diag(F_t) (theta - theta*_t)``.

    Args:
        model: the network being trained; its parameters are read at every call (the module keeps
            references to them, not copies).
        fisher: the Fisher diagonal of the first task (a :class:`~fimfast.DiagFIM` or a mapping
            ``{param_name: tensor}``), taken at ``anchor``.
        anchor: ``{param_name: tensor}`` of the first task's solution; default: a copy of the
            model's current parameters.
        lam: the strength ``lam >= 0``.
        gamma: ``None`` for one penalty term per task (Kirkpatrick et al.), or the decay
            ``0 <= gamma <= 1`` of online EWC (one term: decayed Fisher sum, latest anchor).
        strict: when true, every trainable parameter of ``model`` must have a Fisher entry;
            otherwise trainable parameters without one are left unpenalised.

    Raises:
        ValueError: the Fisher names a parameter the model lacks, or gives it another shape; a
            Fisher entry is negative; with ``strict``, a trainable parameter has no entry; no
            parameter is both trainable and in the Fisher.

    Example:
        >>> F = fimfast.diag_fisher(model, task_a_loader, "exact", reduction="mean")
        >>> ewc = fimfast.EWC(model, F, lam=100.0)          # anchor: the current parameters
        >>> loss = task_b_loss + ewc()                       # differentiable in the parameters
        >>> ewc.consolidate(F_b)                             # after task B: add its term
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: DiagFIM | Mapping[str, torch.Tensor],
        anchor: Mapping[str, torch.Tensor] | None = None,
        lam: float = 1.0,
        gamma: float | None = None,
        strict: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.lam = nonnegative_number(lam, "lam")
        if gamma is not None:
            gamma = nonnegative_number(gamma, "gamma")
            if gamma > 1:
                raise ValueError(f"gamma must be in [0, 1]; got {gamma!r}")
        self.gamma = gamma
        self.strict = bool(strict)
        # plain attributes: the model is not a submodule (its parameters stay out of state_dict)
        self.__dict__["_model"] = model
        named = dict(model.named_parameters())
        trainable = [n for n, p in named.items() if p.requires_grad]
        names = self._check_fisher(fisher, named)
        self.names: list[str] = [n for n in trainable if n in names]
        if not self.names:
            raise ValueError(
                "no parameter is both trainable (requires_grad) in model and present in fisher "
                f"(fisher has {list(names)[:5]}, trainable: {trainable[:5]})"
            )
        if self.strict:
            missing = [n for n in trainable if n not in names]
            if missing:
                raise ValueError(
                    f"strict=True: trainable parameters without a Fisher entry: {missing[:5]}"
                )
        self.num_terms = 0
        self.consolidate(fisher, anchor)

    # -- state -------------------------------------------------------------------------------- #
    def _check_fisher(
        self, fisher: Mapping[str, torch.Tensor], named: Mapping[str, torch.Tensor]
    ) -> list[str]:
        if not isinstance(fisher, Mapping):
            raise TypeError(
                f"fisher must be a DiagFIM or a mapping name -> tensor; got {type(fisher).__name__}"
            )
        for n, f in fisher.items():
            if n not in named:
                raise ValueError(f"fisher[{n!r}]: the model has no parameter {n!r}")
            if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(named[n].shape):
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(
                    f"fisher[{n!r}] must have the parameter's shape {tuple(named[n].shape)}; "
                    f"got {got}"
                )
            check_entries(f.detach(), f"fisher[{n!r}]")
        return list(fisher)

    def _buf(self, kind: str, term: int, i: int) -> torch.Tensor:
        return getattr(self, f"{kind}_{term}_{i}")

    @torch.no_grad()
    def consolidate(
        self,
        fisher: DiagFIM | Mapping[str, torch.Tensor],
        anchor: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a task: its Fisher diagonal, taken at ``anchor`` (default: the current parameters).

        Without ``gamma`` a new penalty term is added; with ``gamma`` the single term becomes
        ``(gamma * F_old + fisher, anchor)``.
        """
        named = dict(self._model.named_parameters())
        self._check_fisher(fisher, named)
        missing = [n for n in self.names if n not in fisher]
        if missing:
            raise ValueError(f"fisher lacks penalised parameters {missing[:5]}")
        if anchor is not None:
            if not isinstance(anchor, Mapping):
                raise TypeError(
                    f"anchor must be a mapping name -> tensor; got {type(anchor).__name__}"
                )
            for n in self.names:
                if n not in anchor or tuple(anchor[n].shape) != tuple(named[n].shape):
                    raise ValueError(
                        f"anchor[{n!r}] must be a tensor of shape {tuple(named[n].shape)}"
                    )
                check_entries(anchor[n].detach(), f"anchor[{n!r}]", nonnegative=False)
        online = self.gamma is not None and self.num_terms == 1
        term = 0 if online else self.num_terms
        for i, n in enumerate(self.names):
            p = named[n]
            # float32 (float64 for float64 parameters) states, whatever the parameter dtype
            dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            f = fisher[n].detach().to(device=p.device, dtype=dt)
            a = (anchor[n] if anchor is not None else p).detach().to(device=p.device, dtype=dt)
            if online:
                f = self.gamma * self._buf("fisher", 0, i) + f
            self.register_buffer(f"fisher_{term}_{i}", f.clone())
            self.register_buffer(f"anchor_{term}_{i}", a.clone())
        if not online:
            self.num_terms += 1

    def fisher(self, term: int = 0) -> DiagFIM:
        """The Fisher diagonal of penalty term ``term`` (online EWC: the decayed sum)."""
        if not 0 <= term < self.num_terms:
            raise IndexError(f"term must be in [0, {self.num_terms}); got {term}")
        return DiagFIM({n: self._buf("fisher", term, i) for i, n in enumerate(self.names)})

    def anchor(self, term: int = 0) -> dict[str, torch.Tensor]:
        """The anchor ``theta*`` of penalty term ``term``."""
        if not 0 <= term < self.num_terms:
            raise IndexError(f"term must be in [0, {self.num_terms}); got {term}")
        return {n: self._buf("anchor", term, i) for i, n in enumerate(self.names)}

    # -- penalty ------------------------------------------------------------------------------ #
    def forward(self, model: nn.Module | None = None) -> torch.Tensor:
        """The penalty at the current parameters of ``model`` (default: the one given at
        construction), a scalar differentiable in them (float32, or float64 for float64
        parameters)."""
        named = dict((model if model is not None else self._model).named_parameters())
        total = None
        for term in range(self.num_terms):
            for i, n in enumerate(self.names):
                f = self._buf("fisher", term, i)
                d = named[n].to(f.dtype) - self._buf("anchor", term, i)
                s = (f * d * d).sum()
                total = s if total is None else total + s
        return 0.5 * self.lam * total

    penalty = forward

    def extra_repr(self) -> str:
        g = "" if self.gamma is None else f", gamma={self.gamma}"
        return f"lam={self.lam}{g}, terms={self.num_terms}, parameters={len(self.names)}"
