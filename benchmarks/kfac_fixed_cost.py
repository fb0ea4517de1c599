"""The per-call cost of ``fimfast.fisher(..., "monte_carlo", "kfac")`` that is not arithmetic:
CPU time (``time.process_time``, one torch thread) of one call on a tiny MLP (8-8-8-3, batch 4),
where the products cost next to nothing, next to a training step of the same model (forward,
cross-entropy, backward into ``.grad``), interleaved call by call.

    PYTHONPATH=<tree> python benchmarks/kfac_fixed_cost.py [calls]

prints ``{"kfac_us": median, "train_us": median}``; with ``--trees label=path,...`` one process
per tree and alternation (the order alternating) and the per-process medians with their
min / median / max:

    python benchmarks/kfac_fixed_cost.py --trees before=<tree>,after=<tree> --alternations 4
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
from torch import nn


def main(calls: int) -> dict:
    import fimfast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    X, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    data = [(X, y)]

    def train():
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(X), y).backward()

    def kfac():
        return fimfast.fisher(m, data, "monte_carlo", "kfac", seed=0)

    for _ in range(50):
        kfac()
        train()
    times = {"kfac_us": [], "train_us": []}
    for _ in range(calls):
        for k, f in (("kfac_us", kfac), ("train_us", train)):
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}


def alternate(trees: dict[str, str], alternations: int, calls: int) -> dict:
    runs = {label: [] for label in trees}
    loads = [os.getloadavg()[0]]
    for i in range(alternations):
        for label in (list(trees) if i % 2 == 0 else list(reversed(trees))):
            env = {**os.environ, "PYTHONPATH": trees[label]}
            out = subprocess.run([sys.executable, __file__, str(calls)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
    summary = {label: {k: {"min": min(r[k] for r in rs), "median": statistics.median(
        r[k] for r in rs), "max": max(r[k] for r in rs)} for k in rs[0]}
        for label, rs in runs.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "trees": trees,
            "calls": calls, "alternations": alternations, "torch": torch.__version__,
            "loadavg_1min": {"min": min(loads), "max": max(loads)}, "runs": runs,
            "summary": summary}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("calls", nargs="?", type=int, default=400)
    ap.add_argument("--trees", help="label=path,label=path: alternate processes over the trees")
    ap.add_argument("--alternations", type=int, default=4)
    ap.add_argument("--out", help="path of the JSON written with --trees")
    args = ap.parse_args()
    if not args.trees:
        print(json.dumps(main(args.calls)))
        sys.exit(0)
    res = alternate(dict(t.split("=", 1) for t in args.trees.split(",")), args.alternations,
                    args.calls)
    print(json.dumps(res["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
