"""The norms' term phase on workload (e): the ``norm_terms`` kernel against the torch path, paired
in one process.

On workload (e) of :mod:`benchmarks.workloads` (full size: 4 LayerNorms, ``(32, 32, 64)`` inputs),
one torch thread, CPU time of the process: a step of ``DiagFisher`` (EMPIRICAL, EXACT), rounds
alternating the kernel (the cpp backend's ``norm_terms``, ``fimfast.rules.norm._fused``) and the
torch path (``_fused`` answering False) in a new order each round; per step, the time spent in
the norms' ``terms`` and in the squares of their :class:`~fimfast.rules.Vec` terms (the term
phase), and the whole step. Prints the medians and the 10th-90th percentiles, in ms.

Usage: ``python benchmarks/bench_norm_terms.py [--steps 40]``
"""

from __future__ import annotations

import argparse
import statistics
import time


def _q(v: list[float]) -> str:
    s = sorted(v)
    lo, hi = s[len(s) // 10], s[-1 - len(s) // 10]
    return f"{statistics.median(s) * 1e3:.3f} ({lo * 1e3:.3f}-{hi * 1e3:.3f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args(argv)
    import torch

    import fimfast
    from benchmarks.workloads import build
    from fimfast.persample import squares
    from fimfast.rules import norm

    torch.set_num_threads(1)
    wl = build("e", "full", 0)
    spent = [0.0]
    terms, vec_sq, fused = norm._NormRule.terms, squares._vec_sq, norm._fused

    def timed(f):
        def run(*args):
            t0 = time.process_time()
            out = f(*args)
            spent[0] += time.process_time() - t0
            return out
        return run

    norm._NormRule.terms, squares._vec_sq = timed(terms), timed(vec_sq)
    paths = {"torch": lambda G: False, "kernel": fused}
    for kind in ("empirical", "exact"):
        est = fimfast.DiagFisher(wl.model, kind, seed=0)
        for _ in range(3):
            est.step((wl.inputs, wl.labels))
        phase: dict[str, list[float]] = {k: [] for k in paths}
        step: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(a.steps):
            for name in (("torch", "kernel") if i % 2 else ("kernel", "torch")):
                norm._fused, spent[0] = paths[name], 0.0
                t0 = time.process_time()
                est.step((wl.inputs, wl.labels))
                step[name].append(time.process_time() - t0)
                phase[name].append(spent[0])
        for name in paths:
            print(f"{kind:9s} {name:6s} term phase ms {_q(phase[name])}  step ms {_q(step[name])}")
    norm._NormRule.terms, squares._vec_sq, norm._fused = terms, vec_sq, fused
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
