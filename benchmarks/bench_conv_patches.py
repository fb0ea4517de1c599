"""Peak tensor memory and CPU time of the per-sample estimators on convnets, with the unfolded
input patches of every convolution unfolded once and kept for the step (``kept``) against
formed a few samples at a time whenever the squares read them (``chunked``:
``fimfast.rules.conv.PATCHES_LAZY_FROM = 0``, and no windows kept:
``fimfast.rules.windows.WINDOWS_KEEP_MAX = 0``) and the default (by pieces, except patches of at
most ``PATCHES_LAZY_FROM`` bytes and the windows of ``fimfast/rules/windows.py`` in a step of
several chunks of columns).

Workloads: (c) of :mod:`benchmarks.workloads` (two 5x5 convs, 28x28, B=64) and ``c3``: three
3x3 convs (3-32-64-64 channels, padding 1), 32x32 inputs, B=64, a linear head. Methods:
``exact`` (one backward of every column below 64 MiB), ``exact@bound`` (the training-step bound
of :func:`fimfast.chunks.fast_columns` forced: one column per backward, squares streamed),
``empirical``. Memory: :class:`benchmarks.memory.TensorPeakMeter` of one step after ``reset()``
(exact, repeatable), largest of 2 calls after 2 warm-up calls. Time: CPU time
(``time.process_time``) per step, every (method, mode) warmed up and then ``--rounds`` rounds
in a shuffled order; ratios to ``kept`` of the same round, median and range.

Usage: ``python -m benchmarks.bench_conv_patches --threads 1 --rounds 7``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from torch import nn

from benchmarks import memory
from benchmarks.workloads import build

MODES = ("kept", "chunked", "default")
METHODS = ("exact", "exact@bound", "empirical")


def _c3(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def _workload(key: str):
    if key == "c3":
        return _c3()
    wl = build(key, "full", 0)
    return wl.model, wl.inputs, wl.labels


def _runner(key: str, method: str, mode: str):
    import fimfast
    from fimfast import chunks
    from fimfast.rules import conv

    model, X, y = _workload(key)
    name, _, opt = method.partition("@")
    est = fimfast.DiagFisher(model, name, reduction="sum")
    try:
        from fimfast.rules import windows
    except ImportError:  # trees before the convolutions' windows
        windows = None
    default_lazy = conv.PATCHES_LAZY_FROM
    default_windows = None if windows is None else windows.WINDOWS_KEEP_MAX
    default_bound = getattr(chunks, "TRAIN_BOUND_FROM", None)  # trees with a threshold

    default_side = conv.ConvRule._input_side

    def step():
        if mode == "kept":  # the whole batch's patches, unfolded once and kept for the step
            conv.ConvRule._input_side = lambda self, module, x, *a: self._patches(module, x)
        elif mode == "chunked":
            conv.PATCHES_LAZY_FROM = 0
            if windows is not None:  # trees with fimfast/rules/windows.py: none kept either
                windows.WINDOWS_KEEP_MAX = 0
        if default_bound is not None:
            chunks.TRAIN_BOUND_FROM = 0 if opt == "bound" else default_bound
        try:
            est.reset()
            est.step((X, y))
        finally:
            conv.PATCHES_LAZY_FROM = default_lazy
            if windows is not None:
                windows.WINDOWS_KEEP_MAX = default_windows
            if default_bound is not None:
                chunks.TRAIN_BOUND_FROM = default_bound
            conv.ConvRule._input_side = default_side

    return step, est


def _floor_mb(key: str) -> float:
    """Peak tensor MB of one training step (forward, backward of the mean cross-entropy)."""
    model, X, y = _workload(key)

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(X), y).backward()

    step()
    model.zero_grad(set_to_none=True)
    tm = memory.TensorPeakMeter()
    tm.begin()
    step()
    return tm.end()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="c,c3")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res: dict = {}
    for key in a.workloads.split(","):
        runs = {(m, md): _runner(key, m, md) for m in METHODS for md in MODES}
        mem = {}
        for (m, md), (step, est) in runs.items():
            for _ in range(2):
                step()
            peaks = []
            for _ in range(2):
                est.reset()
                tm = memory.TensorPeakMeter()
                tm.begin()
                step()
                peaks.append(tm.end())
            mem[f"{m}/{md}"] = max(peaks)
        cpu: dict = {f"{m}/{md}": [] for m, md in runs}
        rng = random.Random(0)
        for _ in range(a.rounds):
            order = list(runs)
            rng.shuffle(order)
            for m, md in order:
                step = runs[(m, md)][0]
                c0 = time.process_time()
                step()
                cpu[f"{m}/{md}"].append((time.process_time() - c0) * 1e3)
        rows = {"floor_tensor_mb": round(_floor_mb(key), 3)}
        print(key, "floor (training step) tensor MB", rows["floor_tensor_mb"], flush=True)
        for m in METHODS:
            base = cpu[f"{m}/kept"]
            for md in MODES:
                k = f"{m}/{md}"
                r = [x / b for x, b in zip(cpu[k], base)]
                rows[k] = {"tensor_mb": round(mem[k], 3),
                           "cpu_ms_median": round(statistics.median(cpu[k]), 2),
                           "ratio_median": round(statistics.median(r), 3),
                           "ratio_min": round(min(r), 3), "ratio_max": round(max(r), 3)}
                print(key, k, json.dumps(rows[k]), flush=True)
        res[key] = rows
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"settings": vars(a), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
