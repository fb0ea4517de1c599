"""ATen operators one call dispatches: the kernel launches of a step on a GPU.

:class:`OpCounter` is a ``TorchDispatchMode``: it sits below autograd (the ``Python`` dispatch key),
so it sees what actually runs, the backward pass's operators included (the autograd engine carries
the mode to the thread that runs the backward), composite operators already decomposed, and each
operator once at the top level: an operator's own internal calls run with the mode disabled and
are not counted. A custom operator (``fimfast::...``, registered with ``torch.library``) counts as
one. View operators (``view``, ``t``, ``expand``, ``as_strided``, ...) launch no kernel; they are
counted apart (``views``), so ``ops - views`` is the number of kernels a GPU would launch, up to
the few operators that launch none (``empty``) or several.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_ops"]


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active: ``calls`` by operator
    (``aten.add``), ``ops`` by overload (``aten.add.Tensor``), ``views`` the view operators."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.views = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # else torch wraps __torch_dispatch__ in torch._disable_dynamo, whose first call imports
        # torch._dynamo: seconds, inside the first counted call of every process
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        self.ops[str(func)] += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def count_ops(fn: Callable[[], object], top: int = 8) -> dict:
    """Run ``fn()`` once under an :class:`OpCounter`.

    Returns:
        ``{"ops": total operator calls, "views": of which views (no kernel), "top": the ``top``
        most frequent operators as ``[name, count]``}``.
    """
    with OpCounter() as counter:
        out = fn()
    del out
    return {"ops": counter.total, "views": counter.views,
            "top": [[k, v] for k, v in counter.calls.most_common(top)]}
