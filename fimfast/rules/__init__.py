"""Per-layer rules of the fast per-sample engine, one file per layer family, and their registry.

A rule tells the per-sample engine (:mod:`fimfast.persample`) how to get the per-sample squared
gradients of a module's parameters from what the module saw in the forward and the gradient at
its output, without per-sample gradients of the whole model (docs/math.md §4). Modules without a
rule are still estimated exactly, by the slower generic path.

Built-in rules: ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Bilinear``
(:mod:`~fimfast.rules.linear`),
``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (:mod:`~fimfast.rules.conv`),
``nn.Embedding`` and ``nn.EmbeddingBag`` (:mod:`~fimfast.rules.embedding`), ``nn.LayerNorm``,
``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d``, ``nn.InstanceNorm1d/2d/3d``
(:mod:`~fimfast.rules.norm`), ``nn.PReLU`` (:mod:`~fimfast.rules.activation`),
``nn.MultiheadAttention`` (:mod:`~fimfast.rules.attention`), ``nn.RNN``/``nn.LSTM``/``nn.GRU``
(:mod:`~fimfast.rules.recurrent`) and ``nn.RNNCell``/``nn.LSTMCell``/``nn.GRUCell``
(:mod:`~fimfast.rules.cells`). Add one for a module of your own with
:func:`register_rule` (docs/rules.md); :func:`rule_for` says which rule a module gets
(:mod:`~fimfast.rules.registry`).
"""

from fimfast.hooks import Call, Capture, Tap, Use
from fimfast.rules.activation import PReLURule
from fimfast.rules.attention import MHARule
from fimfast.rules.base import Outer, Rows, Rule, Term, UseKind, Vec, front, trainable
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
from fimfast.rules.registry import known_modules, register_rule, rule_for, unregister_rule

__all__ = [
    "BatchNormRule",
    "BilinearRule",
    "Call",
    "Capture",
    "CellRule",
    "ConvRule",
    "ConvTransposeRule",
    "EmbeddingBagRule",
    "EmbeddingRule",
    "GroupNormRule",
    "HFConv1DRule",
    "InstanceNormRule",
    "LayerNormRule",
    "LinearRule",
    "MHARule",
    "Outer",
    "PReLURule",
    "RMSNormRule",
    "RecurrentRule",
    "Rows",
    "Rule",
    "Tap",
    "Term",
    "Use",
    "UseKind",
    "Vec",
    "front",
    "known_modules",
    "register_rule",
    "rule_for",
    "trainable",
    "unregister_rule",
]
