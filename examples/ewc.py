"""Elastic weight consolidation (EWC): keep what task A taught while learning task B.

Train on task A, take the Fisher diagonal ``F`` at the solution ``theta_A`` (EXACT, mean over
task A's inputs), then train on task B with the penalty ``lam/2 * (theta - theta_A)^T F
(theta - theta_A)`` (:class:`fimfast.EWC`, differentiable). Plain fine-tuning on B is the
baseline.

    python examples/ewc.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fimfast


def make_task(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs from a task-specific region (a random mean), labels from a random linear teacher:
    one network can solve several such tasks, but training on one overwrites the other."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) + 2 * torch.randn(dim, generator=g)
    teacher = torch.randn(dim, classes, generator=g)
    bias = -(x.mean(0) @ teacher)  # balanced classes
    return x, (x @ teacher + bias).argmax(-1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def fit(model, x, y, steps, penalty=None, lr=0.05, seed=0) -> None:
    """Adam on cross-entropy (+ an optional penalty(model) term), minibatches of 64."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lam", type=float, default=100.0, help="EWC strength")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dim, classes = 20, 4
    xa, ya = make_task(1024, dim, classes, args.seed)
    xb, yb = make_task(1024, dim, classes, args.seed + 1)
    torch.manual_seed(args.seed)
    net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))
    fit(net, xa, ya, args.steps, seed=args.seed)
    acc_a = accuracy(net, xa, ya)

    # Fisher of task A at theta_A: exact diagonal, mean over task A's inputs (labels not needed)
    # 256 inputs in batches of 64 are plenty for a diagonal that only weighs the penalty
    F = fimfast.diag_fisher(
        net, [(xa[i : i + 64],) for i in range(0, 256, 64)], "exact", reduction="mean"
    )
    # the anchor theta_A: a copy of the parameters now; the penalty reads the model it is given
    ewc = fimfast.EWC(net, F, lam=args.lam)

    out = {"task_a_before": acc_a}
    for name, penalty in (("finetune", None), ("ewc", ewc)):
        model = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))
        model.load_state_dict(net.state_dict())
        fit(model, xb, yb, args.steps, penalty, seed=args.seed + 1)
        out[f"{name}_task_a"] = accuracy(model, xa, ya)
        out[f"{name}_task_b"] = accuracy(model, xb, yb)
    print(f"task A accuracy after training on A: {acc_a:.3f}")
    for name in ("finetune", "ewc"):
        print(
            f"{name:>8} on B -> task A {out[name + '_task_a']:.3f}, "
            f"task B {out[name + '_task_b']:.3f}"
        )
    return out


if __name__ == "__main__":
    main()
