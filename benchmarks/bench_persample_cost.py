"""Cost of a per-sample step (EMPIRICAL, MONTE_CARLO) as a ratio to one training step.

Workloads: (a) and (e) of :mod:`benchmarks.workloads` (full size), and ``convT1d`` and ``bag`` of
:mod:`benchmarks.bench_layers`. A child process times, in rounds, a training step (forward,
cross-entropy, backward into ``.grad``: the floor) and ``DiagFisher(model, t).step(batch)`` for
each type (the state accumulates, as in a loop), by the process's CPU time
(``time.process_time``), one torch thread, and prints the median of each over the floor's.

``--trees A B`` compares source trees: every round runs one child per tree, in a new random order
(``PYTHONPATH`` set to the tree, the working directory the tree); a cell is the median over the
rounds of the child's ratio, with its min and max. ``--out PATH`` writes ``PATH.json`` (every
child's figures) and ``PATH.md``.

    python benchmarks/bench_persample_cost.py --trees OLD NEW --rounds 9 --out PATH

``--order shuffled`` runs the floor and the types of a child in a new random order every round
instead of the fixed order (the floor, then the types as listed): with the fixed order each type
runs right after the one listed before it and the floor right after the last, whose code and data
they find warm or cold in the caches (on (e) a HUTCHINSON step after a MONTE_CARLO step, which runs
fimfast's own attention forward, against a floor after HUTCHINSON, which runs torch's as the
floor does); a shuffled round gives every step a random predecessor.

``--fim-types exact,hutchinson`` times those types on every workload instead; ``exact:cc9`` is
EXACT with ``class_chunk=9`` (every column in one batched backward). Workload ``mha_bias_kv`` is
that of :mod:`benchmarks.bench_recurrent`, ``resnet_bn``, ``groupnorm_cnn`` and ``conv1d_dilated``
the small classifiers of :func:`small_cnn`, ``encoder``, ``gru``, ``tied`` and their ``_ckpt``
variants (checkpointed) those of :func:`checkpointed`, ``moe_*`` and ``split`` the models routing
rows of the batch of :func:`moe_workload`, ``mixtral_*`` and ``stacked_*`` the models with stacked
experts of :func:`stacked_workload` (all defined here, so that a tree compared with
``--trees`` needs no module of its own for them), the other names those of
:mod:`benchmarks.bench_layers`.
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

WORKLOADS = {
    "a": ("empirical", "monte_carlo"),
    "e": ("empirical", "monte_carlo"),
    "convT1d": ("empirical", "monte_carlo"),
    "bag": ("empirical",),
}


def small_cnn(name: str, N: int = 16):
    """``(model, (inputs, labels))`` of a small image or signal classifier with norms, strided,
    depthwise and dilated convolutions (float32, 10 classes):

    * ``resnet_bn``: Conv2d(3, 16, 3, padding=1, bias=False) - BatchNorm2d - ReLU - Conv2d(16,
      32, 3, stride=2, padding=1, bias=False) - BatchNorm2d - ReLU - global average pool -
      Linear(32, 10), eval mode (running statistics), on 3 x 16 x 16 images;
    * ``groupnorm_cnn``: Conv2d(3, 16, 3, padding=1) - GroupNorm(4, 16) - ReLU - Conv2d(16, 16,
      3, padding=1, groups=16) - InstanceNorm2d(16, affine=True) - ReLU - global average pool -
      Linear(16, 10) on 3 x 16 x 16 images;
    * ``conv1d_dilated``: Conv1d(4, 16, 5, dilation=2, padding="same") - ReLU - Conv1d(16, 16, 3,
      padding=2, padding_mode="reflect") - ReLU - AdaptiveMaxPool1d(4) - Linear(64, 10) on 4 x 64
      signals."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "resnet_bn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        ).eval()
        x = torch.randn(N, 3, 16, 16)
    elif name == "groupnorm_cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.InstanceNorm2d(16, affine=True),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
        x = torch.randn(N, 3, 16, 16)
    elif name == "conv1d_dilated":
        model = nn.Sequential(
            nn.Conv1d(4, 16, 5, dilation=2, padding="same"), nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=2, padding_mode="reflect"), nn.ReLU(),
            nn.AdaptiveMaxPool1d(4), nn.Flatten(), nn.Linear(64, 10),
        )
        x = torch.randn(N, 4, 64)
    else:
        raise KeyError(name)
    return model, (x, torch.randint(0, 10, (N,)))


SMALL_CNNS = ("resnet_bn", "groupnorm_cnn", "conv1d_dilated")
CHECKPOINTED = ("encoder", "encoder_ckpt", "gru", "gru_ckpt", "tied", "tied_ckpt")


def checkpointed(name: str, N: int = 16):
    """``(model, (inputs, labels))`` of a small model whose body runs, for names ending in
    ``_ckpt``, in ``torch.utils.checkpoint(..., use_reentrant=False)`` segments (float32, 10
    classes, sequences of 16 steps):

    * ``encoder``: Linear(8, 64) - 2 x nn.TransformerEncoderLayer(64, 4, 128, dropout=0,
      batch_first=True), one segment each - mean over positions - Linear(64, 10), eval mode;
    * ``gru``: nn.GRU(8, 32, batch_first=True) in one segment - last step - Linear(32, 10);
    * ``tied``: Embedding(10, 32) - tanh(Linear(32, 32)) - mean over positions - F.linear(h,
      emb.weight) (a head tied to the table through a functional call), all in one segment."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ck = name.endswith("_ckpt")
    base = name.removesuffix("_ckpt")

    def seg(f, *a):
        return checkpoint(f, *a, use_reentrant=False) if ck else f(*a)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            if base == "encoder":
                self.inp, self.o = nn.Linear(8, 64), nn.Linear(64, 10)
                self.layers = nn.ModuleList(nn.TransformerEncoderLayer(
                    64, 4, 128, dropout=0.0, batch_first=True) for _ in range(2))
            elif base == "gru":
                self.rnn, self.o = nn.GRU(8, 32, batch_first=True), nn.Linear(32, 10)
            elif base == "tied":
                self.emb, self.lin = nn.Embedding(10, 32), nn.Linear(32, 32)
            else:
                raise KeyError(name)

        def forward(self, x):
            if base == "encoder":
                h = self.inp(x)
                for m in self.layers:
                    h = seg(m, h)
                return self.o(h.mean(1))
            if base == "gru":
                return self.o(seg(lambda t: self.rnn(t)[0][:, -1], x))
            return seg(lambda i: F.linear(torch.tanh(self.lin(self.emb(i))).mean(1),
                                          self.emb.weight), x)

    model = M().eval()
    x = torch.randint(0, 10, (N, 16)) if base == "tied" else torch.randn(N, 16, 8)
    return model, (x, torch.randint(0, 10, (N,)))


MOE = ("moe_cls_top1_index", "moe_cls_top2_mask", "moe_cls_top2_swiglu", "moe_cls_top2_sort",
       "moe_lm_top2_index", "split")


def moe_workload(name: str):
    """``(model, (inputs, labels))`` of a model routing rows of the batch
    (``benchmarks/moe_models.py``, loaded from this file's folder so that a tree compared with
    ``--trees`` needs no module of its own), float32, without a table of positions: a
    classifier (vocabulary 100, 16 tokens, width 32, 4 experts of hidden width 64, 5 classes, 16
    sequences) with a top-1 MoE block
    dispatched by index, a top-2 one by boolean masks, a top-2 one with SwiGLU experts, a top-2
    one by sorting the rows by expert and splitting them; a token LM (vocabulary 16, 8 tokens, 8
    sequences, width 32, top-2 by index, the first 2 labels of 2 sequences ignored); a batch split
    (32 samples of 32 features, a stem of 64, branches MLP / Linear, 10 classes)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "moe_models", os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_models.py"))
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    torch.manual_seed(0)
    if name == "split":
        return mm.Split(32, 64, 10), (torch.randn(32, 32), torch.randint(0, 10, (32,)))
    if name == "moe_lm_top2_index":
        model = mm.MoELM(V=16, d=32, h=64, E=4, k=2, T=8, pos=False)
        ids, y = torch.randint(0, 16, (8, 8)), torch.randint(0, 16, (8, 8))
        y[::4, :2] = -100
        return model, (ids, y)
    k = 1 if "top1" in name else 2
    dispatch = "mask" if "mask" in name else "sort" if "sort" in name else "index"
    kind = "swiglu" if "swiglu" in name else "mlp"
    model = mm.MoEClassifier(V=100, d=32, h=64, E=4, k=k, C=5, T=16, dispatch=dispatch, kind=kind,
                             pos=False)
    return model, (torch.randint(0, 100, (16, 16)), torch.randint(0, 5, (16,)))


STACKED = ("mixtral_lm", "mixtral_cls", "stacked_cls_top2_swiglu")


def stacked_workload(name: str):
    """``(model, (inputs, labels))`` of a model with stacked experts, ``F.linear(x, W[e])``
    (``benchmarks/stacked_models.py``, loaded as :func:`moe_workload` loads its models), float32:
    a tiny Hugging Face Mixtral (width 32, 2 layers, 4 experts, top-2, eager experts) as a token
    LM (vocabulary 16, 8 sequences of 8 tokens, the first 2 labels of 2 sequences ignored) or a
    3-class sequence classifier; a hand-written classifier of the same pattern (vocabulary 100,
    16 sequences of 16 tokens, width 32, 4 SwiGLU experts of hidden width 64, top-2)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "stacked_models",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "stacked_models.py"))
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    torch.manual_seed(0)
    if name == "stacked_cls_top2_swiglu":
        model = sm.StackedClassifier(V=100, d=32, C=5, h=64, E=4, k=2, mlp=True)
        return model, (torch.randint(0, 100, (16, 16)), torch.randint(0, 5, (16,)))
    model = sm.mixtral("lm" if name == "mixtral_lm" else "cls")
    ids = torch.randint(1, 16, (8, 8))
    if name == "mixtral_lm":
        y = torch.randint(0, 16, (8, 8))
        y[::4, :2] = -100
        return model, (ids, y)
    return model, (ids, torch.randint(0, 3, (8,)))


def _child(workload: str, types: list[str], steps: int, order: str = "fixed") -> dict:
    import torch
    import torch.nn.functional as F

    import fimfast

    torch.set_num_threads(1)
    if workload in ("a", "b", "c", "d", "e"):
        from benchmarks.workloads import build

        wl = build(workload, "full", 0)
        model, batch = wl.model, (wl.inputs, wl.labels)

        def logits():
            out = model(batch[0])
            return getattr(out, "logits", out), batch[1]
    elif workload == "mha_bias_kv":
        from benchmarks.bench_recurrent import workload as recurrent

        model, x, y = recurrent(workload)
        batch = (x, y)

        def logits():
            return model(x), y
    elif workload in MOE or workload in STACKED:
        model, batch = (moe_workload if workload in MOE else stacked_workload)(workload)

        def logits():
            return model(batch[0]), batch[1]
    elif workload in SMALL_CNNS:
        model, batch = small_cnn(workload)

        def logits():
            return model(batch[0]), batch[1]
    elif workload in CHECKPOINTED:
        model, batch = checkpointed(workload)

        def logits():
            return model(batch[0]), batch[1]
    else:
        from benchmarks import bench_layers

        model, batch = bench_layers.build(workload)

        def logits():
            return bench_layers._logits(model, batch)

    def floor():
        model.zero_grad(set_to_none=True)
        z, y = logits()
        F.cross_entropy(z.flatten(0, -2), y.flatten()).backward()

    fns = {"floor": floor}
    for t in types:
        kind, _, chunk = t.partition(":cc")
        opts = {"class_chunk": int(chunk)} if chunk else {}
        est = fimfast.DiagFisher(model, kind, seed=0, **opts)
        fns[t] = lambda est=est: est.step(batch)
    for f in fns.values():  # plans, probes, caches, allocator
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys, rng = list(fns), random.Random(0)
    for _ in range(steps):
        if order == "shuffled":
            rng.shuffle(keys)
        for k in keys:
            f = fns[k]
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"floor_ms": med["floor"] * 1e3, **{t: med[t] / med["floor"] for t in types}}


def _label(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.path.basename(os.path.abspath(tree))


def _cell(xs: list[float], digits: int = 3) -> str:
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits - 1}f}–{max(xs):.{digits - 1}f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--trees", nargs="+", default=[os.getcwd()])
    ap.add_argument("--rounds", type=int, default=9, help="child processes per tree")
    ap.add_argument("--steps", type=int, default=21, help="timed rounds of steps per child")
    ap.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    ap.add_argument("--order", default="fixed", choices=("fixed", "shuffled"),
                    help="a child's steps in each round: floor then types as listed, or shuffled")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--types", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fim-types", default=None,
                    help="comma-separated types timed on every workload (default: WORKLOADS)")
    a = ap.parse_args(argv)
    kinds = {w: (a.fim_types.split(",") if a.fim_types else WORKLOADS.get(w, ("empirical",)))
             for w in a.workloads.split(",")}
    if a.child:
        print(json.dumps(_child(a.child, a.types.split(","), a.steps, a.order)))
        return 0
    labels = {t: _label(t) for t in a.trees}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "load": os.getloadavg(), "threads": 1, "clock": "process_time",
              "rounds": a.rounds, "steps": a.steps, "order": a.order,
              "trees": list(labels.values()), "runs": {}}
    runs: dict[str, dict[str, list[dict]]] = {w: {labels[t]: [] for t in a.trees}
                                              for w in a.workloads.split(",")}
    for _ in range(a.rounds):
        for w in runs:
            for tree in random.sample(a.trees, len(a.trees)):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", w, "--types",
                       ",".join(kinds[w]), "--steps", str(a.steps), "--order", a.order]
                res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=tree), cwd=tree,
                                     capture_output=True, text=True, check=True)
                runs[w][labels[tree]].append(json.loads(res.stdout.strip().splitlines()[-1]))
    report["runs"] = runs
    report["load_after"] = os.getloadavg()
    lines = ["| workload | type | " + " | ".join(labels.values()) + " |",
             "|---|---|" + "---|" * len(labels)]
    for w, by_tree in runs.items():
        for t in ("floor_ms", *kinds[w]):
            cells = [_cell([r[t] for r in by_tree[lab]], 2 if t == "floor_ms" else 3)
                     for lab in labels.values()]
            lines.append(f"| {w} | {t} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
