"""``digits_mlp``: scikit-learn's bundled 8x8 digits with a small sigmoid MLP (seconds to run).

64-32-16-10 with sigmoid activations (2,778 parameters), trained with Adam (lr 1e-2, batch 64) for
300 steps on a fixed split of 1,500 training and 297 test images. Meant for quick checks and tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fimfast.experiments import data as datalib
from fimfast.experiments.arrays import array_setup
from fimfast.experiments.mnist_mlp import mlp
from fimfast.experiments.registry import Experiment, Setup, register

SIZES = (64, 32, 16, 10)
SCHEDULE = {"steps": 300, "batch_size": 64, "lr": 1e-2}
NUM_TRAIN = 1500


def prepare(seed: int, cache_dir: Path | None = None, retrain: bool = False) -> Setup:
    """Load the digits, build and train the MLP, return the :class:`Setup`."""
    x, y = datalib.load_digits()
    # a fixed split (independent of the run's seed), so every seed sees the same data
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    return array_setup(
        "digits_mlp",
        lambda: mlp(SIZES),
        (x[tr], y[tr]),
        (x[te], y[te]),
        SCHEDULE,
        seed=seed,
        cache_dir=cache_dir,
        retrain=retrain,
        model_desc="MLP " + "-".join(map(str, SIZES)) + " sigmoid",
        dataset_desc=f"scikit-learn digits 8x8, {NUM_TRAIN} training images",
        input_shape=(64,),
    )


EXPERIMENT = register(
    Experiment(
        "digits_mlp",
        "scikit-learn's 8x8 digits, sigmoid MLP 64-32-16-10 (fast; for checks and tests)",
        prepare,
        num_classes=10,
        requires=("sklearn",),
    )
)
