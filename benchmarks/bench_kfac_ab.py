"""EKFAC's refit with the eigenvectors in either layout, measured inside one process, interleaved
in rounds (CPU time, one torch thread), as ratios to a training step of the same round:
``refit:rows`` / ``refit:cols``: the refit of the diagonal (``refit_ekfac``, the eigenbasis
computed before, as in benchmarks/kfac_cputime.py) with row-major eigenvectors (as
:func:`fimfast.structured.factors.eigh` returns them) and with the same eigenvectors in LAPACK's
column-major layout; ``kfac``: ``fimfast.fisher(model, [batch], "monte_carlo", "kfac")`` for
reference.

Comparing processes of two source trees (benchmarks/kfac_cputime.py ``--trees``) on a shared
machine mixes the change with each process's state (load, and the page faults of fresh factor
buffers, which depend on the allocator's history); here both sides run in the same process and
the same rounds, and ``paired_ms`` is the median of the per-round differences.

    PYTHONPATH=. python benchmarks/bench_kfac_ab.py a,b,c,e --rounds 61
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
    from fimfast.structured import capture, engine, refit_ekfac
    from fimfast.types import FIMType, Options

    w, model, full, _ = prepare(key, "full")
    data = [(w.inputs, w.labels)]
    rows = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
    rows.eig()
    cols = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)

    def cm(u):  # the same values in LAPACK's column-major layout
        return None if u is None else u.mT.contiguous().mT

    cols._eig = [(e[0], cm(e[1]), e[2], cm(e[3])) for e in cols.eig()]
    params = [p for p in model.parameters() if p.requires_grad]
    layers = capture.layers_of(model, rows.names, params, "ekfac")

    def train():
        full.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(full(w.inputs), w.labels).backward()

    def refit(kf):
        st = engine.Stream(FIMType.MONTE_CARLO, Options(seed=1), 1)
        return refit_ekfac(kf, model, data, st, layers, "mean")

    fns = {"train": train,
           "kfac": lambda: fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0),
           "refit:rows": lambda: refit(rows), "refit:cols": lambda: refit(cols)}
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
    out["paired_ms rows - cols"] = round(statistics.median(
        [x - y for x, y in zip(times["refit:rows"], times["refit:cols"])]) * 1e3, 3)
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
