"""EXACT against BackPACK's ``DiagGGNExact`` on workload (a), in the same rounds as a training step.

One process, one torch thread: a training step (forward, cross-entropy, backward into ``.grad``),
``DiagFisher(model, "exact").step(batch)`` and BackPACK's ``DiagGGNExact`` (summed cross-entropy,
on a deep copy of the model: BackPACK's ``extend`` slows the model's own training step), each run
twice per round in that order, by the process's CPU time (``time.process_time``). Prints one JSON
line: the tree's commit and every round's milliseconds per call; ratios are taken per round.

    python benchmarks/bench_exact_backpack.py ROUNDS

Run it from each source tree in turn (``PYTHONPATH`` the tree) to compare trees.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def main(rounds: int) -> dict:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    import fimfast
    from benchmarks.workloads import build

    torch.set_num_threads(1)
    wl = build("a", "full", 0)
    model, batch, y = wl.model, (wl.inputs, wl.labels), wl.flat_labels()
    bpm = extend(copy.deepcopy(wl.flat_model()))
    lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
    est = fimfast.DiagFisher(model, "exact")

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(wl.logits(), y).backward()

    def bp():
        bpm.zero_grad(set_to_none=True)
        with backpack(DiagGGNExact()):
            lossfn(bpm(wl.inputs), y).backward()

    fs = {"train": train, "exact": lambda: est.step(batch), "bp": bp}
    for f in fs.values():
        for _ in range(3):
            f()
    ms: dict[str, list[float]] = {k: [] for k in fs}
    for _ in range(rounds):
        for k, f in fs.items():
            t = time.process_time()
            f()
            f()
            ms[k].append((time.process_time() - t) / 2 * 1e3)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return {"tree": rev, "ms": ms}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 11)))
