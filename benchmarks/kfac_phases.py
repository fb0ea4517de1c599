"""Where a call of ``fimfast.fisher(..., "monte_carlo", "kfac")`` spends its CPU time, by phase:
each phase's function wrapped with a ``time.process_time`` counter (one torch thread), summed over
calls and divided by their number, next to the median training step of the same model measured
between the calls (forward, cross-entropy, backward into ``.grad``).

    PYTHONPATH=. python benchmarks/kfac_phases.py [a|tiny] [calls]

``a``: workload (a) (MLP 784-512-256-10, B=128, benchmarks/workloads.py); ``tiny``: the 8-8-8-3
MLP of ``benchmarks/kfac_fixed_cost.py`` (batch 4), where the products cost next to nothing.
Phases nest (``update`` holds the forward, the backward and the factor sums); a wrapper costs
about a microsecond, so the small phases are upper bounds.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import torch
from torch import nn

_PHASES = [  # (module path, attribute, label)
    ("fimfast.structured.accumulate", "FisherAccumulator.__init__", "accumulator (structure, "
     "options, guards)"),
    ("fimfast.structured.accumulate", "FisherAccumulator.update", "update (one batch)"),
    ("fimfast.structured.columns", "forward", "  forward (model, rows)"),
    ("fimfast.structured.capture", "check_calls", "  check_calls (graph walk)"),
    ("fimfast.likelihoods", "score_columns", "  MC labels and score columns"),
    ("fimfast.structured.columns", "batched_grad", "  backward to the layer outputs"),
    ("fimfast.structured.engine", "_add_all_inputs", "  A sums"),
    ("fimfast.structured.engine", "add_grads", "  G sums"),
    ("fimfast.structured.capture", "out_grads", "  output gradients (views)"),
    ("fimfast.structured.capture", "inputs_of", "  inputs (views)"),
    ("fimfast.structured.forwards", "instance_forwards", "  capture setup"),
    ("fimfast.structured.capture", "check_forwards", "  forward checks"),
    ("fimfast.structured.engine", "written", "  parameter write check"),
    ("fimfast.structured.accumulate", "FisherAccumulator.result", "result (factors, KFACFIM)"),
]


def _wrap(acc: dict, module: str, attr: str, label: str) -> None:
    import importlib

    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*args, **kwargs):
        t = time.process_time()
        try:
            return f(*args, **kwargs)
        finally:
            acc[label] = acc.get(label, 0.0) + time.process_time() - t

    setattr(owner, name, timed)


def main(key: str, calls: int) -> dict:
    import fimfast

    torch.set_num_threads(1)
    if key == "tiny":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                              nn.Linear(8, 3))
        full, X, y = model, torch.randn(4, 8), torch.randint(0, 3, (4,))
    else:
        from benchmarks.bench_structured import prepare

        w, model, full, _ = prepare(key, "full")
        X, y = w.inputs, w.labels
    data = [(X, y)]

    def train():
        full.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(full(X), y).backward()

    acc: dict = {}
    for module, attr, label in _PHASES:
        _wrap(acc, module, attr, label)
    fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0).eig()  # as kfac_cputime.py
    for _ in range(10):
        fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
        train()
    acc.clear()
    calls_t, train_t = [], []
    for _ in range(calls):
        t = time.process_time()
        fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
        calls_t.append(time.process_time() - t)
        t = time.process_time()
        train()
        train_t.append(time.process_time() - t)
    tr = statistics.median(train_t)
    out = {"train_us": round(tr * 1e6, 1),
           "call_us": round(statistics.median(calls_t) * 1e6, 1)}
    for _, _, label in _PHASES:
        out[label] = round(acc.get(label, 0.0) / calls * 1e6, 1)
    return out


if __name__ == "__main__":
    key = sys.argv[1] if len(sys.argv) > 1 else "a"
    res = main(key, int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    tr = res["train_us"]
    print(f"| phase ({key}) | us a call | training steps |\n|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v} | {v / tr:.3f} |")
