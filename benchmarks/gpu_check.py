"""The timing half of ``scripts/gpu_check.sh``: Fisher steps as ratios to a training step, and the
op timings of ``bench_ops.py`` against their roofline.

For the suite workloads (a) MLP, (d) linear head with 8192 classes, (e) transformer encoder,
(g) token LM with a 32k vocabulary, and a token LM with a 50257-token vocabulary whose Fisher runs
through ``lm_head`` (the logits never materialise), it times one training step (forward,
cross-entropy, backward, SGD update) and one ``DiagFisher.step`` of each estimator on the device,
and reports their ratio (median of ``--reps`` timed calls after warm-up, synchronised). Then it
reads the ``bench_ops.py --device cuda`` results and prints every op's measured time next to its
roofline (bytes and flops of :func:`benchmarks.bench_ops.cost`). Everything goes to one JSON::

    python -m benchmarks.gpu_check --ops-json ops.json --out gpu.json          # on a GPU
    python -m benchmarks.gpu_check --dry-run --ops-json ops.json --out x.json  # tiny, on the CPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fimfast  # noqa: E402
from benchmarks import workloads  # noqa: E402
from benchmarks.bench_ops import peaks_of  # noqa: E402

# estimators per workload: EXACT costs C backward columns, so only where C is small
_SMALL_C = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg",
            "hutchinson_rankk"]  # fmt: skip
_LARGE_C = ["empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
# what a Fisher step should cost, in training steps, on a GPU: the per-sample estimators run one
# batched backward per column chunk plus per-layer products; a Hutchinson probe is one backward
EXPECTED_RATIO = {
    "exact": "~C training steps at most (C backward columns); (a), (e): C = 10, 4",
    "empirical": "1-3",
    "monte_carlo": "1-3",
    "hutchinson": "1-2 (one forward, one backward per probe)",
    "hutchinson_dg": "1-2",
    "hutchinson_rankk": "1-2 (+ core_topk)",
    "hutchinson+lm_head": "<= 1.5 (no logits; head recomputed in tiles)",
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_s(fn, dev, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _lm50k(size: str) -> workloads.Workload:
    """Token LM with GPT-2's vocabulary size (50257): (g)'s architecture, N=4, T=128."""
    torch.manual_seed(0)
    if size == "full":
        N, T, V, d, heads, ff, L = 4, 128, 50257, 64, 4, 256, 1
    else:
        N, T, V, d, heads, ff, L = 2, 4, 37, 8, 2, 16, 1
    model = workloads.TinyLM(V, T, d, heads, ff, L)
    ids = torch.randint(0, V, (N, T))
    y = torch.randint(0, V, (N, T))
    return workloads.Workload("lm50k", size, f"token LM V={V}, N={N}, T={T}", model, ids, y, V,
                              token_level=True, attention=True, oracle="token_lm")


def _workload_ratios(key: str, wl: workloads.Workload, dev: torch.device, reps: int) -> list[dict]:
    model = wl.model.to(dev)
    x, y = wl.inputs.to(dev), wl.labels.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def train_step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    t_train = _median_s(train_step, dev, reps)
    kinds = list(_SMALL_C if wl.num_classes <= 16 else _LARGE_C)
    if wl.token_level:
        kinds.append("hutchinson+lm_head")
    rows = []
    for kind in kinds:
        fim_type, _, head = kind.partition("+")
        opts = {"lm_head": "head"} if head else {}
        est = fimfast.DiagFisher(model, fim_type, reduction="sum", seed=0, **opts)
        try:
            t = _median_s(lambda est=est: est.step((x, y)), dev, reps)
        except Exception as exc:  # reported, not fatal: the other estimators still run
            rows.append({"workload": key, "title": wl.title, "estimator": kind,
                         "error": f"{type(exc).__name__}: {exc}"})
            print(f"  ({key}) {kind:22s} FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append({
            "workload": key, "title": wl.title, "estimator": kind,
            "train_step_ms": t_train * 1e3, "fisher_step_ms": t * 1e3,
            "ratio_to_training_step": t / t_train, "expected_ratio": EXPECTED_RATIO[kind],
        })  # fmt: skip
        print(f"  ({key}) {kind:22s} {t * 1e3:9.3f} ms = {t / t_train:6.2f} training steps "
              f"({t_train * 1e3:.3f} ms); expected {EXPECTED_RATIO[kind]}", flush=True)
    model.to("cpu")
    return rows


def suite_ratios(dev: torch.device, size: str, reps: int) -> list[dict]:
    """One training step and one Fisher step per estimator, per workload; their ratios."""
    rows = []
    for key in ("a", "d", "e", "g", "lm50k"):
        wl = _lm50k(size) if key == "lm50k" else workloads.build(key, size)
        rows += _workload_ratios(key, wl, dev, reps)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ops_vs_roofline(ops_json: str) -> list[dict]:
    """The fastest kernel backend of each ``bench_ops`` case next to its roofline time."""
    with open(ops_json) as f:
        data = json.load(f)
    rows = []
    for run in data["runs"].values():
        best: dict[str, dict] = {}
        for r in run:
            if "median_ms" not in r or r["backend"] in ("torch", "eager"):
                continue
            if r["case"] not in best or r["median_ms"] < best[r["case"]]["median_ms"]:
                best[r["case"]] = r
        for case, r in best.items():
            row = {k: r.get(k) for k in ("op", "case", "backend", "median_ms", "speedup_vs_torch",
                                         "bytes", "flops", "achieved_GBps", "fraction_of_peak_bw",
                                         "roofline_ms", "vs_roofline")}
            rows.append(row)
            exp = r.get("roofline_ms")
            exp_s = f"roofline {exp * 1e3:9.1f} us" if exp is not None else "roofline n/a"
            frac = r.get("fraction_of_peak_bw")
            frac_s = f"{frac * 100:5.1f}% of peak bandwidth" if frac is not None else ""
            print(f"  {case:46s} {r['backend']:6s} {r['median_ms'] * 1e3:9.1f} us  {exp_s}  "
                  f"{r['achieved_GBps']:8.1f} GB/s {frac_s}", flush=True)
        break  # the wall-clock run (the first) only
    return rows


def environment(dev: torch.device) -> dict:
    from fimfast import _ext

    info = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(dev),
        "extension_has_cuda": _ext.has_cuda(),
        "backends": {b: s["reason"] for b, s in fimfast.available_backends(dev).items()},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable: {exc}"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        info["gpu"] = name
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        info["peaks"] = peaks_of(name)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, one rep")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    ap.add_argument("--ops-json", default=None, help="bench_ops.py results to compare")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False (use --dry-run on a CPU)")
    size = "tiny" if args.dry_run else "full"
    reps = args.reps or (1 if args.dry_run else 10)
    report = {"environment": environment(dev), "size": size, "reps": reps}
    print(f"== environment: {json.dumps(report['environment'])}", flush=True)
    print("== Fisher step / training step (suite (a), (d), (e), (g), 50k-vocabulary LM)",
          flush=True)
    report["suite"] = suite_ratios(dev, size, reps)
    if args.ops_json:
        print("== ops: fastest kernel backend vs roofline (bench_ops.py)", flush=True)
        report["ops"] = ops_vs_roofline(args.ops_json)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out}", flush=True)
    failed = [r for r in report["suite"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
