"""The per-sample estimators on models built around Conv3d, ConvTranspose2d, EmbeddingBag,
InstanceNorm2d, PReLU and Bilinear, as ratios to one training step measured in the same
interleaved rounds, with their layer rules and without them (the generic path: one batched
backward per (row, column) pair).

Workloads (float32, batch of 16, classifiers, one row per sample):

* ``conv3d``: Conv3d(1, 8, 3) - ReLU - MaxPool3d(2) - Conv3d(8, 16, 3, padding=1) - ReLU -
  MaxPool3d(2) - Linear(16*2*3*3, 10) on 1 x 10 x 14 x 14 volumes;
* ``convT2d``: Conv2d(3, 16, 3, stride=2) - ReLU - ConvTranspose2d(16, 8, 4, stride=2,
  padding=1) - ReLU - ConvTranspose2d(8, 4, 3, stride=1, padding=1, groups=2) - ReLU - average
  pool 4 - Linear(4*7*7, 10) on 3 x 29 x 29 images;
* ``convT1d``: Conv1d(3, 16, 3, stride=2) - ReLU - ConvTranspose1d(16, 8, 4, stride=2,
  padding=1) - ReLU - ConvTranspose1d(8, 4, 3, padding=1, groups=2) - ReLU - average pool 4 -
  Linear(4*32, 10) on 3 x 129 signals;
* ``convT3d``: Conv3d(1, 8, 3, stride=2) - ReLU - ConvTranspose3d(8, 8, 4, stride=2,
  padding=1) - ReLU - ConvTranspose3d(8, 4, 3, padding=1, groups=2) - ReLU - average pool 4 -
  Linear(4*2*3*3, 10) on 1 x 9 x 13 x 13 volumes;
* ``bag``: EmbeddingBag(20000, 64, mode="mean") over flat ids with offsets (bags of 20 to 80
  ids) - Linear(64, 64) - ReLU - Linear(64, 4): the text classifier of the classic AG News
  tutorial with a hidden layer;
* ``instnorm_cnn``: Conv2d(3, 16, 3, padding=1) - GroupNorm(4, 16) - ReLU - Conv2d(16, 16, 3,
  padding=1, groups=16) - InstanceNorm2d(16, affine=True) - ReLU - global average pool -
  Linear(16, 10) on 3 x 16 x 16 images;
* ``prelu_mlp``: Linear(32, 64) - PReLU() - Linear(64, 64) - PReLU(64) - Linear(64, 5);
* ``bilinear``: Bilinear(16, 16, 5) of ``x`` and ``tanh(x)``, the logits layer (16 features).

Methods: ``train`` (forward, cross-entropy, backward into ``.grad``: the floor), and
``DiagFisher(model, t).step(batch)`` for ``t`` in EXACT, EMPIRICAL, MONTE_CARLO (one draw), with
the rules (``<t>``) and with the rules of the layers above removed (``<t>_generic``, what the
engine did before they had rules; left out with ``--no-generic``), and HUTCHINSON. Every call is
timed by the process's CPU time (``--clock cpu``, the default: other processes' load disturbs it
less than wall time) or by wall time (``--clock wall``); a cell is the median over the rounds of
the call's time over the training step's in the same round, with the interquartile range of those
per-round ratios (``--json`` writes them all).

    PYTHONPATH=. python benchmarks/bench_layers.py [--rounds 11] [--threads 1] [--quick]
        [--workloads conv3d,convT2d,bag,instnorm_cnn,prelu_mlp,bilinear] [--clock cpu|wall]
        [--no-generic] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fimfast  # noqa: E402
from benchmarks.timing import CallTimer, interleaved  # noqa: E402

TYPES = ("exact", "empirical", "monte_carlo")
CAPTURED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.EmbeddingBag)
# the classes the rules are registered for (InstanceNorm1d/2d/3d share _InstanceNorm's)
LAYERS = (*CAPTURED, nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Bilinear)


class BilinearHead(nn.Module):
    """``Bilinear(x, tanh(x))``: the logits."""

    def __init__(self, d: int, C: int):
        super().__init__()
        self.b = nn.Bilinear(d, d, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x, torch.tanh(x))


class BagClassifier(nn.Module):
    """EmbeddingBag (flat ids + offsets) - Linear - ReLU - Linear."""

    def __init__(self, vocab: int, d: int, C: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean")
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, C)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.bag(ids, offsets))))


def build(name: str, N: int = 16):
    """``(model, batch, call)``: ``call(model, batch)`` returns the logits; ``batch`` is what
    ``DiagFisher.step`` takes."""
    torch.manual_seed(0)
    if name == "conv3d":
        model = nn.Sequential(
            nn.Conv3d(1, 8, 3), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Flatten(), nn.Linear(16 * 2 * 3 * 3, 10),
        )
        return model, (torch.randn(N, 1, 10, 14, 14), torch.randint(0, 10, (N,)))
    if name == "convT2d":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 3, stride=1, padding=1, groups=2), nn.ReLU(),
            nn.AvgPool2d(4), nn.Flatten(), nn.Linear(4 * 7 * 7, 10),
        )
        return model, (torch.randn(N, 3, 29, 29), torch.randint(0, 10, (N,)))
    if name == "convT1d":
        model = nn.Sequential(
            nn.Conv1d(3, 16, 3, stride=2), nn.ReLU(),
            nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose1d(8, 4, 3, stride=1, padding=1, groups=2), nn.ReLU(),
            nn.AvgPool1d(4), nn.Flatten(), nn.Linear(4 * 32, 10),
        )
        return model, (torch.randn(N, 3, 129), torch.randint(0, 10, (N,)))
    if name == "convT3d":
        model = nn.Sequential(
            nn.Conv3d(1, 8, 3, stride=2), nn.ReLU(),
            nn.ConvTranspose3d(8, 8, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose3d(8, 4, 3, stride=1, padding=1, groups=2), nn.ReLU(),
            nn.AvgPool3d(4), nn.Flatten(), nn.Linear(4 * 2 * 3 * 3, 10),
        )
        return model, (torch.randn(N, 1, 9, 13, 13), torch.randint(0, 10, (N,)))
    if name == "bag":
        lengths = torch.randint(20, 81, (N,))
        ids = torch.randint(0, 20000, (int(lengths.sum()),))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        batch = {"ids": ids, "offsets": offsets, "labels": torch.randint(0, 4, (N,))}
        return BagClassifier(20000, 64, 4), batch
    if name == "instnorm_cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.InstanceNorm2d(16, affine=True),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
        return model, (torch.randn(N, 3, 16, 16), torch.randint(0, 10, (N,)))
    if name == "prelu_mlp":
        model = nn.Sequential(nn.Linear(32, 64), nn.PReLU(), nn.Linear(64, 64), nn.PReLU(64),
                              nn.Linear(64, 5))
        return model, (torch.randn(N, 32), torch.randint(0, 5, (N,)))
    if name == "bilinear":
        return BilinearHead(16, 5), (torch.randn(N, 16), torch.randint(0, 5, (N,)))
    raise KeyError(name)


def _logits(model, batch):
    if isinstance(batch, dict):
        return model(batch["ids"], batch["offsets"]), batch["labels"]
    return model(batch[0]), batch[1]


def methods(model, batch, generic: bool = True) -> dict:
    """``{method: (fn, cleanup)}`` of one workload, warmed up; with ``generic``, also the
    estimators with the layers' rules removed, checked to agree with the rules."""

    def train():
        model.zero_grad(set_to_none=True)
        z, y = _logits(model, batch)
        F.cross_entropy(z, y).backward()

    calls = {"train": train}
    ests = {t: fimfast.DiagFisher(model, t, seed=0) for t in (*TYPES, "hutchinson")}
    saved = {c: fimfast.rules.unregister_rule(c) for c in LAYERS} if generic else {}
    try:  # estimators look the layers up in their first step: these without a rule
        for t in TYPES if generic else ():
            est = ests[f"{t}_generic"] = fimfast.DiagFisher(model, t, seed=0)
            # without their rules, the layers' own F.conv3d / F.conv_transpose2d /
            # F.embedding_bag calls would be captured as functional calls
            est._persample.functional = not any(isinstance(m, CAPTURED) for m in model.modules())
            est.step(batch)
            assert est._persample.last_plan.generic
    finally:
        for c, r in saved.items():
            fimfast.register_rule(c, r)
    for name, est in ests.items():
        calls[name] = (lambda e: lambda: e.step(batch))(est)
    for m, fn in calls.items():  # warm-up (plans, probes): as many steps for every estimator
        for _ in range(1 if m.endswith("_generic") else 2):
            fn()
    for t in TYPES if generic else ():  # the two paths must agree
        a, b = ests[t].result(), ests[f"{t}_generic"].result()
        rel = (a.to_vector() - b.to_vector()).norm() / b.to_vector().norm()
        assert rel < 1e-4, (t, float(rel))
    for t in TYPES:
        plan = ests[t]._persample.last_plan
        assert not plan.generic, plan.reasons
    return {m: (fn, None) for m, fn in calls.items()}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", default="conv3d,convT2d,bag")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--no-generic", action="store_true", help="leave out the generic path")
    ap.add_argument("--json", default=None, help="write the per-round ratios here")
    ap.add_argument("--quick", action="store_true", help="2 rounds, batch of 4 (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    timer = CallTimer(600.0, clock=clock)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} interleaved rounds, "
          f"{args.clock} time; median over rounds of time / training step [interquartile range]")
    report = {}
    for name in args.workloads.split(","):
        model, batch = build(name, 4 if args.quick else 16)
        calls = methods(model, batch, generic=not args.no_generic)
        times = interleaved(calls, {m: rounds for m in calls}, timer)
        floor = times["train"]
        ratios = {m: [a / b for a, b in zip(t, floor)] for m, t in times.items() if m != "train"}
        report[name] = {"train_ms": [t * 1e3 for t in floor], "ratios": ratios}
        cells = []
        for m, r in ratios.items():
            lo, med, hi = _quartiles(r)
            cells.append(f"{m} {med:.2f}x [{lo:.2f}-{hi:.2f}]")
        print(f"{name}: train {statistics.median(floor) * 1e3:.2f} ms; " + ", ".join(cells),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
