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
    """The parameters entirely zero at the probes since the verdicts were last dropped."""

    __slots__ = ("_watched",)

    def __init__(self) -> None:
        self._watched: list[torch.Tensor] = []

    def note(self, params: list[torch.Tensor]) -> None:
        """Remember those of ``params`` (the parameters of a step whose verdicts were just
        taken) that are entirely zero."""
        params = [p for p in params if p.numel() and p.is_floating_point()]
        if not params:
            return
        with torch.no_grad():
            norms = torch.stack([n.float().to(params[0].device)
                                 for n in torch._foreach_norm(params, float("inf"))])
        known = {id(p) for p in self._watched}
        for p, zero in zip(params, (norms == 0).tolist()):
            if zero and id(p) not in known:
                self._watched.append(p)

    def moved(self) -> bool:
        """Whether a remembered parameter is no longer entirely zero (then forgets them all: the
        caller drops its verdicts, and the next probes remember afresh)."""
        if not self._watched:
            return False
        with torch.no_grad():
            norms = torch._foreach_norm(self._watched, float("inf"))
            moved = bool(torch.stack([n.float().to(norms[0].device) for n in norms]).ne(0).any())
        if moved:
            self._watched = []
        return moved


class Verdicts(set):
    """A set of the structure keys whose samples were found apart, with the :class:`ZeroWatch` of
    the parameters entirely zero when they were found (:func:`fimfast.structured.apart.
    check_apart` drops them all once one of those parameters moved)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.zeros = ZeroWatch()
