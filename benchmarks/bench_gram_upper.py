"""``gram_upper_`` and ``mirror_upper_`` (fimfast/ops/gram.py): the ``cpp`` kernels against the
torch references and a full ``x^T x``, in CPU time (``time.process_time``, one torch thread),
interleaved rounds, on the factors of workload (a) (MLP 784-512-256-10, B=128: inputs of 784,
512 and 256 columns with the bias column and output gradients of 512 and 256 columns, 128 rows).

    PYTHONPATH=. python benchmarks/bench_gram_upper.py [rounds]

Prints the min / median / max over the rounds of the time of all five factors, in ms. The
``(cold)`` rows mirror each factor once after 32 MB of other data were written (the factors out of
the caches, as where a factor is read after the rest of a call), untimed between the factors.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(rounds: int = 30) -> dict:
    from fimfast.ops import gram as gr

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(128, n, generator=g) for n in (785, 513, 257, 512, 256)]
    outs = [torch.empty(x.shape[1], x.shape[1]) for x in xs]
    fns = {
        "full x^T x (mm)": lambda: [torch.mm(x.T, x, out=o) for x, o in zip(xs, outs)],
        "gram_upper_ torch": lambda: [gr.gram_upper_(o, x, False, "torch")
                                      for x, o in zip(xs, outs)],
        "gram_upper_ cpp": lambda: [gr.gram_upper_(o, x, False, "cpp") for x, o in zip(xs, outs)],
        "mirror_upper_ torch": lambda: [gr.mirror_upper_(o, 0.5, "torch") for o in outs],
        "mirror_upper_ cpp": lambda: [gr.mirror_upper_(o, 0.5, "cpp") for o in outs],
    }
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    flush = torch.zeros(8 << 20)
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.process_time()
            for _ in range(5):
                f()
            times[k].append((time.process_time() - t) / 5 * 1e3)
        for backend in ("torch", "cpp"):
            total = 0.0
            for o in outs:
                flush.add_(1.0)
                t = time.process_time()
                gr.mirror_upper_(o, 0.5, backend)
                total += time.process_time() - t
            times.setdefault(f"mirror_upper_ {backend} (cold)", []).append(total * 1e3)
    return {k: (min(v), statistics.median(v), max(v)) for k, v in times.items()}


if __name__ == "__main__":
    res = main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
    for k, (lo, med, hi) in res.items():
        print(f"{k:22s} {lo:.3f} / {med:.3f} / {hi:.3f} ms")
