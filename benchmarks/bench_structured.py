"""KFAC (MONTE_CARLO) and the EKFAC refit against NNGeometry, curvlinops and kronfluence
(benchmarks/kronfluence_peer.py: its covariance fit and its lambda fit), as ratios to a training
step measured in the same interleaved rounds, plus peak extra memory.

Workloads (benchmarks/workloads.py): (a) MLP 784-512-256-10 B=128, (b) MLP 784-1024x3-10 sigmoid
B=256, (c) CNN, (e) TransformerEncoder. For (e) the Kronecker methods cover the parameters of the
modules they support and that are called as modules (the feed-forward Linears and the head; the
attention projections and LayerNorms are frozen for every library, and the floor is the training
step of the whole model). Parity first: fimfast's EXACT KFAC matrix-vector product against
curvlinops' ``type-2`` KFAC on a random vector (the same matrix, see docs/structured.md).

    PYTHONPATH=. python benchmarks/bench_structured.py [--size tiny|full] [--workloads a,b,c,e]
        [--threads 1]

Writes benchmarks/results/structured_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fimfast  # noqa: E402
from benchmarks.memory import PeakMeter  # noqa: E402
from benchmarks.timing import CallTimer, interleaved, median_ratio  # noqa: E402
from benchmarks.workloads import build  # noqa: E402
from fimfast.structured import capture, engine, refit_ekfac  # noqa: E402
from fimfast.types import FIMType, Options  # noqa: E402

TARGETS = {"fimfast.kfac_mc": 1.3, "fimfast.ekfac_refit": 2.0}


def _subset(model: nn.Module) -> None:
    """Freeze every parameter outside an nn.Linear/nn.Conv2d that is called as a module."""
    called = set()
    hooks = [m.register_forward_hook(lambda m, i, o: called.add(m))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return hooks, called


def prepare(key: str, size: str):
    w = build(key, size)
    model = w.model
    full = copy.deepcopy(model)  # the floor trains every parameter
    hooks, called = _subset(model)
    with torch.no_grad():
        model(w.inputs)
    for h in hooks:
        h.remove()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(m in called)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return w, model, full, frozen


def methods(w, model, full):
    X, y = w.inputs, w.labels
    data = [(X, y)]
    params = [p for p in model.parameters() if p.requires_grad]
    calls = {}

    def train_step():
        full.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(full(X), y)
        loss.backward()
        return loss

    calls["train_step"] = train_step
    calls["fimfast.kfac_mc"] = lambda: fimfast.fisher(model, data, "monte_carlo",
                                                      representation="kfac", seed=0)
    kf = fimfast.fisher(model, data, "monte_carlo", representation="kfac", seed=0)
    names = kf.names
    layers = capture.layers_of(model, names, params, "ekfac")

    def fimfast_refit():
        st = engine.Stream(FIMType.MONTE_CARLO, Options(seed=1), 1)
        return refit_ekfac(kf, model, data, st, layers, "mean")

    calls["fimfast.ekfac_refit"] = fimfast_refit
    try:
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM_MonteCarlo
        from nngeometry.object import PMatEKFAC, PMatKFAC
        from torch.utils.data import DataLoader, TensorDataset

        ngm = copy.deepcopy(model)  # a failing NNGeometry call leaves its hooks on the model
        lc = LayerCollection()
        for m in ngm.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:
                lc.add_layer_from_model(ngm, m)
        dl = DataLoader(TensorDataset(X, y), batch_size=X.shape[0])
        calls["nngeometry.kfac_mc"] = lambda: FIM_MonteCarlo(ngm, dl, PMatKFAC,
                                                             layer_collection=lc)
        built = {}

        def ng_refit():  # the eigenbasis is built untimed, in the warm-up call
            if "ek" not in built:
                built["ek"] = FIM_MonteCarlo(ngm, dl, PMatEKFAC, layer_collection=lc)
            return built["ek"].update_diag(dl)

        calls["nngeometry.ekfac_refit"] = ng_refit
    except ImportError as exc:
        print(f"nngeometry not available: {exc}")
    try:
        from curvlinops import KFACLinearOperator

        def curv():
            K = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, fisher_type="mc",
                                   separate_weight_and_bias=False, check_deterministic=False,
                                   num_data=X.shape[0], num_per_example_loss_terms=1)
            K.compute_kronecker_factors()
            return K

        calls["curvlinops.kfac_mc"] = curv
    except ImportError as exc:
        print(f"curvlinops not available: {exc}")
    try:
        from benchmarks import kronfluence_peer

        calls.update(kronfluence_peer.calls(model, X, y))
    except ImportError as exc:
        print(f"kronfluence not available: {exc}")
    return calls


def parity(w, model) -> dict:
    """fimfast EXACT KFAC vs curvlinops type-2 KFAC (mean): relative error of ``F v``."""
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        return {"checked": False, "reason": "curvlinops not installed"}
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(w.inputs, w.labels)]
    F = fimfast.fisher(model, data, "exact", representation="kfac")
    K = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2",
                           separate_weight_and_bias=False, check_deterministic=False)
    v = torch.randn(F.numel(), generator=torch.Generator().manual_seed(0))
    a, b = F.mv(v), K @ v
    return {"checked": True, "peer": "curvlinops type-2",
            "rel_err_mv": float((a - b).norm() / b.norm())}


def provenance() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    versions = {}
    for mod in ("nngeometry", "curvlinops", "kronfluence"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod if mod != "curvlinops" else "curvlinops-for-pytorch")
        except Exception:
            versions[mod] = None
    return {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git("rev-parse", "HEAD"), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu",
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(), "peers": versions}


def run(keys: list[str], size: str, rounds: int, limit_s: float) -> dict:
    out = {"provenance": provenance(), "size": size, "targets": TARGETS, "workloads": {}}
    for key in keys:
        w, model, full, frozen = prepare(key, size)
        rec = {"title": w.title, "params_all": sum(p.numel() for p in full.parameters()),
               "params_kfac": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "frozen_for_kfac": frozen, "parity": parity(w, model)}
        calls = methods(w, model, full)
        timer = CallTimer(limit_s)
        errors = {}
        for name, fn in list(calls.items()):  # warm-up
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - recorded
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                del calls[name]
        times = interleaved({k: (fn, None) for k, fn in calls.items()},
                            {k: rounds for k in calls}, timer,
                            on_error=lambda m, e, errs=errors: errs.setdefault(m, repr(e)[:300]))
        floor = times["train_step"]
        res = {}
        for name, fn in calls.items():
            meter = PeakMeter()
            meter.begin()
            fn()
            peak = meter.end()
            res[name] = {"median_s": statistics.median(times[name]) if times[name] else None,
                         "ratio_to_train_step": median_ratio(times[name], floor),
                         "peak_extra_mb": round(peak, 1)}
        rec["methods"] = res
        rec["errors"] = errors
        out["workloads"][key] = rec
        print(json.dumps({key: rec}, indent=1))
    return out


def markdown(res: dict) -> str:
    p = res["provenance"]
    lines = [f"# Structured Fisher: KFAC (MC) and EKFAC refit ({res['size']})", "",
             f"{p['time']}, torch {p['torch']}, {p['threads']} threads on {p['cpu_count']} "
             f"CPUs (load {p['loadavg_at_start'][0]:.1f}), git `{p['git_sha'][:10]}`, peers "
             f"{p['peers']}. Ratios: median time over the training step's median in the same "
             "interleaved rounds. Targets: KFAC (MC) <= 1.3x, EKFAC refit <= 2x.", "",
             "| workload | method | ratio to train step | median s | peak extra MB |",
             "|---|---|---|---|---|"]
    for key, rec in res["workloads"].items():
        for name, m in rec["methods"].items():
            r, t = m["ratio_to_train_step"], m["median_s"]
            lines.append(f"| ({key}) {rec['title']} | {name} | "
                         f"{'-' if r is None else f'{r:.2f}'} | "
                         f"{'-' if t is None else f'{t:.4f}'} | {m['peak_extra_mb']} |")
        for name, e in rec["errors"].items():
            lines.append(f"| ({key}) | {name} | failed: {e[:80]} | | |")
    lines += ["", "Parity (fimfast EXACT KFAC vs curvlinops type-2, relative error of F v):", ""]
    for key, rec in res["workloads"].items():
        par = rec["parity"]
        lines.append(f"- ({key}): {par.get('rel_err_mv', par.get('reason'))}; KFAC covers "
                     f"{rec['params_kfac']} of {rec['params_all']} parameters")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="full", choices=["tiny", "full"])
    ap.add_argument("--workloads", default="a,b,c,e")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--limit-s", type=float, default=120.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the results files so far; 0 leaves torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.workloads.split(","), args.size, args.rounds, args.limit_s)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(args.out) / f"structured_{stamp}_{args.size}"
    base.with_suffix(".json").write_text(json.dumps(res, indent=1))
    base.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {base}.json and .md")


if __name__ == "__main__":
    main()
