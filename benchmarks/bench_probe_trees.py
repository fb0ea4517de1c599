"""CPU time of the ``cpp`` kernel of ``probe_logit_grad`` in two source trees, paired.

Each round runs one child process per tree (in alternating order), each on its own tree's
``fimfast`` (its compiled extension included), one torch thread: per case the median CPU time
(``time.process_time``) of a call over ``--reps`` calls, and of a training step of a small MLP
(forward, cross-entropy, backward) measured in the same child as the scale. Reported: per case and
tree the median over rounds with its range, and the ratio ``new / old`` of the paired medians::

    PYTHONPATH=. python benchmarks/bench_probe_trees.py --trees ../base . --rounds 7 \\
        --out benchmarks/results/probe_confident_rows_cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [  # (mode, R, C)
    ("hutchinson", 256, 10), ("hutchinson", 256, 1000), ("hutchinson", 16, 32000),
    ("empirical", 256, 10), ("empirical", 256, 1000), ("empirical", 16, 32000),
    ("mc", 256, 1000), ("sqrt", 256, 1000),
]


def _child(reps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from fimfast import ops

    def cpu(fn, n):
        ts = []
        for _ in range(n):
            t0 = time.process_time()
            fn()
            ts.append(time.process_time() - t0)
        return statistics.median(ts)

    out = {}
    g = torch.Generator().manual_seed(0)
    for mode, R, C in CASES:
        z = torch.randn(R, C, generator=g) * 3
        y = torch.randint(0, C, (R,), generator=g)
        lab = y if mode == "empirical" else None
        fn = functools.partial(ops.probe_logit_grad, z, mode, 1, 0, 1, labels=lab, backend="cpp")
        fn()
        k = max(1, int(2e6 // (R * C)))  # calls per sample: >= ~2M elements each

        def many(fn=fn, k=k):
            for _ in range(k):
                fn()

        out[f"{mode} {R}x{C}"] = cpu(many, reps) / k
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x, t = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)

    def train():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()

    train()
    out["train_step"] = cpu(train, reps * 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", nargs=2, required=True, help="OLD NEW")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.reps)))
        return
    trees = [os.path.abspath(t) for t in a.trees]
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(a.rounds):
        for t in (trees if r % 2 == 0 else trees[::-1]):
            env = dict(os.environ, PYTHONPATH=t, OMP_NUM_THREADS="1")
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--trees",
                                  *trees, "--reps", str(a.reps)], env=env, cwd=t,
                                 capture_output=True, text=True, check=True)
            runs[t].append(json.loads(res.stdout.strip().splitlines()[-1]))
    old, new = trees
    lines = ["| case | old median us (range) | new median us (range) | new/old paired median "
             "(range) | new / train step |", "|---|---|---|---|---|"]
    summary = {}
    for key in runs[old][0]:
        o = [x[key] * 1e6 for x in runs[old]]
        n = [x[key] * 1e6 for x in runs[new]]
        ratio = [b / c for b, c in zip(n, o)]
        step = statistics.median(x["train_step"] for x in runs[new]) * 1e6
        summary[key] = dict(old=o, new=n, ratio=ratio)
        lines.append(
            f"| {key} | {statistics.median(o):.1f} ({min(o):.1f}-{max(o):.1f}) | "
            f"{statistics.median(n):.1f} ({min(n):.1f}-{max(n):.1f}) | "
            f"{statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}) | "
            f"{statistics.median(n) / step:.3f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(dict(trees=trees, rounds=a.rounds, reps=a.reps, cases=summary), f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
