"""The table of rules: ``{module class: rule}``, its lookup and its public registration.

Lookup (:func:`rule_for`) walks the module's class hierarchy (``type(module).__mro__``) and stops
at the first class with a rule. The rule applies when the module runs that class's own
``forward`` (``type(module).forward is cls.forward``, and no ``forward`` was set on the instance
itself, as ``module.forward = fn`` or a wrapping library does) and :meth:`Rule.accepts` the module;
otherwise the module has no rule and its parameters take the engine's generic path. So a subclass
that only adds attributes or changes ``__init__`` (torch's ``NonDynamicallyQuantizableLinear``,
a user's ``MyLinear(nn.Linear)`` with a custom initialisation) keeps its parent's rule, and a
subclass that overrides ``forward`` computes something the rule was not written for: it needs a
rule of its own, registered for its own class (the most specific registered class wins).

Hugging Face's ``transformers.pytorch_utils.Conv1D`` has a rule too, entered in the table the
first time a lookup runs after ``transformers`` was imported (never imported here).
"""

from __future__ import annotations

import sys

from torch import nn

from fimfast.rules.activation import PReLURule
from fimfast.rules.attention import MHARule
from fimfast.rules.base import Rule
from fimfast.rules.cells import CellRule
from fimfast.rules.conv import ConvRule, ConvTransposeRule
from fimfast.rules.embedding import EmbeddingBagRule, EmbeddingRule
from fimfast.rules.linear import BilinearRule, HFConv1DRule, LinearRule
from fimfast.rules.norm import (
    BatchNormRule,
    GroupNormRule,
    InstanceNormRule,
    LayerNormRule,
    RMSNormRule,
)
from fimfast.rules.recurrent import RecurrentRule

_TABLE: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.ConvTranspose1d: ConvTransposeRule(),
    nn.ConvTranspose2d: ConvTransposeRule(),
    nn.ConvTranspose3d: ConvTransposeRule(),
    nn.Embedding: EmbeddingRule(),
    nn.EmbeddingBag: EmbeddingBagRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.modules.batchnorm._BatchNorm: BatchNormRule(),  # BatchNorm1d/2d/3d share its forward
    nn.modules.instancenorm._InstanceNorm: InstanceNormRule(),  # InstanceNorm1d/2d/3d
    nn.PReLU: PReLURule(),
    nn.Bilinear: BilinearRule(),
    nn.MultiheadAttention: MHARule(),
    nn.RNN: RecurrentRule(),
    nn.LSTM: RecurrentRule(),
    nn.GRU: RecurrentRule(),
    nn.RNNCell: CellRule(),
    nn.LSTMCell: CellRule(),
    nn.GRUCell: CellRule(),
}
if hasattr(nn, "RMSNorm"):
    _TABLE[nn.RMSNorm] = RMSNormRule()

# rules for classes of packages never imported here: (module, class name) -> rule, moved into
# the table once that module is imported
_LAZY: dict[tuple[str, str], Rule] = {("transformers.pytorch_utils", "Conv1D"): HFConv1DRule()}


def _resolve_lazy() -> None:
    for (modname, clsname), rule in list(_LAZY.items()):
        mod = sys.modules.get(modname)
        cls = getattr(mod, clsname, None) if mod is not None else None
        if isinstance(cls, type):
            del _LAZY[(modname, clsname)]
            _TABLE.setdefault(cls, rule)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``, or ``None`` (its parameters then take the generic path).

    The first class of ``type(module).__mro__`` with a registered rule decides; the rule applies
    if the module runs that class's ``forward`` and the rule accepts the module's configuration
    (see the module docstring).
    """
    if _LAZY:
        _resolve_lazy()
    if "forward" in module.__dict__:  # a forward set on the instance computes something else
        return None
    cls = type(module)
    for base in cls.__mro__:
        rule = _TABLE.get(base)
        if rule is not None:
            if cls.forward is not base.forward:
                return None
            return rule if rule.accepts(module) else None
    return None


def register_rule(module_type: type[nn.Module], rule: Rule, *, replace: bool = False) -> None:
    """Register ``rule`` for the modules of class ``module_type`` (and its subclasses that keep
    its ``forward``), for every estimator created afterwards.

    Args:
        module_type: a subclass of ``torch.nn.Module``.
        rule: an instance of a subclass of :class:`fimfast.rules.Rule` that implements
            ``capture`` (or ``install``) and ``terms`` (docs/rules.md).
        replace: replace the rule already registered for exactly ``module_type`` (a built-in
            one included) instead of raising.

    Raises:
        TypeError: ``module_type`` is not a ``nn.Module`` subclass, ``rule`` is not a rule
            instance or does not implement the methods, or ``replace`` is not a bool.
        ValueError: ``module_type`` already has a rule and ``replace`` is False.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"module_type must be a subclass of torch.nn.Module, got {module_type!r}"
        )
    _check_rule(rule)
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be a bool, got {replace!r}")
    lazy = (module_type.__module__, module_type.__qualname__)
    if (module_type in _TABLE or lazy in _LAZY) and not replace:
        have = _TABLE.get(module_type) or _LAZY[lazy]
        raise ValueError(
            f"module_type {module_type.__qualname__} already has a rule "
            f"({type(have).__name__}); pass replace=True to replace it"
        )
    _LAZY.pop(lazy, None)
    _TABLE[module_type] = rule


def unregister_rule(module_type: type[nn.Module]) -> Rule:
    """Remove the rule registered for exactly ``module_type`` and return it (its modules then
    take the parent class's rule if the parent's ``forward`` is theirs, else the generic path).

    Raises:
        KeyError: ``module_type`` has no rule of its own.
    """
    if _LAZY:
        _resolve_lazy()
    if module_type not in _TABLE:
        raise KeyError(f"module_type {module_type!r} has no registered rule")
    return _TABLE.pop(module_type)


def known_modules() -> list[str]:
    """Names of the module classes with a rule."""
    return [cls.__name__ for cls in _TABLE] + [f"{m}.{c}" for m, c in _LAZY]


def _check_rule(rule: object) -> None:
    if isinstance(rule, type):
        raise TypeError(
            f"rule must be an instance of a Rule subclass, got the class {rule.__qualname__}; "
            f"pass {rule.__qualname__}()"
        )
    if not isinstance(rule, Rule):
        raise TypeError(
            f"rule must be an instance of a subclass of fimfast.rules.Rule, got {rule!r}"
        )
    cls = type(rule)
    if cls.capture is Rule.capture and cls.install is Rule.install:
        raise TypeError(f"rule {cls.__qualname__} must implement capture (or install)")
    if cls.terms is Rule.terms:
        raise TypeError(f"rule {cls.__qualname__} must implement terms")
    if not isinstance(getattr(rule, "name", None), str):
        raise TypeError(f"rule {cls.__qualname__} must have a str attribute name")
