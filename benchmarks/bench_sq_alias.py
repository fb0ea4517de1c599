"""Rows of a multiple of 1024 bytes against rows padded by 16 floats in the CPU product kernels
(``shared_sq``, ``pair_gram``): the same values and flops, only the row stride differs.

One torch thread, CPU time, the two layouts interleaved in rounds (the order alternating); prints
one JSON line per case with the medians and ranges (ms) and the git sha of the tree imported::

    PYTHONPATH=<tree> python benchmarks/bench_sq_alias.py --rounds 15
    PYTHONPATH=<tree> python benchmarks/bench_sq_alias.py --model --rounds 21

``--model``: instead, one ``DiagFisher`` step (EMPIRICAL, MONTE_CARLO) of a token classifier
whose first Linear has 512 outputs (rows of 2048 bytes): Linear(128, 512) - GELU - Linear(512,
128) over 16 tokens, mean over the tokens, Linear(128, 10); 64 sequences. CPU time per step (ms)
and over the training step's, medians over the rounds; compare trees by alternating processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after PYTHONPATH: the tree it names is the one measured

import fimfast  # noqa: E402
from fimfast import ops  # noqa: E402

PAD = 16


def padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view of a buffer whose last dimension is longer by PAD (same values)."""
    buf = x.new_zeros(*x.shape[:-1], x.shape[-1] + PAD)
    buf[..., : x.shape[-1]] = x
    return buf[..., : x.shape[-1]]


def sq_case(N, T, O, I, pad_a=True):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(N, T, O, generator=g)
    A = torch.randn(N, T, I, generator=g)
    Gp, Ap = padded(G), (padded(A) if pad_a else A)

    def plain():
        return ops.shared_sq(G, A, backend="cpp")

    def pad():
        return ops.shared_sq(Gp, Ap, backend="cpp")

    return plain, pad


def gram_case(M, N, T, O):
    g = torch.Generator().manual_seed(0)
    P = torch.randn(M, N, T, O, generator=g)
    Pp = padded(P)
    out = torch.zeros(N, T * (T + 1) // 2, O)

    def plain():
        return ops.pair_gram(P, out=out.zero_(), backend="cpp").clone()

    def pad():
        return ops.pair_gram(Pp, out=out.zero_(), backend="cpp").clone()

    return plain, pad


CASES = {
    # LSTMCell(32, 128) W_hh: gate rows 512 floats against states of 128
    "shared_sq G(64,16,512) A(64,16,128)": lambda: sq_case(64, 16, 512, 128, pad_a=False),
    "shared_sq G(64,16,1024) A(64,16,256)": lambda: sq_case(64, 16, 1024, 256, pad_a=False),
    # a Linear over tokens: 256 / 512 / 1024 outputs against 256 inputs (both sides 1024*k bytes)
    "shared_sq G(32,32,256) A(32,32,256)": lambda: sq_case(32, 32, 256, 256),
    "shared_sq G(32,32,512) A(32,32,256)": lambda: sq_case(32, 32, 512, 256),
    "shared_sq G(32,32,1024) A(32,32,512)": lambda: sq_case(32, 32, 1024, 512),
    # the swapped path: few inputs, many outputs (G read as vectors)
    "shared_sq G(64,16,1024) A(64,16,32)": lambda: sq_case(64, 16, 1024, 32, pad_a=False),
    # no aliasing, short sums or few inputs (the fused path's rows of G read once per tile)
    "shared_sq G(64,2,256) A(64,2,128)": lambda: sq_case(64, 2, 256, 128),
    "shared_sq G(128,8,48) A(128,8,27)": lambda: sq_case(128, 8, 48, 27),
    "shared_sq G(32,32,192) A(32,32,64)": lambda: sq_case(32, 32, 192, 64),
    # the GEMM path (more than 32 positions)
    "shared_sq G(16,64,256) A(16,64,256)": lambda: sq_case(16, 64, 256, 256),
    # pair_gram: an nn.LSTM of hidden 128 (512 gates), 9 columns, 16 positions
    "pair_gram P(9,32,16,512)": lambda: gram_case(9, 32, 16, 512),
    "pair_gram P(9,32,16,256)": lambda: gram_case(9, 32, 16, 256),
}


def cpu_ms(fn, reps):
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) * 1e3 / reps


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(1)


def model_step(rounds: int) -> dict:
    import torch.nn.functional as F

    from fimfast import DiagFisher

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128), _Mean(),
                          nn.Linear(128, 10))
    x, y = torch.randn(64, 16, 128), torch.randint(0, 10, (64,))

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    fns = {"train": train}
    for kind in ("empirical", "monte_carlo"):
        est = DiagFisher(model, kind, seed=0)
        fns[kind] = lambda est=est: est.step((x, y))
    for f in fns.values():
        for _ in range(3):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append((time.process_time() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"train_ms": round(med["train"], 3)}
    for k in ("empirical", "monte_carlo"):
        row[k + "_ms"] = round(med[k], 3)
        row[k] = round(med[k] / med["train"], 3)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cases", default="")
    ap.add_argument("--model", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tree = os.path.dirname(os.path.dirname(os.path.abspath(fimfast.__file__)))
    sha = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    if args.model:
        row = {"tree": tree, "sha": sha, "load": os.getloadavg()[0], **model_step(args.rounds)}
        print(json.dumps(row), flush=True)
        return
    names = [c for c in CASES if not args.cases or any(k in c for k in args.cases.split(","))]
    for name in names:
        plain, pad = CASES[name]()
        torch.testing.assert_close(plain(), pad())
        t0 = time.perf_counter()
        plain()
        reps = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
        times = {"plain": [], "pad": []}
        for r in range(args.rounds):
            order = [("plain", plain), ("pad", pad)]
            for k, fn in (order if r % 2 == 0 else order[::-1]):
                times[k].append(cpu_ms(fn, reps))
        ratio = [a / b for a, b in zip(times["plain"], times["pad"])]
        row = {"tree": tree, "sha": sha, "case": name, "load": os.getloadavg()[0]}
        for k, v in times.items():
            row[k] = [round(statistics.median(v), 3), round(min(v), 3), round(max(v), 3)]
        row["plain/pad"] = [round(statistics.median(ratio), 2), round(min(ratio), 2),
                            round(max(ratio), 2)]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
