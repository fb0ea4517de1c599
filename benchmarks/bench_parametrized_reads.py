"""The cost of watching parametrized tensors in a per-sample step (``fimfast.parametrized_reads``):
one EXACT ``DiagFisher`` step with the watch and with it switched off (a no-op context swapped in),
interleaved in one process, beside a training step of the same model.

The model: 20 ``Linear(64, 64)`` - Tanh, then ``Linear(64, 10)``, each Linear parametrized by
``--kind`` (``weight_norm`` or ``spectral_norm``, training mode), a batch of 32. One torch thread,
CPU time, medians and quartiles (ms) over ``--rounds``::

    PYTHONPATH=. python benchmarks/bench_parametrized_reads.py --kind spectral_norm --rounds 30
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrizations as PZ

import fimfast
from fimfast import parametrized_reads as pr


@contextlib.contextmanager
def _off(model):
    yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=["weight_norm", "spectral_norm"], default="spectral_norm")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    for m in model:
        if isinstance(m, nn.Linear):
            getattr(PZ, args.kind)(m)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    est = fimfast.DiagFisher(model, "exact")
    watched = pr.watched

    def step():
        est.step((x, y))

    def train():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(3):
        step()
        train()
    times: dict[str, list[float]] = {"watched": [], "off": [], "train": []}
    for _ in range(args.rounds):
        for k in times:
            pr.watched = watched if k == "watched" else _off
            t = time.process_time()
            (train if k == "train" else step)()
            times[k].append(time.process_time() - t)
    pr.watched = watched
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.kind}: 20 x Linear(64, 64) + Linear(64, 10), batch 32, EXACT, "
          f"{args.rounds} rounds, one thread, CPU time")
    for k, v in times.items():
        q = statistics.quantiles([t * 1e3 for t in v], n=4)
        print(f"  {k}: median {med[k]:.2f} ms (quartiles {q[0]:.2f}-{q[2]:.2f}), "
              f"{med[k] / med['train']:.2f} x training step")
    print(f"  watched / off: {med['watched'] / med['off']:.3f}")


if __name__ == "__main__":
    main()
