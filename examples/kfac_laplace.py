"""KFAC Laplace approximation on MNIST: a Gaussian posterior around a trained network.

The posterior ``N(theta_MAP, (F + tau I)^-1)`` is compared with the MAP network's own predictions.

The Fisher (EXACT, summed over the training set) is a KFAC; ``F.inverse(tau)`` is exact for the
damped Kronecker matrix (an EKFAC in the Kronecker eigenbasis) and ``.sample()`` draws from it. The
predictive averages the softmax over posterior draws; the prior precision ``tau`` is chosen on a
validation split by negative log-likelihood (NLL). Reports test NLL, accuracy and expected
calibration error (ECE, 15 bins).

    python examples/kfac_laplace.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fimfast
from fimfast.experiments.data import load_mnist


def splits(n_train: int, n_val: int, n_test: int):
    d = load_mnist()
    tr, va, te = ((torch.from_numpy(a), torch.from_numpy(b)) for a, b in
                  (d["train"], d["valid"], d["test"]))
    return (tr[0][:n_train], tr[1][:n_train]), (va[0][:n_val], va[1][:n_val]), \
        (te[0][:n_test], te[1][:n_test])


def train_map(x, y, steps: int, seed: int) -> nn.Module:
    """A small MLP trained with Adam long enough to be overconfident."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1)
    err = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            err += float(sel.float().mean() * ((pred[sel] == y[sel]).float().mean()
                                               - conf[sel].mean()).abs())
    return err


def predictive(model, theta, draws, x) -> torch.Tensor:
    """Softmax averaged over the parameter vectors ``theta + draws[s]``."""
    probs = 0
    with torch.no_grad():
        for d in draws:
            torch.nn.utils.vector_to_parameters(theta + d, model.parameters())
            probs = probs + torch.softmax(model(x), -1)
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
    return probs / len(draws)


def metrics(probs, y) -> dict[str, float]:
    return {"nll": float(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y)),
            "acc": float((probs.argmax(1) == y).float().mean()), "ece": ece(probs, y)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    (x, y), (xv, yv), (xt, yt) = splits(args.n_train, 1000, 2000)
    model = train_map(x, y, args.steps, args.seed)
    loader = [(x[i : i + 500], y[i : i + 500]) for i in range(0, x.shape[0], 500)]
    F = fimfast.fisher(model, loader, "exact", representation="kfac", reduction="sum")
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    g = torch.Generator().manual_seed(args.seed)
    best = None
    for tau in (1.0, 10.0, 100.0, 1000.0):
        draws = F.inverse(damping=tau).sample(args.samples, generator=g)
        nll = metrics(predictive(model, theta, draws, xv), yv)["nll"]
        print(f"prior precision {tau:>7g}: validation NLL {nll:.4f}")
        if best is None or nll < best[0]:
            best = (nll, tau, draws)
    _, tau, draws = best
    with torch.no_grad():
        out = {"map": metrics(torch.softmax(model(xt), -1), yt),
               "laplace": metrics(predictive(model, theta, draws, xt), yt)}
    out["laplace"]["tau"] = tau
    for k, m in out.items():
        print(f"{k:>8}: test NLL {m['nll']:.4f}  accuracy {m['acc']:.4f}  ECE {m['ece']:.4f}")
    return out


if __name__ == "__main__":
    main()
