"""Cost of a per-sample step on rows folded by size only (fimfast/rules/linear.py ``mark_fold``),
as a ratio to a training step, old tree against new.

Workloads: ``token_mlp``: ``(N, T, d)`` tokens flattened with ``x.reshape(-1, d)`` through
``Linear -> ReLU -> Linear`` (the first layer's rows a view of the batch, the second's a function
of them: folded by size only), mean over tokens, a linear head; ``gcn``: a two-layer GCN on a
node list of ``N`` graphs of ``k`` nodes each (``index_add`` aggregation, segment-mean readout).
A child process per tree and round (alternating, a new random order each round) times a training
step (the floor) and ``DiagFisher(model, t).step(batch)`` by CPU time (``time.process_time``),
one torch thread, and prints the medians over the floor's.

    python benchmarks/bench_refold.py --trees OLD NEW --rounds 7 --out PATH
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time


def _workload(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "token_mlp":
        N, T, d, C = 32, 16, 64, 10

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, d))
                self.head = nn.Linear(d, C)

            def forward(self, x):
                return self.head(self.mlp(x.reshape(-1, d)).view(x.shape[0], T, d).mean(1))
        return M(), (torch.randn(N, T, d), torch.randint(0, C, (N,))), None
    N, k, F_, H, C = 32, 8, 16, 32, 10
    src, dst = [], []
    for g in range(N):
        for a in range(k):
            for b in range(k):
                if a != b and (a + b + g) % 3:
                    src.append(g * k + a)
                    dst.append(g * k + b)
    ei, gid = torch.tensor([src, dst]), torch.arange(N).repeat_interleave(k)

    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.o = nn.Linear(F_, H), nn.Linear(H, H), nn.Linear(H, C)

        def prop(self, h):
            return torch.zeros_like(h).index_add(0, ei[1], h[ei[0]]) / (k - 1) + h

        def forward(self, x):
            h = torch.relu(self.prop(self.l1(x)))
            h = torch.relu(self.prop(self.l2(h)))
            return self.o(torch.zeros(N, H).index_add(0, gid, h) / k)
    return G(), (torch.randn(N * k, F_), torch.randint(0, C, (N,))), lambda m, b: m(b[0])


def _child(name: str, types: list[str], steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    import fimfast

    torch.set_num_threads(1)
    model, batch, fwd = _workload(name)

    def floor():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()

    fns = {"floor": floor}
    for t in types:
        kw = {"forward_fn": fwd} if fwd else {}
        est = fimfast.DiagFisher(model, t, seed=0, **kw)
        fns[t] = lambda est=est: est.step(batch)
    for f in fns.values():
        for _ in range(3):
            f()
    times: dict = {k: [] for k in fns}
    for _ in range(steps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"floor_ms": med["floor"] * 1e3, **{t: med[t] / med["floor"] for t in types}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", nargs=2, required=False)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--workloads", default="token_mlp,gcn")
    ap.add_argument("--types", default="exact,empirical")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child[0], a.child[1].split(","), a.steps)))
        return 0
    me = os.path.abspath(__file__)
    res: dict = {}
    rng = random.Random(0)
    for _ in range(a.rounds):
        for w in a.workloads.split(","):
            trees = list(a.trees)
            rng.shuffle(trees)
            for tree in trees:
                env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
                out = subprocess.run([sys.executable, me, "--child", w, a.types, "--steps",
                                      str(a.steps)], env=env, cwd=tree, capture_output=True,
                                     text=True, check=True).stdout
                res.setdefault(w, {}).setdefault(tree, []).append(json.loads(out))
    lines = ["| workload | tree | floor ms | " + " | ".join(a.types.split(",")) + " |",
             "|---|---|---|" + "---|" * len(a.types.split(","))]
    for w, per in res.items():
        for tree, rs in per.items():
            cells = []
            for t in ["floor_ms", *a.types.split(",")]:
                xs = [r[t] for r in rs]
                cells.append(f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]")
            lines.append(f"| {w} | {tree} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
