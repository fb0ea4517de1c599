"""A test-only experiment: a tiny sigmoid MLP on scikit-learn's digits, trained for 20 steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fimfast.experiments import Experiment, Setup, register, unregister
from fimfast.experiments.arrays import array_setup
from fimfast.experiments.mnist_mlp import mlp

NAME = "tiny_digits"
SIZES = (64, 8, 10)


def prepare(seed: int, cache_dir: Path | None = None, retrain: bool = False) -> Setup:
    """A 64-8-10 sigmoid MLP on 400 digits images (20 Adam steps)."""
    pytest.importorskip("sklearn", reason="the tiny test experiment uses scikit-learn's digits")
    from fimfast.experiments.data import load_digits

    x, y = load_digits()
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:400], perm[400:600]
    return array_setup(
        NAME,
        lambda: mlp(SIZES),
        (x[tr], y[tr]),
        (x[te], y[te]),
        {"steps": 20, "batch_size": 32, "lr": 1e-2},
        seed=seed,
        cache_dir=cache_dir,
        retrain=retrain,
        model_desc="MLP 64-8-10 sigmoid",
        dataset_desc="400 digits",
        input_shape=(64,),
    )


def register_tiny() -> None:
    """Register the experiment (idempotent)."""
    register(Experiment(NAME, "test-only tiny digits MLP", prepare), replace=True)


def unregister_tiny() -> None:
    """Remove it again."""
    unregister(NAME)
