"""Influence functions with EKFAC on MNIST: which training images most support a test prediction.

The influence of training example ``i`` on the loss of test example ``t`` is
``I(i, t) = grad L_t^T (F + lambda I)^-1 grad L_i`` (Koh & Liang 2017, with the Fisher as the
curvature; positive: up-weighting ``i`` lowers the test loss). EKFAC (Grosse et al. 2023) makes
``(F + lambda I)^-1`` cheap; on a model small enough for the dense Fisher the EKFAC influences are
compared with the exact ones (Pearson correlation over the training set), and with KFAC's.
Images are 2x2-average-pooled to 14x14 so the dense Fisher (3322 parameters) fits.

    python examples/ekfac_influence.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fimfast
from fimfast.experiments.data import load_mnist


def data(n_train: int, n_test: int):
    d = load_mnist()

    def pool(a):
        x = torch.from_numpy(a).reshape(-1, 1, 28, 28)
        return nn.functional.avg_pool2d(x, 2).reshape(-1, 196)

    return (pool(d["train"][0][:n_train]), torch.from_numpy(d["train"][1][:n_train]),
            pool(d["test"][0][:n_test]), torch.from_numpy(d["test"][1][:n_test]))


def train(x, y, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(196, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def per_example_grads(model: nn.Module, x, y) -> torch.Tensor:
    """``(n, P)`` loss gradients, parameters in ``named_parameters()`` order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], 1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=5)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    x, y, xt, yt = data(args.n_train, args.n_test)
    model = train(x, y, 300, args.seed)
    loader = [(x[i : i + 250], y[i : i + 250]) for i in range(0, x.shape[0], 250)]
    inv = {rep: fimfast.fisher(model, loader, "exact", representation=rep).inverse(args.damping)
           for rep in ("ekfac", "kfac", "dense")}
    G = per_example_grads(model, x, y)  # (n, P)
    Gt = per_example_grads(model, xt, yt)  # (m, P)
    corr = {"ekfac": [], "kfac": []}
    same_label = []
    for t in range(Gt.shape[0]):
        infl = {rep: G @ F.mv(Gt[t]) for rep, F in inv.items()}  # (F + lambda I)^-1 symmetric
        for rep in corr:
            corr[rep].append(pearson(infl[rep], infl["dense"]))
        top = infl["ekfac"].topk(10).indices
        same_label.append(float((y[top] == yt[t]).float().mean()))
        print(f"test image {t} (label {int(yt[t])}): corr(EKFAC, exact) "
              f"{corr['ekfac'][-1]:.3f}, corr(KFAC, exact) {corr['kfac'][-1]:.3f}; top-10 "
              f"EKFAC proponents share its label: {same_label[-1]:.0%}")
    out = {"corr_ekfac": sum(corr["ekfac"]) / len(corr["ekfac"]),
           "corr_kfac": sum(corr["kfac"]) / len(corr["kfac"]),
           "top10_same_label": sum(same_label) / len(same_label)}
    print(f"mean: corr(EKFAC, exact) {out['corr_ekfac']:.3f}, corr(KFAC, exact) "
          f"{out['corr_kfac']:.3f}, top-10 same label {out['top10_same_label']:.0%}")
    return out


if __name__ == "__main__":
    main()
