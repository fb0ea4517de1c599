"""The common setup of experiments whose data are in-memory arrays (MNIST, digits)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fimfast.experiments import data as datalib
from fimfast.experiments.registry import Setup
from fimfast.experiments.training import accuracy, train_classifier, trained

__all__ = ["array_setup"]


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"])


def array_setup(
    name: str,
    build: Any,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    schedule: dict[str, Any],
    *,
    seed: int,
    cache_dir: Path | None,
    retrain: bool,
    model_desc: str,
    dataset_desc: str,
    input_shape: tuple[int, ...],
    provenance: dict[str, Any] | None = None,
) -> Setup:
    """Build (with ``seed``), train (or load from the cache) and wrap a classifier on arrays.

    Args:
        name: experiment name (cache key).
        build: ``build() -> nn.Module``, called under ``torch.manual_seed(seed)``.
        train, test: ``(x, y)`` float32 inputs (flat rows) and int64 labels.
        schedule: ``steps``, ``batch_size``, ``lr`` of :func:`train_classifier`.
        seed, cache_dir, retrain: as for :class:`~fimfast.experiments.registry.Experiment`.
        model_desc, dataset_desc: one-line descriptions for the metadata.
        input_shape: shape of one input as the model takes it (e.g. ``(1, 28, 28)``).
        provenance: data provenance (file, checksum) for the metadata.

    The Fisher batches are drawn from the training split (the Fisher of the trained network on the
    data it was trained on), ``(x, y)`` tuples of float32 ``(B, *input_shape)`` and int64 ``(B,)``.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
    x_tr = torch.from_numpy(train[0]).reshape(-1, *input_shape)
    y_tr = torch.from_numpy(train[1])
    x_te = torch.from_numpy(test[0]).reshape(-1, *input_shape)
    y_te = torch.from_numpy(test[1])
    tr = {"x": x_tr, "labels": y_tr}
    te = {"x": x_te, "labels": y_te}
    key = {"experiment": name, "seed": seed, "recipe": 1, **schedule}
    info, cached = trained(
        model,
        lambda: train_classifier(model, tr, _forward, seed=seed, **schedule),
        key,
        cache_dir,
        retrain,
    )
    info = {
        **info,
        "from_cache": cached,
        "train_accuracy": round(accuracy(model, tr, _forward), 4),
        "test_accuracy": round(accuracy(model, te, _forward), 4),
        **(provenance or {}),
    }

    def batches(num_batches: int, batch_size: int, seed: int) -> Iterator[Any]:
        for idx in datalib.batch_indices(len(y_tr), num_batches, batch_size, seed):
            t = torch.from_numpy(idx)
            yield x_tr[t], y_tr[t]

    return Setup(
        model=model,
        batches=batches,
        model_desc=model_desc,
        dataset_desc=dataset_desc,
        num_classes=int(y_tr.max()) + 1,
        info=info,
    )
