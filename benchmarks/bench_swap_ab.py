"""Paired A/B of a few functions inside real steps: old and new code swapped before each step.

Each ``--swap module:qualified.name`` names a function of this tree (``new``); the same name is
read from that module's file in ``--old-tree`` (a checkout of an earlier commit, its module loaded
under a private name, so it runs against this tree's other modules) as ``old``. Every round runs
``DiagFisher(model, type).step(batch)`` once with each version, in a random order, each step
followed by a training step (forward, cross-entropy, backward) as in
:mod:`benchmarks.bench_step_phases`; the CPU time of the two steps of a round is paired. Reported:
the medians of both and the median (and quartiles) of the paired difference ``new - old`` in
microseconds. Small differences (a few microseconds in a 3 ms step) need thousands of rounds: the
standard error of the median difference is about ``0.93 * IQR / sqrt(rounds)``. One torch thread.

A swap reaches only the callers that look the name up when they call (``ops.probe_logit_grad``,
a method through its class): a function held elsewhere (the kernel a backend registry loaded and
keeps, a name imported with ``from module import name``) keeps running its first version.

    PYTHONPATH=. python benchmarks/bench_swap_ab.py --old-tree ../base --workload a \\
        --types hutchinson,empirical --rounds 3000 --swap fimfast.ops:probe_logit_grad
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pair(spec: str, old_tree: Path) -> tuple[object, str, object, object]:
    """``(owner, name, old, new)`` of ``module:qual.name``."""
    mod_name, qual = spec.split(":")
    new_mod = importlib.import_module(mod_name)
    rel = Path(*mod_name.split("."))
    path = old_tree / (rel / "__init__.py" if (ROOT / rel).is_dir() else rel.with_suffix(".py"))
    loader = importlib.util.spec_from_file_location("_old_" + mod_name.replace(".", "_"), path)
    old_mod = importlib.util.module_from_spec(loader)
    sys.modules[loader.name] = old_mod  # (dataclasses look their module up there)
    loader.loader.exec_module(old_mod)
    *path_parts, name = qual.split(".")
    owner, old_owner = new_mod, old_mod
    for part in path_parts:
        owner, old_owner = getattr(owner, part), getattr(old_owner, part)
    get = (lambda o: o.__dict__[name]) if isinstance(owner, type) else (lambda o: getattr(o, name))
    return owner, name, get(old_owner), get(owner)


def run(workload: str, fim_type: str, rounds: int, swaps: list, seed: int = 0,
        size: str = "full") -> dict:
    """Paired step times of the old and new functions (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    import fimfast
    from benchmarks.workloads import build

    torch.set_num_threads(1)
    wl = build(workload, size, 0)
    model, batch = wl.model, (wl.inputs, wl.labels)
    params = [p for p in model.parameters() if p.requires_grad]
    est = fimfast.DiagFisher(model, fim_type, seed=0)
    clock, order_rng = time.process_time_ns, random.Random(seed)
    times: dict[str, list[int]] = {"old": [], "new": []}
    try:
        for i in range(rounds + 3):  # three warm-up rounds
            got = {}
            for which in order_rng.sample(["old", "new"], 2):
                for owner, name, old, new in swaps:
                    setattr(owner, name, old if which == "old" else new)
                t0 = clock()
                est.step(batch)
                got[which] = clock() - t0
                z = model(wl.inputs)
                z = z.logits if hasattr(z, "logits") else z
                F.cross_entropy(z.flatten(0, -2), wl.labels.flatten()).backward()
                for p in params:
                    p.grad = None
            if i >= 3:
                for k, v in got.items():
                    times[k].append(v)
    finally:
        for owner, name, _, new in swaps:
            setattr(owner, name, new)
    d = sorted((n - o) / 1e3 for o, n in zip(times["old"], times["new"]))
    return {
        "workload": workload, "fim_type": fim_type, "rounds": rounds,
        "old_median_us": statistics.median(times["old"]) / 1e3,
        "new_median_us": statistics.median(times["new"]) / 1e3,
        "diff_median_us": statistics.median(d),
        "diff_q25_us": d[len(d) // 4], "diff_q75_us": d[(3 * len(d)) // 4],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-tree", required=True, type=Path)
    ap.add_argument("--swap", nargs="+", required=True)
    ap.add_argument("--workload", default="a")
    ap.add_argument("--types", default="hutchinson")
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    swaps = [_pair(s, a.old_tree.resolve()) for s in a.swap]
    out = []
    for t in a.types.split(","):
        out.append(run(a.workload, t, a.rounds, swaps, size=a.size))
        print(json.dumps(out[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
