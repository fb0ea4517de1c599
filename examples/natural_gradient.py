"""Diagonal natural gradient: SGD preconditioned by the Fisher diagonal, against plain SGD.

Each step takes one forward: ``DiagFisher.train_step`` puts the loss gradient in ``.grad`` and
folds a one-backward Hutchinson estimate of the Fisher diagonal into an exponential moving average;
the update is ``theta -= lr * (F + damping)^-1 grad`` (``DiagFIM.solve``).

    python examples/natural_gradient.py --steps 100
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fimfast


def make_data(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs with badly scaled features (where preconditioning pays off)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    scale = torch.logspace(-2, 2, dim)  # features spanning 4 decades
    return x * scale, y


def make_model(dim: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, classes))


def train(model, x, y, steps, batch_size, lr, damping, precondition, seed) -> float:
    """Train in place; returns the final full-data loss."""
    est = fimfast.DiagFisher(model, "hutchinson", reduction="mean", ema=0.95, seed=seed)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        model.zero_grad(set_to_none=True)
        est.train_step((x[idx], y[idx]))  # loss gradient in .grad, Fisher estimate folded in
        grads = {n: p.grad for n, p in params.items()}
        step = est.result().solve(grads, damping=damping) if precondition else grads
        with torch.no_grad():
            for n, p in params.items():
                p -= lr * step[n]
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    x, y = make_data(2048, 16, 5, args.seed)
    out = {}
    # learning rates: the best of a grid (0.001 .. 1) after 100 steps on this problem, for each
    # (measured: SGD 0.21 at lr=0.1; natural gradient 0.030 at lr=0.05, damping 0.01)
    for name, lr, pre in (("sgd", 0.1, False), ("natural_gradient", 0.05, True)):
        model = make_model(16, 5, args.seed)
        out[name] = train(model, x, y, args.steps, args.batch_size, lr, 1e-2, pre, args.seed)
        print(f"{name:>16}: loss after {args.steps} steps = {out[name]:.4f}")
    return out


if __name__ == "__main__":
    main()
