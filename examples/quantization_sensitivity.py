"""Rank parameters by quantisation sensitivity with the Fisher diagonal.

Quantising a tensor moves its weights by ``delta``; to second order the KL divergence between the
model's predictions before and after is ``0.5 * delta^T F delta`` (the Fisher is the Hessian of
that KL at ``delta = 0``). With the Fisher diagonal this predicts, for every tensor and every
bit width, how much quantising it hurts, without quantising anything. The script compares the
prediction with the measured KL, per tensor, and lists the most sensitive individual weights
(largest ``F_ii * delta_i^2``), candidates to keep in higher precision. The predictions come
from :mod:`fimfast.sensitivity`; ``examples/bit_allocation_mnist.py`` turns them into bits per
tensor on MNIST.

    python examples/quantization_sensitivity.py --bits 4
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fimfast
from fimfast.sensitivity import measure_kl, quantization_sensitivity, quantize


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--top", type=int, default=5, help="most sensitive single weights to list")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x = torch.randn(2048, 12, generator=g)
    y = (torch.sin(2 * x[:, :3]).sum(-1) + x[:, 3:6].pow(2).sum(-1) > 3).long() + (x[:, 6] > 0)
    model = nn.Sequential(
        nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    # the Fisher of the model's own predictive distribution: no labels needed
    # on 512 of the inputs, in batches of 64
    F = fimfast.diag_fisher(
        model, [(x[i : i + 64],) for i in range(0, 512, 64)], "exact", reduction="mean"
    )
    params = dict(model.named_parameters())
    rows = []
    for r in quantization_sensitivity(model, F, bits=(args.bits,)):  # predicted, ranked
        delta = {r.name: quantize(params[r.name].detach(), args.bits) - params[r.name].detach()}
        rows.append((r.name, r.predicted, measure_kl(model, delta, [x])))
    print(f"{args.bits}-bit per-tensor quantisation: predicted vs measured KL")
    for name, pr, me in rows:
        print(f"  {name:>10}: predicted {pr:.3e}   measured {me:.3e}")
    rho = spearman([r[1] for r in rows], [r[2] for r in rows])
    print(f"Spearman rank correlation, predicted vs measured: {rho:.3f}")

    # most sensitive single weights: largest F_ii * delta_i^2 over the whole model
    scores = {
        n: F[n] * (quantize(p.detach(), args.bits) - p.detach()) ** 2
        for n, p in model.named_parameters()
    }
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    top = torch.topk(flat, args.top).indices.tolist()
    names = [(n, i) for n, s in scores.items() for i in range(s.numel())]
    top_weights = [(names[i][0], names[i][1], float(flat[i])) for i in top]
    print(f"top {args.top} single weights by F_ii * delta_i^2:")
    for n, i, s in top_weights:
        print(f"  {n}[{i}]  {s:.3e}")
    return {"tensors": rows, "spearman": rho, "top_weights": top_weights}


if __name__ == "__main__":
    main()
