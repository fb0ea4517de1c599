"""KFAC (MONTE_CARLO) and EKFAC through ``fimfast.fisher`` as ratios of **CPU time** (one torch
thread, ``time.process_time``) to a training step, interleaved in rounds.

On a machine shared with other jobs a single-threaded step spends most of its wall-clock time
waiting for a core (on the 2-core machine of benchmarks/results/structured_*: 3.6 ms of CPU for a
40 ms wall-clock training step of workload (a)), so wall-clock ratios mostly measure the
scheduler; CPU-time ratios measure the work. To compare two versions of fimfast, run this file
with each tree first on ``PYTHONPATH``, alternately:

    PYTHONPATH=<tree> python benchmarks/kfac_cputime.py a,b,c 9

Prints ``{workload: {"kfac": ratio, "refit": ratio (the EKFAC refit of the diagonal alone, as
timed by benchmarks/bench_structured.py), "ekfac": ratio (factors, eigendecompositions and refit),
"train_ms": CPU ms of the training step}}`` as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch import nn


def _calls(fimfast, model, full, X, y) -> dict:
    data = [(X, y)]

    def train():
        full.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(full(X), y).backward()

    from fimfast.structured import capture, engine, refit_ekfac
    from fimfast.types import FIMType, Options

    kf = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
    kf.eig()  # the eigenbasis outside the refit's time, as in bench_structured.py
    params = [p for p in model.parameters() if p.requires_grad]
    layers = capture.layers_of(model, kf.names, params, "ekfac")

    def refit():
        st = engine.Stream(FIMType.MONTE_CARLO, Options(seed=1), 1)
        return refit_ekfac(kf, model, data, st, layers, "mean")

    return {"train": train,
            "kfac": lambda: fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0),
            "refit": refit,
            "ekfac": lambda: fimfast.fisher(model, data, "monte_carlo", "ekfac", seed=0)}


def main(keys: list[str], rounds: int) -> dict:
    import fimfast
    from benchmarks.bench_structured import prepare

    torch.set_num_threads(1)
    out = {}
    for key in keys:
        w, model, full, _ = prepare(key, "full")
        fns = _calls(fimfast, model, full, w.inputs, w.labels)
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.process_time()
                f()
                times[k].append(time.process_time() - t)
        tr = statistics.median(times["train"])
        out[key] = {k: round(statistics.median(v) / tr, 3) for k, v in times.items()
                    if k != "train"}
        out[key]["train_ms"] = round(tr * 1e3, 2)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else 9)))
