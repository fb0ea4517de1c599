"""KFAC (MONTE_CARLO) and EKFAC through ``fimfast.fisher`` as ratios of **CPU time** (one torch
thread, ``time.process_time``) to a training step, interleaved in rounds.

On a machine shared with other jobs a single-threaded step spends most of its wall-clock time
waiting for a core (on the 2-core machine of benchmarks/results/structured_*: 3.6 ms of CPU for a
40 ms wall-clock training step of workload (a)), so wall-clock ratios mostly measure the
scheduler; CPU-time ratios measure the work. To compare two versions of fimfast, run this file
with each tree first on ``PYTHONPATH``, alternately:

    PYTHONPATH=<tree> python benchmarks/kfac_cputime.py a,b,c 9

or let this file alternate the processes (``--trees``: ``label=path`` pairs, one process per tree
and alternation, the order of the trees alternating too) and write the per-process ratios with
their min / median / max, the load average and the commits, as JSON and markdown:

    python benchmarks/kfac_cputime.py a,b,c,e 5 --trees before=<tree>,after=<tree> \
        --alternations 6 --out benchmarks/results/kfac_cputime_<date>

Prints ``{workload: {"kfac": ratio, "kfac_read": ratio (KFAC and a read of every factor as a
full matrix), "plain_kfac": ratio (MLPs and the CNN (c) only: :func:`plain_kfac`,
:func:`plain_kfac_conv`, the same products without fimfast), "refit": ratio (the EKFAC refit
of the diagonal alone, as timed by benchmarks/bench_structured.py), "ekfac": ratio (factors,
eigendecompositions and refit), "train_ms": CPU ms of the training step}}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def _calls(fimfast, model, full, X, y) -> dict:
    data = [(X, y)]

    def train():
        full.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(full(X), y).backward()

    from fimfast.structured import capture, engine, refit_ekfac
    from fimfast.types import FIMType, Options

    kf = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
    kf.eig()  # the eigenbasis outside the refit's time, as in bench_structured.py
    params = [p for p in model.parameters() if p.requires_grad]
    layers = capture.layers_of(model, kf.names, params, "ekfac")

    def refit():
        st = engine.Stream(FIMType.MONTE_CARLO, Options(seed=1), 1)
        return refit_ekfac(kf, model, data, st, layers, "mean")

    def kfac_read():  # the factors read as full matrices (completes sums kept in halves)
        F = fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
        return F.A, F.G

    return {"train": train,
            "kfac": lambda: fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0),
            "kfac_read": kfac_read,
            "refit": refit,
            "ekfac": lambda: fimfast.fisher(model, data, "monte_carlo", "ekfac", seed=0)}


def linear_forward(model: nn.Sequential, X: torch.Tensor, kinds=(nn.Linear,)):
    """``(inputs, outputs, logits)``: the forward through the ``nn.Sequential``, with the input
    and the output of every module of ``kinds`` (``nn.Linear``; also timed phase by phase in
    benchmarks/kfac_floor.py)."""
    ins, outs, h = [], [], X
    for m in model:
        if isinstance(m, kinds):
            ins.append(h)
            h = m(h)
            outs.append(h)
        else:
            h = m(h)
    return ins, outs, h


def _mc_cotangent(h: torch.Tensor) -> torch.Tensor:
    """``onehot(y) - p`` for one label per row drawn from ``softmax(h)``."""
    with torch.no_grad():
        p = torch.softmax(h, -1)
        u = -p
        u[torch.arange(h.shape[0]), torch.multinomial(p, 1).squeeze(1)] += 1
    return u


def _gram(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``x^T x`` as upper block rows (``block`` columns) like fimfast's sums, not mirrored."""
    n = x.shape[1]
    out = x.new_empty(n, n)
    if n <= 3 * block:
        return torch.mm(x.T, x, out=out)
    for i in range(0, n, block):
        out[i:i + block, i:].addmm_(x[:, i:i + block].T, x[:, i:], beta=0)
    return out


def plain_kfac(model: nn.Sequential, X: torch.Tensor, block: int = 128):
    """A reference for the MLPs (a), (b): KFAC (one MC label per sample) in plain torch, no
    checks, no capture: the forward through the ``nn.Sequential``, one backward to the Linear
    outputs, ``A`` and ``G`` as upper block rows (128 columns) like fimfast's sums, unscaled and
    not mirrored."""
    ins, outs, h = linear_forward(model, X)
    grads = torch.autograd.grad(h, outs, _mc_cotangent(h))
    A = [_gram(torch.cat([x.detach(), x.new_ones(x.shape[0], 1)], 1), block) for x in ins]
    return A, [_gram(g, block) for g in grads]


def _patches(x: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """``(N L, C k k + 1)``: the unfolded input of ``m`` (no padding, dilation 1, one group)
    with the bias's column of ones, one strided copy."""
    N, C, H, W = x.shape
    kh, kw = m.kernel_size
    sh, sw = m.stride
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    out = x.new_empty(N, Ho, Wo, C * kh * kw + 1)
    s = x.stride()
    out[..., :-1].view(N, Ho, Wo, C, kh, kw).copy_(x.as_strided(
        (N, Ho, Wo, C, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2], s[3])))
    out[..., -1] = 1
    return out.view(N * Ho * Wo, -1)


def plain_kfac_conv(model: nn.Sequential, X: torch.Tensor, block: int = 128):
    """The same for a ``nn.Sequential`` of ``Conv2d`` (no padding, dilation 1, one group) and
    ``Linear`` layers ((c)): KFAC with the expand convention (NNGeometry's, fimfast's),
    ``A = sum_{n,t} [a_{n,t}, 1] [a_{n,t}, 1]^T`` over the unfolded patches (one strided copy,
    upper block rows), ``G = sum_n g_n g_n^T`` of the ``(O, positions)`` output gradients (one
    batched product), unscaled."""
    ins, outs, h = linear_forward(model, X, (nn.Linear, nn.Conv2d))
    grads = torch.autograd.grad(h, outs, _mc_cotangent(h))
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    A, G = [], []
    for m, x, g in zip(layers, ins, grads):
        x = x.detach()
        if isinstance(m, nn.Conv2d):
            A.append(_gram(_patches(x, m), block))
            gt = g.flatten(2)
            G.append(torch.bmm(gt, gt.mT).sum(0))
        else:
            A.append(_gram(torch.cat([x, x.new_ones(x.shape[0], 1)], 1), block))
            G.append(_gram(g, block))
    return A, G


def _plain_of(model: nn.Module):
    """:func:`plain_kfac` for an MLP, :func:`plain_kfac_conv` for a CNN of plain convolutions,
    ``None`` for other models."""
    if not isinstance(model, nn.Sequential):
        return None
    if not all(isinstance(m, (nn.Linear, nn.Conv2d)) or not any(True for _ in m.parameters())
               for m in model):
        return None
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    if not convs:
        return plain_kfac
    if all(m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1 and m.bias is not None
           for m in convs):
        return plain_kfac_conv
    return None


def main(keys: list[str], rounds: int) -> dict:
    import fimfast
    from benchmarks.bench_structured import prepare

    torch.set_num_threads(1)
    out = {}
    for key in keys:
        w, model, full, _ = prepare(key, "full")
        fns = _calls(fimfast, model, full, w.inputs, w.labels)
        plain = _plain_of(model)
        if plain is not None:
            fns["plain_kfac"] = lambda model=model, X=w.inputs, f=plain: f(model, X)
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.process_time()
                f()
                times[k].append(time.process_time() - t)
        tr = statistics.median(times["train"])
        out[key] = {k: round(statistics.median(v) / tr, 3) for k, v in times.items()
                    if k != "train"}
        out[key]["train_ms"] = round(tr * 1e3, 2)
    return out


def _git(tree: str, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def alternate(keys: list[str], rounds: int, trees: dict[str, str], alternations: int) -> dict:
    """Run :func:`main` in one process per tree and alternation (``PYTHONPATH=tree``)."""
    runs = {label: [] for label in trees}
    loads = [os.getloadavg()[0]]
    for i in range(alternations):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for label in order:
            env = {**os.environ, "PYTHONPATH": trees[label]}
            out = subprocess.run([sys.executable, __file__, ",".join(keys), str(rounds)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
            print(label, runs[label][-1], file=sys.stderr)
    summary = {label: {k: {m: _spread([r[k][m] for r in rs]) for m in rs[0][k]} for k in keys}
               for label, rs in runs.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "trees": {label: {"path": t, "commit": _git(t, "rev-parse", "HEAD"),
                              "dirty": bool(_git(t, "status", "--porcelain", "--",
                                                 "fimfast"))}
                      for label, t in trees.items()},
            "torch": torch.__version__, "threads": 1, "rounds": rounds,
            "alternations": alternations, "cpu_count": os.cpu_count(),
            "loadavg_1min": {"min": min(loads), "max": max(loads)},
            "runs": runs, "summary": summary}


def _spread(v: list[float]) -> dict:
    return {"min": min(v), "median": statistics.median(v), "max": max(v)}


def markdown(res: dict) -> str:
    """Per workload and measure, min / median / max over the processes of each tree."""
    labels = list(res["trees"])
    lines = ["| workload | measure | " + " | ".join(f"{lb} (min / median / max)" for lb in labels)
             + " |", "|---|---|" + "---|" * len(labels)]
    first = res["summary"][labels[0]]
    for key in first:
        for m in first[key]:
            cells = []
            for lb in labels:
                d = res["summary"][lb][key][m]
                cells.append(f"{d['min']:.3g} / **{d['median']:.3g}** / {d['max']:.3g}")
            lines.append(f"| {key} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("keys")
    ap.add_argument("rounds", nargs="?", type=int, default=9)
    ap.add_argument("--trees", help="label=path,label=path: alternate processes over the trees")
    ap.add_argument("--alternations", type=int, default=6)
    ap.add_argument("--out", help="path prefix of the .json and .md written with --trees")
    args = ap.parse_args()
    keys = args.keys.split(",")
    if not args.trees:
        print(json.dumps(main(keys, args.rounds)))
        sys.exit(0)
    res = alternate(keys, args.rounds, dict(t.split("=", 1) for t in args.trees.split(",")),
                    args.alternations)
    print(markdown(res))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(res))
