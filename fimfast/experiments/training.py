"""Deterministic short training of the experiments' networks, with a cache of the trained weights.

Training runs inside :func:`torch.random.fork_rng`, so it neither reads nor changes the caller's
global random state: the same seed gives the same network.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Adam", "accuracy", "train_classifier", "trained"]


class Adam:
    """Adam (Kingma & Ba, 2015) with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8).

    Used instead of ``torch.optim.Adam`` because the first use of ``torch.optim`` imports
    ``torch._dynamo``, which costs seconds per process: more than training these small networks.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' ``.grad`` (parameters without one are left alone)."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)

    def zero_grad(self) -> None:
        """Drop the gradients."""
        for p in self.params:
            p.grad = None


def _as_batch(data: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(idx)
    return {k: v[t] for k, v in data.items()}


def train_classifier(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """Adam on the mean cross-entropy for a fixed number of steps.

    Args:
        model: the network; only its parameters with ``requires_grad`` are trained.
        data: tensors with the same first dimension; ``data["labels"]`` holds the int64 classes.
        forward: ``forward(model, batch) -> logits (N, C)`` for a batch of ``data``'s rows.
        steps, batch_size, lr: the schedule (minibatches drawn without replacement per pass).
        seed: seeds the minibatch order (and dropout, when the model has any in train mode).

    Returns:
        The schedule and the mean loss of the last 10% of the steps.
    """
    n = len(data["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    t0 = time.perf_counter()
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        perm, pos = rng.permutation(n), 0
        for _ in range(steps):
            if pos + batch_size > n:
                perm, pos = rng.permutation(n), 0
            batch = _as_batch(data, perm[pos : pos + batch_size])
            pos += batch_size
            loss = torch.nn.functional.cross_entropy(forward(model, batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
    model.eval()
    for p in params:
        p.grad = None
    tail = max(1, steps // 10)
    return {
        "optimizer": "Adam",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "final_loss": float(np.mean(losses[-tail:])),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    batch_size: int = 1000,
) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly (eval mode)."""
    model.eval()
    n = len(data["labels"])
    right = 0
    for s in range(0, n, batch_size):
        batch = {k: v[s : s + batch_size] for k, v in data.items()}
        right += int((forward(model, batch).argmax(-1) == batch["labels"]).sum())
    return right / n


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def trained(
    model: torch.nn.Module,
    train: Callable[[], dict[str, Any]],
    key: dict[str, Any],
    cache_dir: Path | None,
    retrain: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Train ``model`` with ``train()``, or load its trained parameters from the cache.

    The cache is ``<cache_dir>/<key["experiment"]>_seed<key["seed"]>_model.safetensors``, holding
    the parameters with ``requires_grad`` and ``key`` (the whole recipe) as metadata; it is used
    only when the stored key equals ``key``. Written atomically.

    Returns:
        ``(training info, loaded_from_cache)``.
    """
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{key['experiment']}_seed{key['seed']}_model.safetensors"
    want = json.dumps(key, sort_keys=True)
    if path is not None and path.is_file() and not retrain:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("recipe") == want:
                state = load_file(str(path))
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for n, v in state.items():
                        params[n].copy_(v)
                model.eval()
                return json.loads(meta.get("info", "{}")), True
        except Exception:  # an unreadable cache is rebuilt below
            pass
    info = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        from fimfast.experiments.store import atomic_temp, new_file_mode

        tmp = atomic_temp(path)
        try:
            save_file(
                _trainable_state(model),
                tmp,
                metadata={"recipe": want, "info": json.dumps(info, sort_keys=True)},
            )
            os.chmod(tmp, new_file_mode())  # a new file's permissions (the writer may not)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return info, False
