"""Paired in-process A/B of the extension's ``fold_lanes`` (csrc/fold_lanes.cpp): the source of an
earlier commit, built apart as a plain pybind11 module (no torch operator registered: it loads
beside ``fimfast._C``), against this tree's build, swapped into ``fimfast.persample.lanes._HOST``
before each step.

Every round runs, in a new random order, a prepared step of each version (``DiagFisher(model,
type).step(batch)``, one estimator per version, the state accumulating) and a training step
(forward, cross-entropy, backward into ``.grad``) on workload (a) of :mod:`benchmarks.workloads`,
one torch thread, CPU time of the process. Reported per type: the ATen operators of one step of
each version (:class:`benchmarks.opcount.OpCounter`), the medians and paired ratios to the
training step, the median paired difference ``new - old`` with its quartiles, and whether the two
estimators end bit for bit equal.

    PYTHONPATH=. python benchmarks/bench_fold_lanes_ab.py --old-commit 87fdfcb --rounds 2000
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _old_fold(commit: str, build_dir: Path):
    """``fold_lanes`` of ``commit``'s csrc/fold_lanes.cpp, compiled into ``build_dir``."""
    from torch.utils.cpp_extension import load

    src = subprocess.run(["git", "show", f"{commit}:csrc/fold_lanes.cpp"], capture_output=True,
                         text=True, check=True).stdout
    src = src.replace('#include "fold_lanes.h"', "#include <optional>\n#include <vector>")
    src = src.replace("bool fold_lanes(", "bool fold_lanes_old(")
    src += ("#include <torch/extension.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) "
            '{ m.def("fold_lanes", &fimfast::fold_lanes_old); }\n')
    path = build_dir / "fold_lanes_old.cpp"
    path.write_text(src)
    return load("fold_lanes_old", [str(path)], extra_cflags=["-O3", "-std=c++20"],
                build_directory=str(build_dir)).fold_lanes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-commit", required=True)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--types", default="empirical,monte_carlo")
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import fimfast
    from benchmarks.opcount import OpCounter
    from benchmarks.workloads import build
    from fimfast import _ext
    from fimfast.persample import lanes

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {"old": _old_fold(a.old_commit, Path(tmp)), "new": _ext.host_function("fold_lanes")}
    w = build("a", "full", 0)
    m, x, y = w.model, w.inputs, w.labels
    for t in a.types.split(","):
        ests = {k: fimfast.DiagFisher(m, t, seed=0) for k in fns}

        def run(k, ests=ests):
            lanes._HOST[:] = [fns[k]]
            ests[k].step((x, y))

        for k in fns:
            for _ in range(3):
                run(k)
            with OpCounter() as c:
                run(k)
            print(f"{t} {k}: {c.total - c.views} / {c.total} ATen operators (kernels / all)")
        times: dict[str, list[int]] = {"old": [], "new": [], "floor": []}
        rng = random.Random(0)
        for _ in range(a.rounds):
            for k in rng.sample(list(times), 3):
                t0 = time.process_time_ns()
                if k == "floor":
                    m.zero_grad(set_to_none=True)
                    F.cross_entropy(m(x), y).backward()
                else:
                    run(k)
                times[k].append(time.process_time_ns() - t0)
        for k in fns:
            r = sorted(p / q for p, q in zip(times[k], times["floor"]))
            print(f"{t} {k}: {statistics.median(times[k]) / 1e3:.0f} us, "
                  f"{statistics.median(r):.3f} ({r[len(r) // 4]:.3f}-{r[3 * len(r) // 4]:.3f}) "
                  "training steps")
        d = sorted((p - q) / 1e3 for p, q in zip(times["new"], times["old"]))
        iqr = d[3 * len(d) // 4] - d[len(d) // 4]
        print(f"{t} new - old: {statistics.median(d):.1f} us (quartiles {d[len(d) // 4]:.1f} .. "
              f"{d[3 * len(d) // 4]:.1f}, standard error ~{0.93 * iqr / len(d) ** 0.5:.1f}), "
              f"{a.rounds} rounds")
        got = [e.result() for e in ests.values()]
        same = all(torch.equal(got[0][n], got[1][n]) for n in got[0])
        print(f"{t}: the two estimators are bit for bit equal: {same}")


if __name__ == "__main__":
    main()
