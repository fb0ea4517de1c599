"""Fixed and per-sample cost of a per-sample step of the small convolution nets.

For each workload of :func:`benchmarks.bench_persample_cost.small_cnn` (or of
:mod:`benchmarks.workloads`, ``a``-``g``, on the first ``N`` samples of its batch) and each
batch size of ``--sizes``, times ``DiagFisher(model, t).step(batch)`` and a training step (forward,
cross-entropy, backward into ``.grad``), interleaved, by the process's CPU time, one torch
thread, and fits ``time = fixed + N * per_sample`` through the smallest and largest sizes: the
fixed part is what a step costs whatever its batch (Python frames, operator dispatch), the
per-sample part its arithmetic. It then counts the ATen operators one step and one training
step dispatch (a ``TorchDispatchMode``; the extension's host functions are not counted) and
profiles ``--profile-steps`` steps with :mod:`cProfile` at the middle size: the share of each
phase (cumulative time of its function) and the time of Python frames of their own.

    python benchmarks/bench_persample_fixed.py --workloads resnet_bn,groupnorm_cnn --type empirical
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections import Counter

# (file suffix, function, label): the phases of a per-sample step of the general chunk code
PHASES = (
    ("torch/nn/modules/container.py", "forward", "captured forward"),
    ("persample/engine.py", "_prelude", "forward checks and structure key"),
    ("persample/engine.py", "_tap_grads", "backward of the score column to the taps"),
    ("persample/engine.py", "_chunk", "rules' terms and their squares"),
    ("estimator.py", "_commit", "commit to the state"),
)


def _timed(fns: dict, steps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    return times


def _ms(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"{statistics.median(xs) * 1e3:.3f} ({q[0] * 1e3:.3f}-{q[2] * 1e3:.3f})"


def _phase_fns():
    """``(owner, attribute, label)`` of the functions :func:`_phases` times."""
    from fimfast import ops
    from fimfast.persample import engine, prepared
    from fimfast.rules import conv, norm

    return (
        (prepared, "_estimate", "estimate (after the forward and its checks)"),
        (engine, "_tap_grads", "backward of the score column"),
        (engine, "_chunk", "rules' terms and squares"),
        (conv.ConvRule, "_patches", "convolutions' unfolded patches"),
        (ops, "shared_sq", "shared_sq operator"),
        (norm._NormRule, "terms", "norms' terms"),
    )


def _phases(f, steps: int) -> dict[str, float]:
    """Median CPU time per step of each function of :func:`_phase_fns` (wrapped while timed),
    and of the step's forward with its checks (the rest of the step)."""
    acc: dict[str, float] = {}
    saved = []
    for owner, name, label in _phase_fns():
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def timed(*a, fn=fn, label=label, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.process_time() - t0

        setattr(owner, name, timed)
    rows = []
    try:
        for _ in range(steps):
            acc.clear()
            t0 = time.process_time()
            f()
            total = time.process_time() - t0
            rows.append({"step": total, **acc})
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    out = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}
    est = "estimate (after the forward and its checks)"
    out["forward and its checks"] = statistics.median(r["step"] - r.get(est, 0.0) for r in rows)
    return out


def _ops(f) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.c: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.c[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as m:
        f()
    return sum(m.c.values())


def _profile(f, n: int) -> tuple[float, float, dict[str, float]]:
    pr = cProfile.Profile(time.process_time)
    pr.enable()
    for _ in range(n):
        f()
    pr.disable()
    st = pstats.Stats(pr).stats
    total = sum(v[2] for v in st.values())
    own = sum(v[2] for k, v in st.items() if k[0] != "~")
    phases = {label: sum(v[3] for k, v in st.items() if k[0].endswith(suffix) and k[2] == fn)
              for suffix, fn, label in PHASES}
    return total / n, own / n, {k: v / n for k, v in phases.items()}


def run(workload: str, kind: str, sizes: list[int], steps: int,
        profile_steps: int) -> tuple[list[str], str]:
    import torch.nn.functional as F

    import fimfast

    lines, fit, phases = [], {}, {}
    for N in sizes:
        model, batch = _workload(workload, N)
        est = fimfast.DiagFisher(model, kind, seed=0)

        def floor(model=model, batch=batch):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(batch[0]), batch[1]).backward()

        fns = {"step": lambda est=est, batch=batch: est.step(batch), "floor": floor}
        _timed(fns, 5)  # plans, caches, allocator
        t = _timed(fns, steps)
        fit[N] = (statistics.median(t["step"]), statistics.median(t["floor"]))
        phases[N] = _phases(fns["step"], steps)
        lines.append(f"| {workload} | {kind} | {N} | {_ms(t['step'])} | {_ms(t['floor'])} | "
                     f"{fit[N][0] / fit[N][1]:.2f} |")
        if N == sizes[len(sizes) // 2]:
            n_ops, n_floor = _ops(fns["step"]), _ops(floor)
            total, own, shares = _profile(fns["step"], profile_steps)
            prof = (f"{workload} {kind} N={N}: {n_ops} ATen operators a step ({n_floor} a "
                    f"training step); under cProfile {total * 1e3:.3f} ms a step, Python frames' "
                    f"own time {own / total:.0%}; "
                    + ", ".join(f"{k} {v / total:.0%}" for k, v in shares.items()))
    lo, hi = sizes[0], sizes[-1]
    slope = [(fit[hi][i] - fit[lo][i]) / (hi - lo) for i in (0, 1)]
    fixed = [fit[lo][i] - lo * slope[i] for i in (0, 1)]
    lines.append(f"| {workload} | {kind} | fit | fixed {fixed[0] * 1e3:.3f} ms + "
                 f"{slope[0] * 1e6:.1f} us/sample | fixed {fixed[1] * 1e3:.3f} ms + "
                 f"{slope[1] * 1e6:.1f} us/sample | per-sample {slope[0] / slope[1]:.2f} |")
    lines += ["", f"| {workload} phase (instrumented) | N={lo} ms | N={hi} ms | fixed ms | "
              "us/sample |", "|---|---|---|---|---|"]
    for k in phases[lo]:
        a, b = phases[lo][k], phases[hi][k]
        per = (b - a) / (hi - lo)
        lines.append(f"| {k} | {a * 1e3:.3f} | {b * 1e3:.3f} | {(a - lo * per) * 1e3:.3f} | "
                     f"{per * 1e6:.1f} |")
    return lines, prof


def _workload(name: str, N: int):
    """``(model, (inputs, labels))``: a small net of :func:`benchmarks.bench_persample_cost.
    small_cnn` at batch size ``N``, or a workload of :mod:`benchmarks.workloads` (``a``-``g``,
    full size) on the first ``N`` samples of its batch."""
    if name in WORKLOAD_KEYS:
        from benchmarks.workloads import build

        wl = build(name, "full", 0)
        if N > wl.inputs.shape[0]:
            raise ValueError(f"--sizes: workload ({name}) has {wl.inputs.shape[0]} samples")
        return wl.model, (wl.inputs[:N], wl.labels[:N])
    from benchmarks.bench_persample_cost import small_cnn

    return small_cnn(name, N)


WORKLOAD_KEYS = frozenset("abcdefg")


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="resnet_bn,groupnorm_cnn,conv1d_dilated")
    ap.add_argument("--type", default="empirical")
    ap.add_argument("--sizes", default="2,16,64")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--profile-steps", type=int, default=200)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    profs = []
    for w in a.workloads.split(","):
        print("\n| workload | type | N | step ms (p25-p75) | training step ms (p25-p75) | ratio |")
        print("|---|---|---|---|---|---|")
        lines, prof = run(w, a.type, sizes, a.steps, a.profile_steps)
        print("\n".join(lines), flush=True)
        profs.append(prof)
    print("\n" + "\n\n".join(profs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
