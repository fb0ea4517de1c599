"""Candidate KFACs of a LayerNorm's affine map against its true Fisher block (docs/structured.md,
"KFAC", nn.LayerNorm).

A ``Linear(10, D) - LayerNorm(D) - tanh - Linear(D, 5)`` network in float64 with a perturbed
affine map; EXACT Fisher, ``reduction="sum"``. The true ``(2D, 2D)`` block of the LayerNorm comes
from ``representation="dense"``; fimfast's KFAC gives ``G`` ``(D, D)`` and ``A`` ``(2D, 2D)``
(second moment of ``vec(a)``, ``a`` the ``(D, 2)`` rows ``(x_hat_d, 1)``), from which every
candidate is built:

* ``G o A`` (fimfast): ``F[(d, i), (e, j)] = G[d, e] A[(d, i), (e, j)]``;
* per feature: ``G[d, d] A[(d, i), (d, j)]`` on the ``(gamma_d, beta_d)`` pairs only;
* Kronecker: ``G (x) A_pair`` with ``A_pair`` the ``2 x 2`` input factor averaged over features;
* the true block restricted to the per-feature pairs (the best any per-feature form can do).

Printed: relative Frobenius error of each, and of its damped solve ``(F + lam I)^-1 v`` on random
vectors (``lam`` = 1e-3 and 1e-1 of the true block's mean diagonal).
Run: ``python -m benchmarks.layernorm_kfac_options``.
"""

from __future__ import annotations

import torch
from torch import nn

import fimfast

D, C = 16, 5


class Net(nn.Module):
    def __init__(self, pool: bool):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(10, D), nn.LayerNorm(D), nn.Linear(D, C)
        self.pool = pool
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.3)
            self.norm.bias.normal_(0, 0.3)

    def forward(self, x):
        z = self.head(torch.tanh(self.norm(self.inp(x))))
        return z.mean(1) if self.pool else z


def candidates(N: int, T: int | None, pool: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{name: (2D, 2D) block}`` in the order ``(gamma_1, beta_1, gamma_2, ...)``, and the
    truth under ``"true"``."""
    torch.manual_seed(seed)
    model = Net(pool).double()
    for p in model.inp.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(False)
    shape = (N, 10) if T is None else (N, T, 10)
    x = torch.randn(shape, dtype=torch.float64) * 2 + torch.randn(10, dtype=torch.float64)
    y = torch.randint(0, C, (N,) if T is None or pool else (N, T))
    data = [(x, y)]
    dense = fimfast.fisher(model, data, "exact", "dense", "sum").to_dense()
    order = torch.arange(2 * D).reshape(2, D).T.reshape(-1)  # (gamma, beta) per feature
    true = dense[order][:, order]
    K = fimfast.fisher(model, data, "exact", "kfac", "sum")
    A, G = K.A[0], K.G[0]
    ones = torch.ones(2, 2, dtype=A.dtype)
    per = torch.block_diag(*(G.diagonal()[d] * A[2 * d:2 * d + 2, 2 * d:2 * d + 2]
                             for d in range(D)))
    pair = sum(A[2 * d:2 * d + 2, 2 * d:2 * d + 2] for d in range(D)) / D
    mask = torch.block_diag(*(ones for _ in range(D)))
    return {"true": true, "G o A (fimfast)": torch.kron(G, ones) * A,
            "per feature G_d A_d": per, "Kronecker G (x) A_pair": torch.kron(G, pair),
            "true on per-feature pairs": true * mask}


def errors(blocks: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    true = blocks["true"]
    eye = torch.eye(true.shape[0], dtype=true.dtype)
    v = torch.randn(true.shape[0], 20, dtype=true.dtype, generator=torch.Generator().manual_seed(1))
    out = {k: [float((b - true).norm() / true.norm())] for k, b in blocks.items() if k != "true"}
    for rel in (1e-3, 1e-1):
        lam = rel * float(true.diagonal().mean())
        want = torch.linalg.solve(true + lam * eye, v)
        for k in out:
            sol = torch.linalg.solve(blocks[k] + lam * eye, v)
            out[k].append(float((sol - want).norm() / want.norm()))
    return out


CASES = {"one sample, one position": (1, None, False),
         "64 samples, one position": (64, None, False),
         "32 x 6 positions, mean-pooled head": (32, 6, True),
         "32 x 6 positions, token-level logits": (32, 6, False)}


def main() -> None:
    for name, (N, T, pool) in CASES.items():
        print(name)
        for k, (fro, s3, s1) in errors(candidates(N, T, pool)).items():
            print(f"  {k:28s} Frobenius {fro:.3f}   solve (1e-3) {s3:.3f}   solve (1e-1) {s1:.3f}")


if __name__ == "__main__":
    main()
