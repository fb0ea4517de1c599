"""Where the fixed cost of a step goes, measured inside real steps.

A piece of Python or a small operator costs several times more inside a step than alone in a
loop: the forward and backward of a full-size model (their GEMMs stream megabytes) evict the
interpreter's objects and the dispatcher's code from the caches, so every object a step touches
and every distinct small kernel it launches is read cold. This script measures the pieces where
they run: each function named by ``--wrap`` (``module:qualified.name``) is replaced, for the run,
by a wrapper that adds its CPU time (``time.process_time_ns``) to its own row, while
``DiagFisher(model, type).step(batch)`` runs on a workload of :mod:`benchmarks.workloads`, each
step followed by a training step (forward, cross-entropy, backward; its forward is timed as
``model forward``), so every step starts as it would in a training loop. Also reported, in the
same context: the first and a second call of one small operator right after that training step
(``cold op`` / ``warm op``: a softmax of the logits), the price of any distinct small kernel.

Workloads: those of :mod:`benchmarks.workloads` and the small convolution nets ``resnet_bn``,
``groupnorm_cnn``, ``conv1d_dilated`` of :func:`benchmarks.bench_persample_cost.small_cnn` (whose
per-sample steps default to the phases of the general chunk code, ``DEFAULT_WRAP["conv"]``).

Rows: median CPU time per step over ``--steps`` steps (a function called several times in a step
counts its sum), and ``step`` for the whole ``DiagFisher.step``. Nested functions are included in
their callers. One torch thread.

    PYTHONPATH=. python benchmarks/bench_step_phases.py --workload a --type hutchinson \\
        [--steps 200] [--size full] [--wrap fimfast.hutchinson:vjp ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the phases of a one-probe HUTCHINSON step and of a per-sample step (default --wrap)
DEFAULT_WRAP = {
    "hutchinson": (  # the prepared step (fimfast/prepared.py)
        "fimfast.parameters:ParamWalk.of",
        "fimfast.guard:StepKept.__enter__",
        "fimfast.nograd:NogradWatch.__enter__",
        "fimfast.prepared:_one_probe",
        "fimfast.nograd:NogradWatch.__exit__",
        "fimfast.hutchinson:vjp",
        "fimfast.guard:StepKept.__exit__",
        "fimfast.state:State.add_squares",
    ),
    # the per-sample step of a small convolution net (fimfast/persample/prepared.py's step, the
    # general chunk code: backward to the taps, the rules' terms, the squares)
    "conv": (
        "fimfast.persample.prepared:_estimate",
        "fimfast.persample.engine:Engine._prelude",
        "fimfast.persample.squares:head_closed_form",
        "fimfast.persample.engine:_tap_grads",
        "fimfast.persample.engine:_chunk",
        "fimfast.rules.conv:ConvRule.terms",
        "fimfast.rules.conv:ConvRule._patches",
        "fimfast.persample.squares:_outer_sq",
        "fimfast.ops:shared_sq",
        "fimfast.rules.conv_grouped:GroupedInput.sq",
        "fimfast.rules.norm:_NormRule.terms",
        "fimfast.persample.squares:_vec_sq",
        "fimfast.estimator:DiagFisher._commit",
    ),
    "per_sample": (
        "fimfast.estimator:DiagFisher._params",
        "fimfast.estimator:DiagFisher._captured_forward",
        "fimfast.batch:rows",
        "fimfast.persample.engine:Engine.estimate",
        "fimfast.persample.engine:Engine._plan",
        "fimfast.persample.engine:_tap_grads",
        "fimfast.state:State.commit",
    ),
}


def _wrap(spec: str, sums: dict[str, int]) -> tuple[object, str, object]:
    """Replace the function ``module:qual.name`` by a timing wrapper; returns what to put back."""
    mod_name, qual = spec.split(":")
    owner = importlib.import_module(mod_name)
    *path, name = qual.split(".")
    for part in path:
        owner = getattr(owner, part)
    fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    clock = time.process_time_ns

    def timed(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            sums[qual] = sums.get(qual, 0) + clock() - t0

    setattr(owner, name, timed)
    return owner, name, fn


def run(workload: str, fim_type: str, steps: int, size: str, wrap: list[str]) -> dict[str, float]:
    """Median CPU time per step (microseconds) of every wrapped function, of the step, of the
    training step's forward and of a cold and a warm small operator (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    import fimfast
    from benchmarks.bench_persample_cost import SMALL_CNNS, small_cnn
    from benchmarks.workloads import build

    torch.set_num_threads(1)
    if workload in SMALL_CNNS:  # (model, (inputs, labels)) of benchmarks/bench_persample_cost.py
        model, (x, y) = small_cnn(workload)
        wl = SimpleNamespace(model=model, inputs=x, labels=y)
    else:
        wl = build(workload, size, 0)
    model, batch = wl.model, (wl.inputs, wl.labels)
    params = [p for p in model.parameters() if p.requires_grad]

    def logits_of(out):
        return out.logits if hasattr(out, "logits") else out

    est = fimfast.DiagFisher(model, fim_type, seed=0)
    sums: dict[str, int] = {}
    undo = [_wrap(spec, sums) for spec in wrap]
    rows: dict[str, list[int]] = {}
    clock = time.process_time_ns
    try:
        for i in range(steps + 3):  # three warm-up steps: plans, caches, the state's first sum
            sums.clear()
            t0 = clock()
            est.step(batch)
            total = clock() - t0
            t0 = clock()
            z = logits_of(model(wl.inputs))
            fwd = clock() - t0
            F.cross_entropy(z.flatten(0, -2), wl.labels.flatten()).backward()
            for p in params:
                p.grad = None
            zd = z.detach()
            t0 = clock()
            torch.softmax(zd, -1)
            cold = clock() - t0
            t0 = clock()
            torch.softmax(zd, -1)
            warm = clock() - t0
            if i < 3:
                continue
            for k, v in {**sums, "step": total, "model forward": fwd, "cold op": cold,
                         "warm op": warm}.items():
                rows.setdefault(k, []).append(v)
    finally:
        for owner, name, fn in reversed(undo):
            setattr(owner, name, fn)
    n = len(rows["step"])
    # a function some steps never call counts 0 in those
    return {k: statistics.median(v + [0] * (n - len(v))) / 1e3 for k, v in rows.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="a")
    ap.add_argument("--type", default="hutchinson")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--wrap", nargs="*", default=None,
                    help="module:qualified.name of the functions to time (default: the phases)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    wrap = a.wrap
    if wrap is None:
        kind = "hutchinson" if a.type.startswith("hutchinson") else "per_sample"
        if kind == "per_sample" and a.workload in ("resnet_bn", "groupnorm_cnn", "conv1d_dilated"):
            kind = "conv"
        wrap = list(DEFAULT_WRAP[kind])
    res = run(a.workload, a.type, a.steps, a.size, wrap)
    print(f"workload ({a.workload}) {a.size}, {a.type}, {a.steps} steps, CPU time per step (us), "
          "median; nested functions included in their callers")
    for k, v in res.items():
        print(f"  {k:40s} {v:9.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
