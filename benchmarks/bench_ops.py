"""Speed of every backend of every fimfast op, parity checked first.

For each op and case: every available backend (``torch`` reference, ``cpp``, ``cuda``, ``triton``
on a GPU; on a CPU the Triton interpreter is not timed) runs once and is checked against the torch
reference (both measured against a float64 truth, as the tests do); the backends that pass are then
timed in interleaved rounds (the order rotates every round) and the median is reported, with the
speed-up over the torch reference measured in the same rounds (``speedup_vs_torch`` = torch time /
backend time). ``probe_logit_grad`` is also timed against the eager composition it replaces
(softmax, ``torch.bernoulli`` signs and the mix: ``speedup_vs_eager``).

Writes ``benchmarks/results/ops_<device>_<date>.json`` with provenance (device, threads,
torch/triton versions, git sha, time)::

    python benchmarks/bench_ops.py                 # CPU: 2 threads wall clock, 1 thread CPU time
    python benchmarks/bench_ops.py --device cuda   # GPU
    python benchmarks/bench_ops.py --quick         # smaller cases, fewer rounds

Each timed row also carries the op's minimal memory traffic (``bytes``: inputs read once, outputs
written once) and arithmetic (``flops``), see :func:`cost`; on a GPU of known peaks (:data:`PEAKS`)
or with ``--peak-bw``/``--peak-flops``, the achieved bandwidth, its fraction of the peak and the
roofline time ``max(bytes / bandwidth, flops / peak)`` (``vs_roofline`` = measured / roofline).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fimfast import ops  # noqa: E402
from fimfast.ops import registry, rng  # noqa: E402

SLACK_ULPS = 64  # as tests/tolerances.py KERNEL_SLACK_ULPS
SEED = 1234
PROBE_OFFSET = 12345


# --------------------------------------------------------------------------------------------- #
# cases: name -> (inputs builder, call(backend, inputs), truth(inputs) or None)
# --------------------------------------------------------------------------------------------- #
def _gen(dev, *shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(dev)


def eager_hutchinson(z: torch.Tensor) -> torch.Tensor:
    """The eager composition probe_logit_grad replaces: softmax, Bernoulli signs, the mix."""
    p = torch.softmax(z.float(), -1)
    xi = torch.empty_like(p).bernoulli_(0.5).mul_(2).sub_(1)
    w = xi * p.sqrt()
    return (w - p * w.sum(-1, keepdim=True)).unsqueeze(0)


def probe_cases(dev, quick):
    shapes = [(512, 8192), (4096, 1000), (64, 50257)] if not quick else [(128, 8192)]
    if quick == "tiny":
        shapes = [(4, 50)]
    cases = []
    for R, C in shapes:
        modes = ["hutchinson"] if (R, C) != shapes[0] else [
            "hutchinson", "dg", "sqrt", "mc", "empirical", "bernoulli", "gaussian", "rankk"]
        for mode in modes:
            def build(R=R, C=C, mode=mode):
                z = _gen(dev, R, C, scale=3.0)
                labels = torch.randint(0, C, (R,), generator=torch.Generator().manual_seed(1))
                eig = None
                if mode == "rankk":
                    eig = ops.core_topk(torch.softmax(z, -1), 2, backend="torch")
                return {"z": z, "labels": labels.to(dev), "eig": eig, "mode": mode}

            def call(b, x):
                return ops.probe_logit_grad(x["z"], x["mode"], SEED, PROBE_OFFSET, 1,
                                            labels=x["labels"], eig=x["eig"], backend=b)

            def truth(x):
                eig = x["eig"]
                eig64 = None if eig is None else (eig[0].double(), eig[1].double())
                return ops.probe_logit_grad(x["z"].double(), x["mode"], SEED, PROBE_OFFSET, 1,
                                            labels=x["labels"], eig=eig64, backend="torch")

            extra = {"eager": lambda x: eager_hutchinson(x["z"])} if mode == "hutchinson" else {}
            cases.append((f"probe_logit_grad/{mode}/{R}x{C}/f32", build, call, truth, extra))
    return cases


def topk_cases(dev, quick):
    specs = [(512, 100, 2, "exact"), (512, 100, 2, "power"), (256, 1000, 4, "exact")]
    if quick:
        specs = specs[:2] if quick != "tiny" else [(8, 10, 2, "exact")]
    cases = []
    for R, C, k, solver in specs:
        def build(R=R, C=C):
            return {"p": torch.softmax(_gen(dev, R, C, scale=3.0), -1)}

        def call(b, x, k=k, solver=solver):
            return ops.core_topk(x["p"], k, solver, 30, backend=b)

        def truth(x, k=k, solver=solver):
            return ops.core_topk(x["p"].double(), k, solver, 30, backend="torch")

        cases.append((f"core_topk/{solver}/{R}x{C}/k{k}/f32", build, call, truth, {}))
    return cases


def sq_cases(dev, quick):
    specs = [(256, 512, 784, torch.float32), (256, 512, 784, torch.bfloat16),
             (4096, 64, 64, torch.float32)]
    if quick:
        specs = [(64, 128, 200, torch.float32)] if quick != "tiny" else [(8, 8, 8, torch.float32)]
    cases = []
    for N, O, I, dt in specs:
        def build(N=N, O=O, I=I, dt=dt):
            return {"g": _gen(dev, N, O, dtype=dt), "a": _gen(dev, N, I, dtype=dt, seed=1)}

        def call(b, x):
            return ops.sq_matmul(x["g"], x["a"], backend=b)

        def truth(x):
            return ops.sq_matmul(x["g"].double(), x["a"].double(), backend="torch")

        name = str(dt).replace("torch.", "").replace("float", "f").replace("bf16", "bf16")
        cases.append((f"sq_matmul/{N}x{O}x{I}/{name}", build, call, truth, {}))
    return cases


def shared_cases(dev, quick):
    specs = [(32, 128, 256, 256), (64, 49, 64, 147)]
    if quick:
        specs = [(8, 32, 64, 64)] if quick != "tiny" else [(2, 4, 8, 8)]
    cases = []
    for N, T, O, I in specs:
        def build(N=N, T=T, O=O, I=I):
            return {"G": _gen(dev, N, T, O), "A": _gen(dev, N, T, I, seed=1)}

        def call(b, x):
            return ops.shared_sq(x["G"], x["A"], backend=b)

        def truth(x):
            return ops.shared_sq(x["G"].double(), x["A"].double(), backend="torch")

        cases.append((f"shared_sq/{N}x{T}x{O}x{I}/f32", build, call, truth, {}))
    return cases


def accumulate_cases(dev, quick):
    # a transformer-like parameter list: 12 blocks of 4 matrices + 2 vectors, plus embeddings
    shapes = [(30522, 128)] + [(256, 256)] * 48 + [(256,)] * 24 if not quick else [(64, 64)] * 10
    if quick == "tiny":
        shapes = [(8, 8)] * 3
    cases = []
    for gdt, mode in ((torch.float32, "sum"), (torch.bfloat16, "ema")):
        def build(gdt=gdt):
            states = [torch.rand(s, generator=torch.Generator().manual_seed(i)).to(dev)
                      for i, s in enumerate(shapes)]
            grads = [_gen(dev, *s, dtype=gdt, seed=i) for i, s in enumerate(shapes)]
            return {"states": states, "grads": grads}

        def call(b, x, mode=mode):
            # timed in place on the same states: the values drift but the work is identical
            ops.accumulate_(x["states"], x["grads"], mode, 0.9, 0.5, backend=b)
            return x["states"]

        n = sum(torch.Size(s).numel() for s in shapes)
        cases.append((f"accumulate_/{len(shapes)}tensors-{n / 1e6:.1f}M/{mode}-"
                      f"{str(gdt).replace('torch.', '')}", build, call, None, {}))
    return cases


# --------------------------------------------------------------------------------------------- #
# cost model and roofline
# --------------------------------------------------------------------------------------------- #
# (HBM bytes/s, fp32 FLOP/s without tensor cores), dense, by device name; the first match wins
PEAKS = (
    ("H100 PCIe", 2.0e12, 51e12),
    ("H100", 3.35e12, 67e12),  # SXM
    ("H200", 4.8e12, 67e12),
    ("A100", 2.04e12, 19.5e12),  # 80 GB SXM
    ("L40S", 0.864e12, 91.6e12),
)


def peaks_of(name: str) -> tuple[float, float] | None:
    """``(bytes/s, fp32 FLOP/s)`` of a GPU named ``name``, or None when unknown."""
    for key, bw, fl in PEAKS:
        if key in name:
            return bw, fl
    return None


def cost(op: str, name: str, x: dict) -> tuple[float, float]:
    """``(bytes, flops)`` of one call: inputs read once, outputs written once (float32 outputs).

    probe_logit_grad: one probe, ~8 flops per logit (exp, sqrt, sign, mix). core_topk: ``exact``
    ~10 safeguarded secular steps of ~6 flops per class and eigenvalue; ``power`` 30 iterations of
    ``4k + k**2`` flops per class (the product, Gram-Schmidt). sq_matmul / shared_sq: the GEMM's
    ``2 N O I`` (``2 N T O I`` + the squares). accumulate_: 3 flops per element.
    """
    def nb(t):
        return t.numel() * t.element_size()

    if op == "probe_logit_grad":
        z = x["z"]
        return nb(z) + z.numel() * 4, 8.0 * z.numel()
    if op == "core_topk":
        R, C = x["p"].shape
        k = int(name.split("/k")[1].split("/")[0])
        out = R * k * C * 4 + R * k * 4
        fl = 60.0 * R * k * C if "/exact/" in name else 30.0 * R * C * (4 * k + k * k)
        return nb(x["p"]) + out, fl
    if op == "sq_matmul":
        (N, O), I = x["g"].shape, x["a"].shape[1]
        return nb(x["g"]) + nb(x["a"]) + O * I * 4, 2.0 * N * O * I + N * (O + I)
    if op == "shared_sq":
        N, T, O = x["G"].shape
        I = x["A"].shape[2]
        return nb(x["G"]) + nb(x["A"]) + O * I * 4, 2.0 * N * T * O * I + 2.0 * N * O * I
    if op == "accumulate_":
        n = sum(s.numel() for s in x["states"])
        return sum(2 * nb(s) for s in x["states"]) + sum(nb(g) for g in x["grads"]), 3.0 * n
    raise KeyError(op)


def roofline(nbytes: float, flops: float, peaks: tuple[float, float]) -> float:
    """Seconds at the roofline: the larger of the memory and the arithmetic time."""
    return max(nbytes / peaks[0], flops / peaks[1])


# --------------------------------------------------------------------------------------------- #
def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _rel(x, t):
    x, t = x.detach().double().cpu(), t.detach().double().cpu()
    scale = float(t.abs().max()) if t.numel() else 1.0
    return float((x - t).abs().max()) / (scale or 1.0) if t.numel() else 0.0


MC_BOUNDARY = 1e-5  # as tests/tolerances.py


def mc_parity(out, ref, x) -> tuple[bool, str]:
    """Sampled labels agree with the reference except where u sits on a CDF step."""
    yk, yr = out.argmax(-1).cpu(), ref.argmax(-1).cpu()
    z = x["z"].double().cpu()
    R = z.shape[0]
    cdf = torch.cumsum(torch.softmax(z, -1), -1)
    worst = 0.0
    for s, r in (yk != yr).nonzero().tolist():
        u = rng.uniform(SEED, PROBE_OFFSET + s * R + r, (1,), torch.float64).item()
        worst = max(worst, abs(float(cdf[r, min(int(yk[s, r]), int(yr[s, r]))]) - u))
    n = int((yk != yr).sum())
    return worst <= MC_BOUNDARY, f"{n} labels differ, all within {worst:.1e} of a CDF step"


def parity(name, out, ref, truth, x) -> tuple[bool, str]:
    """The tests' rule: err(kernel) <= err(torch) + slack vs a float64 truth (mc: labels)."""
    outs, refs = _flat(out), _flat(ref)
    if "/mc/" in name:
        return mc_parity(outs[0], refs[0], x)
    if truth is None:  # accumulate_: states after one identical update from identical states
        errs = [_rel(o, r) for o, r in zip(outs, refs)]
        worst = max(errs)
        return worst <= SLACK_ULPS * 2**-23, f"max rel diff to torch {worst:.2e}"
    truths = _flat(truth)
    msgs, ok = [], True
    factor = 4.0 if name.startswith("core_topk") else 1.0  # tests/tolerances.EIG_ERR_FACTOR
    for i, (o, r, t) in enumerate(zip(outs, refs, truths)):
        ek, et = _rel(o, t), _rel(r, t)
        eps = torch.finfo(o.dtype).eps
        ok &= ek <= (factor if i else 1.0) * et + SLACK_ULPS * eps
        msgs.append(f"err {ek:.2e} (torch {et:.2e})")
    return ok, "; ".join(msgs)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(fns: dict[str, Callable[[], object]], dev, budget_s: float, max_rounds: int,
                     clock: Callable[[], float] = time.perf_counter):
    """Median seconds per call of every fn, in rounds whose order rotates."""
    names = list(fns)
    for n in names:  # warm-up (lazy imports, caches, allocator, kernel compilation)
        fns[n]()
        fns[n]()
    _sync(dev)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < max_rounds and (r < 3 or time.perf_counter() - start < budget_s):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _sync(dev)
            t0 = clock()
            fns[n]()
            _sync(dev)
            times[n].append(clock() - t0)
        r += 1
    return {n: statistics.median(v) for n, v in times.items()}, r


def provenance(dev) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "backends": {b: s["reason"] for b, s in ops.available_backends(dev).items()},
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
            info["cpu"] = model or info["cpu"]
        except OSError:
            pass
    return info


def run_case(op, name, build, call, truth_fn, extra, dev, quick, budget, clock,
             peaks=None) -> list[dict]:
    """Parity of every available backend, then interleaved timing of those that pass."""
    x = build()
    nbytes, flops = cost(op, name, x)
    rows = []
    backends = []
    for b in ("torch", "cpp", "cuda", "triton"):
        ok, why = registry.backend_status(b, dev)
        if b == "triton" and dev.type != "cuda":
            ok, why = False, "not timed on CPU (the Triton interpreter)"
        if b in registry._IMPLS[op] and ok:
            backends.append(b)
        elif b != "torch":
            rows.append({"op": op, "case": name, "backend": b, "skipped": why})

    def fresh():  # accumulate_ updates its inputs: parity runs on copies
        return copy.deepcopy(x) if op == "accumulate_" else x

    ref = call("torch", fresh())
    truth = truth_fn(x) if truth_fn is not None else None
    fns = {}
    for b in backends:
        if b == "torch":
            ok, msg = True, "reference"
        else:
            ok, msg = parity(name, call(b, fresh()), ref, truth, x)
        if not ok:
            rows.append({"op": op, "case": name, "backend": b, "skipped": f"parity failed: {msg}"})
            print(f"PARITY FAILED {name} {b}: {msg}", file=sys.stderr)
            continue
        fns[b] = functools.partial(call, b, x)
        rows.append({"op": op, "case": name, "backend": b, "parity": msg})
    for label, fn in extra.items():
        fns[label] = functools.partial(fn, x)
        rows.append({"op": op, "case": name, "backend": label, "parity": "baseline"})
    med, rounds = time_interleaved(fns, dev, 0.5 if quick else budget, 5 if quick else 200, clock)
    for row in rows:
        b = row["backend"]
        if b in med:
            row["median_ms"] = med[b] * 1e3
            row["rounds"] = rounds
            row["speedup_vs_torch"] = med["torch"] / med[b]
            row["bytes"], row["flops"] = nbytes, flops
            row["achieved_GBps"] = nbytes / med[b] / 1e9
            if peaks is not None:
                row["fraction_of_peak_bw"] = nbytes / med[b] / peaks[0]
                row["roofline_ms"] = roofline(nbytes, flops, peaks) * 1e3
                row["vs_roofline"] = med[b] / roofline(nbytes, flops, peaks)
            if "eager" in med:
                row["speedup_vs_eager"] = med["eager"] / med[b]
    line = "  ".join(f"{b} {med[b] * 1e3:8.2f} ms (x{med['torch'] / med[b]:5.2f})" for b in med)
    print(f"{name:48s} {line}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small cases, few rounds (a smoke run)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny cases, one mode per op, few rounds (a check that the script runs)")
    ap.add_argument("--ops", default="probe_logit_grad,core_topk,sq_matmul,shared_sq,accumulate_")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timing per case")
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/...)")
    ap.add_argument("--wall-only", action="store_true", help="skip the 1-thread CPU-time pass")
    ap.add_argument("--peak-bw", type=float, default=None,
                    help="memory bandwidth in bytes/s (default: from the GPU's name, PEAKS)")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="fp32 FLOP/s without tensor cores (default: from the GPU's name)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    peaks = peaks_of(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    if args.peak_bw is not None or args.peak_flops is not None:
        if args.peak_bw is None or args.peak_flops is None:
            ap.error("--peak-bw and --peak-flops go together")
        peaks = (args.peak_bw, args.peak_flops)
    builders = {"probe_logit_grad": probe_cases, "core_topk": topk_cases, "sq_matmul": sq_cases,
                "shared_sq": shared_cases, "accumulate_": accumulate_cases}
    # wall clock with the requested threads; on a CPU also the CPU time of one thread, which a
    # machine shared with other jobs inflates far less (waking a second thread there can cost
    # milliseconds of scheduling latency per parallel region)
    passes = [(f"wall_{args.threads}threads", args.threads, time.perf_counter)]
    if dev.type == "cpu" and not args.wall_only:
        passes.append(("cputime_1thread", 1, time.thread_time))
    prov = provenance(dev)
    prov["peaks"] = None if peaks is None else {"bytes_per_s": peaks[0], "fp32_flops": peaks[1]}
    runs = {}
    for label, threads, clock in passes:
        torch.set_num_threads(threads)
        print(f"== {label}", flush=True)
        results = []
        for op in args.ops.split(","):
            quick = "tiny" if args.tiny else args.quick
            for case in builders[op](dev, quick):
                results += run_case(op, *case, dev=dev, quick=bool(quick), budget=args.budget,
                                    clock=clock, peaks=peaks)
        runs[label] = results
    out = args.out
    if out is None:
        day = _dt.date.today().isoformat()
        out = os.path.join(ROOT, "benchmarks", "results", f"ops_{dev.type}_{day}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if hasattr(os, "getloadavg"):
        prov["loadavg_at_end"] = os.getloadavg()
    with open(out, "w") as f:
        json.dump({"provenance": prov, "runs": runs}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
