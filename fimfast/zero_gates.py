"""Parameters entirely zero when the samples' independence was probed.

The independence probes (:mod:`fimfast.persample.probe`, :mod:`fimfast.structured.apart`) read the
gradients of one step: a coupling of the samples behind a factor that is exactly zero on that step
sends no gradient across the samples and is not seen. Such factors are common at initialisation: a
residual branch's last BatchNorm weight set to zero (``zero_init_residual``), a ReZero or SkipInit
scalar gate, a LoRA ``B`` matrix, a zero-initialised convolution. The verdicts are kept per
structure, so the coupling would stay unseen once the factor moved (a layer under a zero-initialised
gate over a BatchNorm in train mode: 87-96% off the oracle from the second step on).
:class:`ZeroWatch` remembers the parameters that were entirely zero when verdicts were taken and
tells, at the cost of one largest magnitude per such parameter per step (none in the common case:
no parameter entirely zero), when one of them is no longer zero; the verdicts are then dropped and
taken again.
"""

from __future__ import annotations

import torch

__all__ = ["Verdicts", "ZeroWatch"]


class ZeroWatch:
    """The positions, in a step's parameter list, of the parameters entirely zero at the probes
    since the verdicts were last dropped. Positions, not the tensors: a step's parameters may be
    other tensors at each step (FSDP2 registers the unsharded ones its forward used), and a
    list of another length drops the verdicts."""

    __slots__ = ("_at", "_count")

    def __init__(self) -> None:
        self._at: list[int] = []
        self._count = 0

    def note(self, params: list[torch.Tensor]) -> None:
        """Remember those of ``params`` (the parameters of a step whose verdicts were just
        taken) that are entirely zero."""
        at = [i for i, p in enumerate(params) if p.numel() and p.is_floating_point()]
        if not at:
            return
        zero = _zero([params[i] for i in at])
        if self._at and self._count != len(params):
            self._at = []
        self._count = len(params)
        known = set(self._at)
        self._at += [i for i, z in zip(at, zero) if z and i not in known]

    def moved(self, params: list[torch.Tensor]) -> bool:
        """Whether a remembered parameter of this step's ``params`` is no longer entirely zero,
        or the list has another length (then forgets them all: the caller drops its verdicts,
        and the next probes remember afresh)."""
        if not self._at:
            return False
        moved = len(params) != self._count or not all(_zero([params[i] for i in self._at]))
        if moved:
            self._at = []
        return moved


def _zero(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is entirely zero (its largest magnitude 0: no underflow; NaN is not
    zero), in one device round trip."""
    with torch.no_grad():
        big = torch._foreach_norm(tensors, float("inf"))
        big = torch.stack([b.float().to(big[0].device) for b in big])
    return (big == 0).tolist()


class Verdicts(set):
    """A set of the structure keys whose samples were found apart, with the model structure's
    trainable ``params`` and the :class:`ZeroWatch` of those entirely zero when they were found
    (:func:`fimfast.structured.apart.check_apart` drops them all once one of them moved)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = params
        self.zeros = ZeroWatch()
