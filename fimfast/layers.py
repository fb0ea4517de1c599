"""Compatibility module: the per-layer rules now live in :mod:`fimfast.rules`.

Every name this module had is re-exported from there; new code imports :mod:`fimfast.rules`.
"""

from fimfast.rules.attention import MHARule, _mha_forward
from fimfast.rules.base import (
    Outer,
    Rows,
    Rule,
    Term,
    UseKind,
    Vec,
    _acc_dtype,
    _linear_terms,
    _usable,
)
from fimfast.rules.base import front as _front
from fimfast.rules.base import trainable as _trainable
from fimfast.rules.conv import ConvRule, _unfold
from fimfast.rules.embedding import EmbeddingRule
from fimfast.rules.linear import HFConv1DRule, LinearRule
from fimfast.rules.norm import (
    BatchNormRule,
    GroupNormRule,
    LayerNormRule,
    RMSNormRule,
    _ChannelNormRule,
    _NormRule,
)
from fimfast.rules.registry import known_modules, register_rule, rule_for

__all__ = [
    "BatchNormRule",
    "ConvRule",
    "EmbeddingRule",
    "GroupNormRule",
    "HFConv1DRule",
    "LayerNormRule",
    "LinearRule",
    "MHARule",
    "Outer",
    "RMSNormRule",
    "Rows",
    "Rule",
    "Term",
    "UseKind",
    "Vec",
    "_ChannelNormRule",
    "_NormRule",
    "_acc_dtype",
    "_front",
    "_linear_terms",
    "_mha_forward",
    "_trainable",
    "_unfold",
    "_usable",
    "known_modules",
    "register_rule",
    "rule_for",
]
