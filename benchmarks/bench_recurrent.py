"""Recurrent layers and attention with ``bias_k``: per-sample steps relative to a training step.

Workloads (CPU, float32, N=16 sequences of T=20 steps, 32 input features):

* ``gru_cls``: ``nn.GRU(32, 64)``, a Linear classifier (10 classes) on the last hidden state;
* ``lstm_tag``: ``nn.LSTM(32, 64)``, a Linear tagger per step: ``(N, T, 8)`` logits;
* ``lstm_tag+seqrows``: the same with ``sequence_rows=True`` (EMPIRICAL, MONTE_CARLO only);
* ``mha_bias_kv``: Linear, ``nn.MultiheadAttention(64, 4, add_bias_kv=True)`` with a residual,
  mean over tokens, Linear classifier (10 classes);
* ``grucell_cls`` / ``lstmcell_cls`` (N=64 sequences of T=16 steps): ``nn.GRUCell(32, 128)`` /
  ``nn.LSTMCell(32, 128)`` looped over the steps, a Linear classifier (10 classes) on the last
  hidden state. Timed as well, in the same rounds: ``exact_generic`` and ``empirical_generic``,
  the same model (same weights) with the cell's forward overridden by an identical one and
  every parameter on the generic path (the estimator's rules off: the functional capture would
  otherwise record the cell's ``torch.gru_cell`` call; ``exact_generic``: one call per round).

In one process, in rounds: a training step (forward, cross-entropy, backward, SGD step), then a
step of each of EXACT, EMPIRICAL and MONTE_CARLO (``DiagFisher.step``), each timed in CPU time of
the process (one torch thread); the figures are medians over the rounds, divided by the training
step's. EXACT on ``lstm_tag`` is timed once per round for the first two rounds (it is the slow
one without the recurrent rule).

Usage: ``python benchmarks/bench_recurrent.py [--rounds 3] [--workloads gru_cls,lstm_tag]
[--no-generic]`` (``--no-generic``: without the cell workloads' ``*_generic`` steps);
prints one JSON object ``{workload: {type: ratio, "train_ms": ms}}``. To compare two trees,
alternate runs of this script from each (``PYTHONPATH=<tree>``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import fimfast

WORKLOADS = ("gru_cls", "lstm_tag", "lstm_tag+seqrows", "mha_bias_kv", "grucell_cls",
             "lstmcell_cls")


class GRUClassifier(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.rnn, self.head = nn.GRU(d_in, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[1][-1])


class LSTMTagger(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 8):
        super().__init__()
        self.rnn, self.head = nn.LSTM(d_in, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class BiasKVClassifier(nn.Module):
    def __init__(self, d_in: int = 32, d: int = 64, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True, add_bias_kv=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a + h).mean(1))


class CellLoop(nn.Module):
    def __init__(self, cell: nn.Module, classes: int = 10):
        super().__init__()
        self.cell, self.head = cell, nn.Linear(cell.hidden_size, classes)

    def forward(self, x):
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h[0] if isinstance(h, tuple) else h)


class _NoRuleGRUCell(nn.GRUCell):
    def forward(self, input, hx=None):
        return super().forward(input, hx)


class _NoRuleLSTMCell(nn.LSTMCell):
    def forward(self, input, hx=None):
        return super().forward(input, hx)


def cell_loop(name: str, generic: bool = False) -> CellLoop:
    """The model of a cell workload (seeded); ``generic``: its cell without a rule."""
    torch.manual_seed(1)
    lstm = name.startswith("lstm")
    cls = (_NoRuleLSTMCell if lstm else _NoRuleGRUCell) if generic else (
        nn.LSTMCell if lstm else nn.GRUCell)
    return CellLoop(cls(32, 128))


def workload(name: str, N: int = 16, T: int = 20):
    """``(model, x, y)`` of workload ``name`` (seeded)."""
    torch.manual_seed(0)
    if name in ("grucell_cls", "lstmcell_cls"):
        return cell_loop(name), torch.randn(64, 16, 32), torch.randint(0, 10, (64,))
    x = torch.randn(N, T, 32)
    base = name.replace("+seqrows", "")
    if base == "gru_cls":
        return GRUClassifier(), x, torch.randint(0, 10, (N,))
    if base == "lstm_tag":
        return LSTMTagger(), x, torch.randint(0, 8, (N, T))
    if base == "mha_bias_kv":
        return BiasKVClassifier(), x, torch.randint(0, 10, (N,))
    raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")


def run(name: str, rounds: int, generic: bool = True) -> dict[str, float]:
    """Median ratios of the per-sample steps to a training step (see the module docstring)."""
    model, x, y = workload(name)
    seqrows = name.endswith("+seqrows")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train() -> None:
        opt.zero_grad()
        z = model(x)
        nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    kinds = ("empirical", "monte_carlo") if seqrows else ("exact", "empirical", "monte_carlo")
    opts = {"sequence_rows": True} if seqrows else {}
    fns = {"train": train}
    for k in kinds:
        est = fimfast.DiagFisher(model, k, class_dim=-1, **opts)
        fns[k] = lambda est=est: est.step((x, y))
    cells = name.endswith("cell_cls") and generic
    if cells:  # the same model with the cell on the generic path, in the same rounds
        gen = cell_loop(name, generic=True)
        gen.load_state_dict(model.state_dict())
        for k in ("exact", "empirical"):
            est = fimfast.DiagFisher(gen, k, class_dim=-1)
            # the functional capture records the cell's own torch.gru_cell call: no rule at all
            est._persample.use_rules = False
            fns[k + "_generic"] = lambda est=est: est.step((x, y))
        kinds = (*kinds, "exact_generic", "empirical_generic")
    for f in fns.values():  # warm-up: plans, probes, allocations
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    slow = name == "lstm_tag"
    for r in range(rounds):
        for k, f in fns.items():
            if k == "exact" and slow and r >= 2:
                continue
            for _ in range(1 if (k == "exact" and slow) or k == "exact_generic" else 3):
                t0 = time.process_time()
                f()
                times[k].append(time.process_time() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {k: med[k] / med["train"] for k in kinds} | {"train_ms": med["train"] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--no-generic", action="store_true",
                    help="skip the cell workloads' *_generic steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({w: run(w, args.rounds, not args.no_generic)
                      for w in args.workloads.split(",")}))


if __name__ == "__main__":
    main()
