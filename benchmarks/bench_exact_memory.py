"""Peak extra memory and time of the per-sample estimators against one training step.

For each workload (:mod:`benchmarks.workloads`, default (a)-(e)) and each method:

* **memory**, in a fresh subprocess per (workload, method), after two warm-up calls: the peak of
  tensor storage live at once during one call (:class:`benchmarks.memory.TensorPeakMeter`, exact
  and repeatable) and the resident-set peak of the suite (:class:`benchmarks.memory.PeakMeter`,
  noisy at a few MB), each the largest over ``--mem-calls`` calls. fimfast methods are measured
  twice: the step alone after ``reset()`` (``step``) and the step followed by ``result()``
  (``call``, the suite's call: ``result()`` returns a copy of the state, one more
  parameter-sized tensor, as the training step's ``.grad`` is its output);
* **time**, in one subprocess per workload: every method on its own copy of the model, warmed
  up, then ``--rounds`` round-robin rounds in a shuffled order; per round the CPU time
  (``time.process_time``, less disturbed by other processes than wall time) and the wall time,
  and each method's ratio to the floor of the same round. Reported: median and range over the
  rounds.

Methods: ``floor`` (forward + backward of the mean cross-entropy, gradients into ``.grad``),
``exact`` (``DiagFisher(model, "exact")``, automatic backend), ``exact_torch``, ``empirical``,
``bp_exact`` (BackPACK ``DiagGGNExact``). ``exact@class_chunk=K`` and ``exact@budget=MB`` pass
``class_chunk`` or ``FIMFAST_MEMORY_BUDGET_MB`` to the exact estimator; ``exact@bound`` applies
the training-step bound of ``fimfast.chunks.fast_columns`` to a model under the 64 MiB threshold
of the trees that have one (``chunks.TRAIN_BOUND_FROM``; later trees always apply it).

Usage: ``python -m benchmarks.bench_exact_memory --workloads abcde --threads 1
--out benchmarks/results/exact_memory_cpu_DATE.json``.
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

import torch
import torch.nn.functional as F

from benchmarks import memory
from benchmarks.workloads import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("floor", "exact", "exact@bound", "exact_torch", "empirical", "bp_exact")


def _setup(spec: str, key: str, seed: int = 0):
    """``(step, call, cleanup)`` of method ``spec`` on a fresh copy of workload ``key``."""
    wl = build(key, "full", seed)
    model = wl.model
    name, _, opt = spec.partition("@")
    if name == "floor":
        y = wl.flat_labels()

        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(wl.logits(), y).backward()

        def clean():
            model.zero_grad(set_to_none=True)

        return step, step, clean
    if name == "bp_exact":
        from benchmarks.methods import _backpack

        call, clean = _backpack("exact")(wl, {})
        return call, call, clean
    import fimfast

    kw: dict = {}
    if opt.startswith("class_chunk="):
        kw["class_chunk"] = int(opt.split("=")[1])
    elif opt.startswith("budget="):
        os.environ["FIMFAST_MEMORY_BUDGET_MB"] = opt.split("=")[1]
    elif opt == "bound":  # the training-step bound on a model under its 64 MiB threshold
        from fimfast import chunks

        if hasattr(chunks, "TRAIN_BOUND_FROM"):
            chunks.TRAIN_BOUND_FROM = 0
    elif opt:
        raise SystemExit(f"unknown option {opt!r} in method {spec!r}")
    fim_type = {"exact": "exact", "exact_torch": "exact", "empirical": "empirical"}[name]
    backend = "torch" if name == "exact_torch" else "auto"
    est = fimfast.DiagFisher(model, fim_type, reduction="sum", backend=backend, **kw)
    batch = (wl.inputs, wl.labels)

    def step():
        est.reset()
        est.step(batch)

    def call():
        est.reset()
        est.step(batch)
        return est.result()

    def clean():
        est.reset()

    return step, call, clean


def _measure(fn, clean, calls: int) -> tuple[float, float]:
    """``(tensor peak MB, RSS peak MB)`` of ``fn``: the largest over ``calls`` calls each."""
    tens, rss = [], []
    for _ in range(calls):
        clean()
        tm = memory.TensorPeakMeter()
        tm.begin()
        out = fn()
        tens.append(tm.end())
        del out
        clean()
        rm = memory.PeakMeter("cpu")
        rm.begin()
        out = fn()
        rss.append(rm.end())
        del out
    return max(tens), max(rss)


def worker_memory(key: str, spec: str, calls: int) -> dict:
    step, call, clean = _setup(spec, key)
    try:
        for _ in range(2):
            call()
            clean()
    except Exception as exc:  # noqa: BLE001 - an unsupported model is a result
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    res = {}
    res["step_tensor_mb"], res["step_rss_mb"] = _measure(step, clean, calls)
    if call is not step:
        res["call_tensor_mb"], res["call_rss_mb"] = _measure(call, clean, calls)
    return res


def worker_time(key: str, specs: list[str], rounds: int, seed: int) -> dict:
    fns, errors = {}, {}
    for s in specs:
        try:
            _, call, clean = _setup(s, key)
            for _ in range(2):
                call()
                clean()
        except Exception as exc:  # noqa: BLE001 - an unsupported model is a result
            errors[s] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        fns[s] = (call, clean)
    specs = list(fns)
    rng = random.Random(seed)
    cpu: dict[str, list[float]] = {s: [] for s in specs}
    wall: dict[str, list[float]] = {s: [] for s in specs}
    for _ in range(rounds):
        order = list(specs)
        rng.shuffle(order)
        for s in order:
            call, clean = fns[s]
            c0, w0 = time.process_time(), time.perf_counter()
            out = call()
            c1, w1 = time.process_time(), time.perf_counter()
            del out
            clean()
            cpu[s].append((c1 - c0) * 1e3)
            wall[s].append((w1 - w0) * 1e3)
    return {"cpu_ms": cpu, "wall_ms": wall, "errors": errors}


def _sub(kind: str, args: list, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.bench_exact_memory", "--_worker",
           json.dumps([kind, threads, *args])]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    for line in p.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    return {"error": (p.stderr or "").strip().splitlines()[-3:]}


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(res: dict) -> dict:
    """Per method: time ratios to the floor of the same round (CPU and wall), memory ratios."""
    out = {}
    mem, tm = res["memory"], res.get("time", {})
    fl = mem.get("floor", {})
    for s, m in mem.items():
        row: dict = {}
        for k in ("step_tensor_mb", "step_rss_mb", "call_tensor_mb", "call_rss_mb"):
            if k in m and fl.get(k.replace("call", "step")):
                row[k.replace("_mb", "_x_floor")] = m[k] / fl[k.replace("call", "step")]
        for clock in ("cpu_ms", "wall_ms"):
            if clock in tm and s in tm[clock] and "floor" in tm[clock]:
                ratios = [a / b for a, b in zip(tm[clock][s], tm[clock]["floor"])]
                row[clock.replace("_ms", "_ratio")] = _stats(ratios)
                row[clock] = _stats(tm[clock][s])
        if "bp_exact" in tm.get("cpu_ms", {}) and s in tm["cpu_ms"]:
            ratios = [a / b for a, b in zip(tm["cpu_ms"][s], tm["cpu_ms"]["bp_exact"])]
            row["cpu_x_backpack"] = _stats(ratios)
        out[s] = row
    return out


def _load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="abcde")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--mem-calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        kind, threads, *args = json.loads(a._worker)
        torch.set_num_threads(threads)
        fn = worker_memory if kind == "mem" else worker_time
        print("@@RESULT " + json.dumps(fn(*args)), flush=True)
        return
    from benchmarks.suite import provenance

    specs = a.methods.split(",")
    data = {"provenance": provenance({"device": "cpu", "threads": a.threads}, sys.argv),
            "load_before": _load(), "settings": vars(a), "workloads": {}}
    for key in a.workloads:
        w = data["workloads"][key] = {"memory": {}}
        todo = [s for s in specs if not (s.startswith("bp_") and key == "d")]  # 137 GB
        for s in todo:
            w["memory"][s] = _sub("mem", [key, s, a.mem_calls], a.threads)
            print(key, s, w["memory"][s], file=sys.stderr, flush=True)
        if not a.no_time:
            w["time"] = _sub("time", [key, todo, a.rounds, a.seed], a.threads)
        w["summary"] = summarize(w)
        for s, row in w["summary"].items():
            print(key, s, json.dumps(row), file=sys.stderr, flush=True)
    data["load_after"] = _load()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
