"""Masked and pruned weights at the size of workload (a): an MLP 784-512-256-10, batch 128,
plain, with ``F.linear(x, W * mask, b)`` (half the entries of each weight masked) and pruned by
``torch.nn.utils.prune.l1_unstructured`` (half of each weight). Each estimator's step (EXACT,
EMPIRICAL, MONTE_CARLO, HUTCHINSON) as a ratio to a training step (forward, cross-entropy,
backward into ``.grad``) of the same model: CPU time of the process, one torch thread, the median
of 7 steps each, estimator steps and training steps alternating.

``python benchmarks/bench_masked.py --trees A B --rounds 3`` runs one child process per tree and
round (trees in turn, each on ``PYTHONPATH``) and prints the medians over the rounds with their
range; ``--child`` runs one measurement and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TYPES = ("exact", "empirical", "monte_carlo", "hutchinson")


def _models():
    import torch
    import torch.nn.functional as F
    import torch.nn.utils.prune as prune
    from torch import nn

    def plain():
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                             nn.Linear(256, 10))

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(784, 512), nn.Linear(512, 256),
                                         nn.Linear(256, 10)])
            for i, layer in enumerate(self.layers):
                self.register_buffer(f"m{i}", (torch.rand(layer.weight.shape) > 0.5).float())

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = F.linear(x, layer.weight * getattr(self, f"m{i}"), layer.bias)
                x = torch.relu(x) if i < 2 else x
            return x

    pruned = plain()
    for i in (0, 2, 4):
        prune.l1_unstructured(pruned[i], "weight", amount=0.5)
    return {"plain": plain(), "masked": Masked(), "pruned": pruned}


def child() -> dict:
    import torch
    import torch.nn.functional as F

    import fimfast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    out = {}
    for name, m in _models().items():
        def train(m=m):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()

        for t in TYPES:
            est = fimfast.DiagFisher(m, t, seed=0)
            est.step((x, y))
            train()
            steps, floor = [], []
            for _ in range(7):
                t0 = time.process_time()
                est.step((x, y))
                steps.append(time.process_time() - t0)
                t0 = time.process_time()
                train()
                floor.append(time.process_time() - t0)
            out[f"{name}:{t}"] = statistics.median(steps) / statistics.median(floor)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--json", help="also write every round's measurements to this file")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child()))
        return
    res: dict[str, list[dict]] = {t: [] for t in a.trees}
    for r in range(a.rounds):
        for tree in a.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
            cmd = [sys.executable, os.path.abspath(__file__), "--child"]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            res[tree].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print("| model:type | " + " | ".join(a.trees) + " |")
    print("|---|" + "---|" * len(a.trees))
    for k in res[a.trees[0]][0]:
        cells = []
        for tree in a.trees:
            v = [d[k] for d in res[tree]]
            cells.append(f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
