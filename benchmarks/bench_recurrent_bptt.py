"""``fimfast.ops.recurrent_bptt``: the torch reference (a loop of torch ops per step) against the
``cpp`` kernel (csrc/cpu/recurrent_bptt.cpp), with the product with ``W_hh`` of one step as the
arithmetic floor of a step.

Cases (float32, T = 20 steps, N = 16 rows, H = 64 hidden units, input 32, as
``benchmarks/bench_recurrent.py``):

* ``lstm`` / ``gru`` / ``rnn_tanh``: one cotangent, non-zero at every step;
* ``lstm_col``: one cotangent non-zero at step 10 only (a tagger's column for one position);
* ``lstm_b20``: 20 cotangents batched by the legacy vmap of ``autograd.grad(...,
  is_grads_batched=True)``, each non-zero at every step.

In rounds, every (case, backend) call is timed in CPU time of the process (one torch thread),
the backends alternating; a cell is the median over the rounds of the mean call, with the
interquartile range over the rounds. ``mm`` is one step's ``(N, G) @ (G, H)`` product
(``torch.mm(..., out=)``). Usage: ``python benchmarks/bench_recurrent_bptt.py [--rounds 7]``;
prints a JSON object ``{case: {backend: [median_us, q1_us, q3_us]}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._vmap_internals import _vmap

from fimfast import ops

T, N, H = 20, 16, 64
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1}


def _case(name: str):
    g = torch.Generator().manual_seed(0)
    mode = name.split("_")[0] if not name.startswith("rnn") else "rnn_tanh"
    G = GATES[mode] * H
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    saved = {"lstm": [r(T, N, G), r(N, H)], "gru": [r(T, N, G), r(T, N, G), r(T, N, H)],
             "rnn_tanh": [r(T, N, H).tanh()]}[mode]
    whh = 0.1 * r(G, H)
    dys, dh = r(T, N, H), torch.zeros(N, H)
    if name == "lstm_col":
        dys = torch.zeros(T, N, H)
        dys[10] = r(N, H)
    dc = torch.zeros(N, H) if mode == "lstm" else None
    M = mode.upper()
    if name == "lstm_b20":
        bd, bh, bc = r(20, T, N, H), torch.zeros(20, N, H), torch.zeros(20, N, H)
        def call(backend):
            f = _vmap(lambda x, y, z: ops.recurrent_bptt(M, saved, whh, x, y, z, False,
                                                         backend=backend)[0], (0, 0, 0), 0)
            return lambda: f(bd, bh, bc)
        return call, whh, 20 * N
    return (lambda backend: lambda: ops.recurrent_bptt(M, saved, whh, dys, dh, dc, False,
                                                       backend=backend)), whh, N


def _time(f, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = ("lstm", "gru", "rnn_tanh", "lstm_col", "lstm_b20")
    fns = {}
    for name in cases:
        call, whh, rows = _case(name)
        a, out = torch.randn(rows, whh.shape[0]), torch.empty(rows, H)
        fns[name] = {"torch": call("torch"), "cpp": call("cpp"),
                     "mm": lambda a=a, whh=whh, out=out: torch.mm(a, whh, out=out)}
    times: dict = {c: {b: [] for b in fns[c]} for c in cases}
    for f in (f for c in fns.values() for f in c.values()):
        f()
    for _ in range(args.rounds):
        for c in cases:
            for b, f in fns[c].items():
                times[c][b].append(_time(f, args.calls))
    res = {}
    for c, per in times.items():
        res[c] = {}
        for b, v in per.items():
            q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
            res[c][b] = [round(statistics.median(v), 1), round(q[0], 1), round(q[2], 1)]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
