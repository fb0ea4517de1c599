"""KFAC (MONTE_CARLO) through ``fimfast.fisher`` with and without what a call keeps per model,
measured inside one process, interleaved in rounds (CPU time, one torch thread), as ratios to a
training step of the same round:

* ``kfac``: the call as a program makes it again and again (the model's structure and the
  validated options kept from the call before, fimfast/structured/structure.py);
* ``kfac:cold``: the same call with both caches emptied first (the model met for the first time:
  parameters, layers, guard walks and options found and checked anew);
* ``kfac:strips`` (workloads with a convolution of at most ``PIXEL_ROW_MAX`` values an input
  row): the call with every convolution's input factor from the strip products
  (fimfast/structured/convgram.py, ``PIXEL_ROW_MAX = 0``) instead of the products of whole rows.

``paired_ms``: the median and quartiles of the per-round differences to ``kfac``. Both sides
run in the same process and rounds, so the page faults and load of a process affect both
(benchmarks/kfac_cputime.py compares processes of two source trees).

    PYTHONPATH=. python benchmarks/bench_kfac_cache.py a,c,e --rounds 61
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn


def measure(key: str, rounds: int) -> dict:
    import fimfast
    from benchmarks.bench_structured import prepare
    from fimfast.structured import api, convgram, structure

    w, model, full, _ = prepare(key, "full")
    data = [(w.inputs, w.labels)]

    def train():
        full.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(full(w.inputs), w.labels).backward()

    def kfac():
        return fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)

    def cold():
        structure._CACHE.pop(model, None)
        api._OPTIONS.clear()
        return kfac()

    def strips():
        saved, convgram.PIXEL_ROW_MAX = convgram.PIXEL_ROW_MAX, 0
        try:
            return kfac()
        finally:
            convgram.PIXEL_ROW_MAX = saved

    fns = {"train": train, "kfac": kfac, "kfac:cold": cold}
    narrow = []
    hooks = [m.register_forward_hook(lambda m, i, o: narrow.append(
        i[0].shape[1] * (i[0].shape[-1] + 2 * m.padding[1]) <= convgram.PIXEL_ROW_MAX))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(w.inputs)
    for h in hooks:
        h.remove()
    if any(narrow):
        fns["kfac:strips"] = strips
    keep = []
    for f in fns.values():
        keep.append(f())
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.process_time()
            keep.append(f())
            times[k].append(time.process_time() - t)
            del keep[:-3]  # the last results stay alive, as a caller's would
    tr = statistics.median(times["train"])
    out = {k: round(statistics.median(v) / tr, 3) for k, v in times.items() if k != "train"}
    out["train_ms"] = round(tr * 1e3, 3)
    for k in fns:
        if k.startswith("kfac:"):
            d = sorted(x - y for x, y in zip(times[k], times["kfac"]))
            q = statistics.quantiles(d, n=4)
            out[f"paired_ms {k} - kfac"] = {"q1": round(q[0] * 1e3, 3),
                                            "median": round(q[1] * 1e3, 3),
                                            "q3": round(q[2] * 1e3, 3)}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("keys")
    ap.add_argument("--rounds", type=int, default=61)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"loadavg_1min_start": os.getloadavg()[0]}
    for key in args.keys.split(","):
        res[key] = measure(key, args.rounds)
    res["loadavg_1min_end"] = os.getloadavg()[0]
    print(json.dumps(res))
