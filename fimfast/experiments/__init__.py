"""Experiments of the command-line tool (``fimfast run|viz|metrics|demo``).

Built-in experiments (see :func:`experiment_names`): ``mnist_mlp``, ``mnist_cnn``, ``minilm_text``
and ``digits_mlp``; each registers itself when this package is imported (their modules import
nothing heavy: data, ``transformers`` and ``scikit-learn`` are loaded by ``prepare``). Register your
own with :func:`register`.
"""

from fimfast.experiments import digits_mlp, minilm_text, mnist_cnn, mnist_mlp  # noqa: F401
from fimfast.experiments.registry import (
    Experiment,
    Setup,
    experiment_names,
    get_experiment,
    register,
    unregister,
)

__all__ = [
    "Experiment",
    "Setup",
    "experiment_names",
    "get_experiment",
    "register",
    "unregister",
]
