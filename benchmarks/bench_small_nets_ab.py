"""Paired in-process A/B of the small nets' changes
(benchmarks/results/small_nets_cpu_2026-12-07.md).

``empirical``: an EMPIRICAL step with each change swapped out (the channel norms' lane
``fimfast.persample.norm_lane``, the batch norm's recorded forward ``fimfast.rules.norm_forward``,
the one-object guard of a model with buffers ``fimfast.guard.StepKept``, all three);
``hutchinson``: a HUTCHINSON step against the general path under the nested guards. Interleaved
with a training step in the same rounds (CPU time, one torch thread); each line is the median
step and its ratio to the median training step.

    PYTHONPATH=. python benchmarks/bench_small_nets_ab.py deep_mlp 200 empirical
    PYTHONPATH=. python benchmarks/bench_small_nets_ab.py resnet_bn 200 hutchinson
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fimfast  # noqa: E402
from fimfast import guard, prepared  # noqa: E402
from fimfast.persample import norm_lane  # noqa: E402
from fimfast.rules import forwards  # noqa: E402


def _model(name: str):
    if name == "resnet_bn":
        from bench_persample_cost import small_cnn

        model, batch = small_cnn("resnet_bn")
        return model.eval(), batch, {}, lambda m, b: F.cross_entropy(m(b[0]), b[1])
    from bench_zoo import build

    model, batch, opts, loss = build(name)
    return model.eval(), batch, opts, loss


def _old_step_kept(buffers, walk, model, names, params):
    mods, tables = walk.of(model, params)
    if tables or buffers.has_buffers(model):
        return guard._all_kept(buffers, model, tables, names, params, mods)
    return guard.StepKept(names, params, mods)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet_bn"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    kind = sys.argv[3] if len(sys.argv) > 3 else "empirical"
    torch.set_num_threads(1)
    model, batch, opts, loss = _model(name)
    new_sk, take, rec, step = guard.step_kept, norm_lane.take, forwards.norm_recorder, prepared.step

    def make(lane=True, recorded=True, one_guard=True, prepared_step=True):
        forwards.norm_recorder = rec if recorded else (lambda m, r: None)
        est = fimfast.DiagFisher(model, kind, seed=0, **opts)
        forwards.norm_recorder = rec

        def run():
            norm_lane.take = take if lane else (lambda *a: False)
            guard.step_kept = new_sk if one_guard else _old_step_kept
            prepared.step = step if prepared_step else (lambda est, b: False)
            est.step(batch)

        return run

    def train():
        model.zero_grad(set_to_none=True)
        loss(model, batch).backward()

    if kind == "hutchinson":
        calls = {"new": make(), "general path, nested guards": make(one_guard=False,
                                                                     prepared_step=False)}
    else:
        calls = {"new": make(), "no norm lane": make(lane=False),
                 "no recorded forward": make(recorded=False),
                 "nested guards": make(one_guard=False),
                 "none of the three": make(False, False, False)}
    calls["train"] = train
    for f in calls.values():
        for _ in range(5):
            f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            c = time.process_time()
            f()
            times[k].append(time.process_time() - c)
    tr = statistics.median(times["train"])
    for k, v in times.items():
        print(f"{name} {kind} {k:28s} {statistics.median(v) * 1e3:.3f} ms  "
              f"{statistics.median(v) / tr:.3f}")


if __name__ == "__main__":
    main()
