"""The registry of named experiments: what ``fimfast run <experiment>`` can run.

An experiment is a name, a one-line summary and a ``prepare(seed, cache_dir, retrain)`` function
that returns a :class:`Setup`: a trained model in eval mode and a deterministic sampler of the
batches its Fisher is estimated on. Built-in experiments register themselves when
:mod:`fimfast.experiments` is imported; their modules import nothing heavy at import time (datasets,
``transformers`` and ``scikit-learn`` are loaded by ``prepare``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Experiment",
    "Setup",
    "experiment_names",
    "get_experiment",
    "register",
]


@dataclass
class Setup:
    """A prepared experiment.

    Attributes:
        model: the trained network, in eval mode, with ``requires_grad`` set on the parameters whose
            Fisher is estimated.
        batches: ``batches(num_batches, batch_size, seed)`` yields the batches (``(x, y)`` tuples or
            Hugging Face style mappings with ``labels``); the same arguments give the same batches.
        model_desc: one line describing the network.
        dataset_desc: one line describing the data the Fisher is estimated on.
        num_classes: ``C``, the number of logits.
        info: training schedule, accuracies, timings and data provenance (goes to the metadata).
        fisher_opts: extra options of :class:`fimfast.DiagFisher` the experiment needs.
    """

    model: torch.nn.Module
    batches: Callable[[int, int, int], Iterator[Any]]
    model_desc: str
    dataset_desc: str
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    fisher_opts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """A named experiment.

    Attributes:
        name: the name used on the command line (letters, digits and ``_``).
        summary: one line for ``fimfast run --help``.
        prepare: ``prepare(seed: int, cache_dir: Path | None, retrain: bool) -> Setup``. With a
            ``cache_dir`` the trained weights are cached there and reused unless ``retrain``.
        requires: import names of the optional packages it needs (reported when missing).
        defaults: ``num_batches`` / ``batch_size`` used when the command line gives none (the
            design defaults 128 and 64 otherwise).
        num_classes: ``C``, when known without preparing the experiment: options that depend on
            it (``top_k <= C - 1``) are then checked before any training.
    """

    name: str
    summary: str
    prepare: Callable[[int, Path | None, bool], Setup]
    requires: tuple[str, ...] = ()
    defaults: dict[str, int] = field(default_factory=dict)
    num_classes: int | None = None


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment, replace: bool = False) -> Experiment:
    """Add an experiment to the registry (``replace=True`` to overwrite a name).

    Raises:
        ValueError: the name is not an identifier, or is taken and ``replace`` is false.
    """
    if not isinstance(experiment, Experiment):
        raise TypeError(f"experiment must be an Experiment; got {type(experiment).__name__}")
    name = experiment.name
    if not name.isidentifier():
        raise ValueError(f"experiment name must be letters, digits and '_'; got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"experiment name {name!r} is already registered")
    _REGISTRY[name] = experiment
    return experiment


def unregister(name: str) -> None:
    """Remove an experiment from the registry (no error when absent)."""
    _REGISTRY.pop(name, None)


def experiment_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``.

    Raises:
        ValueError: no such experiment (the message lists the registered names).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"experiment must be one of {', '.join(experiment_names())}; got {name!r}"
        ) from None
