"""``fimfast demo``: every estimator on one experiment, with figures, metrics and checks of the
paper's claims.

One pass per estimator over the same batches gives the convergence figure without re-running: the
estimate after ``B = 1, 2, 4, ...`` batches is compared with EXACT **on the same B batches**, so the
error is the estimator's own, not the data's. Every disjoint window of B consecutive batches is such
an estimate (the first window is the running estimate's snapshot after B batches); the figure shows
the root mean square of the relative error over the ``NB / B`` windows, which has much less noise
than one snapshot curve (both are in ``convergence.csv``). Checked:

* HUTCHINSON is unbiased: over the batches, its per-batch trace minus EXACT's has mean zero (paired
  z-score ``|z| < 3``), and its relative error falls as ``1/sqrt(B)`` (log-log slope between -0.7
  and -0.3);
* EMPIRICAL has a bias that does not fall: its error over the last snapshots stays flat (slope above
  -0.15) while HUTCHINSON's keeps falling;
* HUTCHINSON_DG >= EXACT >= HUTCHINSON_RANKK >= HUTCHINSON_RANK1 for the trace of every parameter
  tensor (the bounds of Sun, ICLR 2026).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fimfast.experiments import metrics as metricslib
from fimfast.experiments import plots
from fimfast.experiments.registry import get_experiment
from fimfast.experiments.runner import RunConfig, estimate, write
from fimfast.experiments.store import load_result
from fimfast.types import FIMType

__all__ = ["DemoConfig", "run_demo"]

SLOPE_RANGE = (-0.7, -0.3)  # fitted log-log slope accepted as "falls as 1/sqrt(B)"
PLATEAU_SLOPE = -0.15  # a late slope above this is "does not fall"
Z_MAX = 3.0  # paired z-score accepted as "no bias"


@dataclass
class DemoConfig:
    """Options of ``fimfast demo`` (see ``fimfast demo --help``)."""

    out_dir: Path = Path("fimfast_out")
    experiment: str = "mnist_mlp"
    num_batches: int = 128
    batch_size: int = 32
    seed: int = 42
    fim_types: list[FIMType] = field(default_factory=lambda: list(FIMType))
    num_probes: int = 1
    top_k: int = 2
    reduction: str = "mean"
    progress: bool = True
    retrain: bool = False
    opts: dict[str, Any] = field(default_factory=dict)  # other estimator options (backend, ...)


def snapshot_points(num_batches: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``num_batches``, and ``num_batches`` itself."""
    pts, b = [], 1
    while b < num_batches:
        pts.append(b)
        b *= 2
    return pts + [num_batches]


def _slope(points: list[tuple[int, float]]) -> float:
    pts = [(b, e) for b, e in points if e > 0 and np.isfinite(e)]
    if len(pts) < 2:
        return float("nan")
    x = np.log([b for b, _ in pts])
    y = np.log([e for _, e in pts])
    return float(np.polyfit(x, y, 1)[0])


def _paired_z(a: list[float], b: list[float]) -> float:
    d = np.asarray(a) - np.asarray(b)
    if d.size < 2:
        return float("nan")
    se = d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean() / se) if se > 0 else (0.0 if d.mean() == 0 else
                                                math.copysign(math.inf, d.mean()))


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def _verdict(holds: bool, contradicted: bool) -> str:
    """``PASS`` when the run shows the claim, ``FAIL`` when it contradicts it beyond its noise
    (``Z_MAX`` standard errors), else ``INCONCLUSIVE``: too few batches to tell."""
    return "PASS" if holds else "FAIL" if contradicted else "INCONCLUSIVE"


class _Cumulative:
    """Keeps the running sums of EXACT's per-batch estimates (index ``i`` = after ``i`` batches)."""

    def __init__(self, store: list[np.ndarray]):
        self.store = store

    def __call__(self, i: int, vec: np.ndarray) -> None:
        if not self.store:
            self.store.append(np.zeros_like(vec))
        self.store.append(self.store[-1] + vec)


class _Windows:
    """Relative L2 error against EXACT of every disjoint window of ``B`` batches, for each ``B``."""

    COLUMNS = ("batches", "windows", "rel_l2_rms", "rel_l2_first", "ratio_of_means_first")

    def __init__(self, points: list[int], exact_cum: list[np.ndarray]):
        self.points = points
        self.exact_cum = exact_cum
        self.cur: dict[int, np.ndarray | None] = {b: None for b in points}
        self.err: dict[int, list[float]] = {b: [] for b in points}
        self.ratio_first: dict[int, float] = {}

    def __call__(self, i: int, vec: np.ndarray) -> None:
        for b in self.points:
            cur = self.cur[b]
            cur = vec.copy() if cur is None else cur + vec
            if i % b == 0:
                g = self.exact_cum[i] - self.exact_cum[i - b]
                ng = float(np.linalg.norm(g))
                self.err[b].append(float(np.linalg.norm(cur - g)) / ng if ng > 0 else np.nan)
                if b not in self.ratio_first:
                    self.ratio_first[b] = float(cur.sum() / g.sum()) if g.sum() else np.nan
                cur = None
            self.cur[b] = cur

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "batches": b,
                "windows": len(self.err[b]),
                "rel_l2_rms": float(np.sqrt(np.mean(np.square(self.err[b])))),
                "rel_l2_first": self.err[b][0],
                "ratio_of_means_first": self.ratio_first[b],
            }
            for b in self.points
            if self.err[b]
        ]


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the paths, the convergence curves, the metrics and the checks."""
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    types = list(dict.fromkeys([FIMType.EXACT, *cfg.fim_types]))  # EXACT is the reference
    exp = get_experiment(cfg.experiment)
    opts = {**cfg.opts, "num_probes": cfg.num_probes, "top_k": cfg.top_k}
    run_cfg = RunConfig(
        cfg.experiment, types, cfg.num_batches, cfg.batch_size, cfg.seed, cfg.reduction, opts, out
    ).resolved()
    setup = _prepare(cfg, run_cfg, exp, out, log)
    results, files, curves, conv_rows = _estimate_all(cfg, run_cfg, setup, types, opts, log)
    conv_csv, conv_png = _write_convergence(cfg, run_cfg, out, curves, conv_rows)

    # files -> histograms and metrics, exactly as `fimfast viz` / `fimfast metrics` do
    loaded = [load_result(files[t]) for t in types]
    hist_png = plots.histograms(loaded, out / "histograms.png")
    gt = loaded[0]
    rows = metricslib.compare_files(loaded[1:], gt)
    metrics_csv = metricslib.write_csv(rows, out / "metrics.csv")
    metrics_json = metricslib.write_json(rows, out / "metrics.json", reference=gt.path.name)

    checks = _checks(types, results, curves, loaded)
    checks_json = out / "checks.json"
    checks_json.write_text(json.dumps(checks, indent=1, default=str) + "\n")
    elapsed = time.perf_counter() - t_start

    written = [*files.values(), hist_png, conv_png, conv_csv, metrics_csv, metrics_json]
    _log_summary(log, rows, results, curves, checks, gt, out, [*written, checks_json])
    log(f"demo finished in {elapsed:.1f} s")
    return {
        "files": files,
        "histograms": hist_png,
        "convergence_png": conv_png,
        "convergence": curves,
        "metrics": rows,
        "checks": checks,
        "seconds": elapsed,
    }


def _prepare(cfg: DemoConfig, run_cfg: RunConfig, exp, out: Path, log: Callable[[str], None]):
    """Train the network (or load its cached weights) and say what is estimated."""
    t0 = time.perf_counter()
    setup = exp.prepare(cfg.seed, out, cfg.retrain)
    how = "loaded from cache" if setup.info.get("from_cache") else "trained"
    log(
        f"{cfg.experiment}: {setup.model_desc}; {how} in {time.perf_counter() - t0:.1f} s; "
        f"train/test accuracy {setup.info.get('train_accuracy')}/"
        f"{setup.info.get('test_accuracy')}"
    )
    log(
        f"estimating on {run_cfg.num_batches} batches of {run_cfg.batch_size} "
        f"({setup.dataset_desc}), reduction={cfg.reduction}, num_probes={cfg.num_probes}, "
        f"top_k={cfg.top_k}, {torch.get_num_threads()} torch thread(s)"
    )
    return setup


def _estimate_all(cfg: DemoConfig, run_cfg: RunConfig, setup, types, opts, log):
    """Every estimator over the same batches, each written to its file; returns the results, the
    files, the convergence curves against EXACT and the rows of convergence.csv."""
    points = snapshot_points(run_cfg.num_batches)
    results, files = {}, {}
    exact_cum: list[np.ndarray] = []  # running sums of EXACT's per-batch estimates (float64)
    curves: dict[str, list[tuple[int, float]]] = {}
    conv_rows = []
    for t in types:
        if t == FIMType.EXACT:
            hook = _Cumulative(exact_cum)
        else:
            hook = _Windows(points, exact_cum)
        res = estimate(
            setup,
            t,
            run_cfg.num_batches,
            run_cfg.batch_size,
            cfg.seed,
            cfg.reduction,
            opts,
            progress=cfg.progress,
            on_batch=hook,
            desc=f"{cfg.experiment} {t.value}",
        )
        results[t] = res
        files[t] = write(run_cfg, setup, t, res)
        log(f"  {t.value:<17} {np.mean(res.seconds) * 1e3:8.1f} ms/batch -> {files[t]}")
        if isinstance(hook, _Windows):
            rows_t = hook.rows()
            curves[t.value] = [(r["batches"], r["rel_l2_rms"]) for r in rows_t]
            conv_rows += [{"type": t.value, **r} for r in rows_t]
    return results, files, curves, conv_rows


def _write_convergence(cfg: DemoConfig, run_cfg: RunConfig, out: Path, curves, conv_rows):
    """convergence.csv and convergence.png; returns their paths."""
    conv_csv = out / "convergence.csv"
    with open(conv_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["type", *_Windows.COLUMNS])
        w.writeheader()
        w.writerows(conv_rows)
    conv_png = plots.convergence(
        curves,
        out / "convergence.png",
        title=(
            f"{cfg.experiment}: error of each estimator vs EXACT on the same batches "
            f"(batch {run_cfg.batch_size}, {cfg.num_probes} probe)"
        ),
        guide="hutchinson" if "hutchinson" in curves else None,
        ylabel="relative L2 error vs EXACT on the same batches\n(RMS over disjoint windows)",
    )
    return conv_csv, conv_png


def _log_summary(log, rows, results, curves, checks, gt, out: Path, written) -> None:
    """Print the overall metrics, the bounds, the claims and the files written."""
    overall = [r for r in rows if r["param"] == metricslib.ALL]
    slopes = {k: _slope(v) for k, v in curves.items()}
    for r in overall:
        r["slope"] = slopes.get(r["type"], float("nan"))
        r["ms_per_batch"] = float(np.mean(results[FIMType.parse(r["type"])].seconds) * 1e3)
    log("")
    log(f"Metrics against EXACT ({gt.path.name}); slope = log-log slope of the error vs batches:")
    log(
        metricslib.format_table(
            overall,
            ("type", "rel_l2", "cosine", "spearman", "ratio_of_means", "slope", "ms_per_batch"),
        )
    )
    if checks.get("bounds"):
        log("")
        log("Bounds per parameter (trace ratios to EXACT; expected DG >= 1 >= RANKK >= RANK1; "
            "noise: out of order within the estimates' noise):")
        log(
            metricslib.format_table(
                checks["bounds"], ("param", "exact_trace", "dg", "rankk", "rank1", "ok")
            )
        )
    log("")
    log("Claims:")
    for c in checks["claims"]:
        log(f"  [{c['result']}] {c['claim']}: {c['evidence']}")
    if any(c["result"] == "INCONCLUSIVE" for c in checks["claims"]):
        log("  (INCONCLUSIVE: too few batches to show or contradict the claim; more batches "
            "decide it)")
    log("")
    log(f"Files in {out}/:")
    for p in written:
        log(f"  {p}")


def _checks(types, results, curves, loaded) -> dict[str, Any]:
    """The paper's claims, evaluated on this run."""
    claims = []
    ref = results[FIMType.EXACT]
    exact_traces = ref.batch_traces

    def have(t: FIMType) -> bool:
        return t in results

    if have(FIMType.HUTCHINSON):
        h = curves["hutchinson"]
        s = _slope(h)
        claims.append(
            {
                "claim": "HUTCHINSON error falls as 1/sqrt(batches)",
                "result": _ok(SLOPE_RANGE[0] <= s <= SLOPE_RANGE[1]),
                "evidence": f"log-log slope {s:.2f} (1/sqrt: -0.5), error {h[0][1]:.3g} at "
                f"B={h[0][0]} -> {h[-1][1]:.3g} at B={h[-1][0]}",
            }
        )
        z = _paired_z(results[FIMType.HUTCHINSON].batch_traces, exact_traces)
        ratio = sum(results[FIMType.HUTCHINSON].batch_traces) / sum(exact_traces)
        claims.append(
            {
                "claim": "HUTCHINSON is unbiased",
                "result": _ok(abs(z) < Z_MAX),
                "evidence": f"trace ratio to EXACT {ratio:.4f}, paired z-score over batches "
                f"{z:.2f}",
            }
        )
    for t in (FIMType.MONTE_CARLO, FIMType.HUTCHINSON_SQRT):
        if have(t):
            z = _paired_z(results[t].batch_traces, exact_traces)
            s = _slope(curves[t.value])
            claims.append(
                {
                    "claim": f"{t.name} is unbiased and its error falls as 1/sqrt(batches)",
                    "result": _ok(abs(z) < Z_MAX and SLOPE_RANGE[0] <= s <= SLOPE_RANGE[1]),
                    "evidence": f"paired z-score {z:.2f}, log-log slope {s:.2f}",
                }
            )
    if have(FIMType.EMPIRICAL):
        e = curves["empirical"]
        late = [(b, v) for b, v in e if b >= max(1, e[-1][0] // 16)]
        s = _slope(late)
        z = _paired_z(results[FIMType.EMPIRICAL].batch_traces, exact_traces)
        ratio = sum(results[FIMType.EMPIRICAL].batch_traces) / sum(exact_traces)
        claims.append(  # a bias seen in the traces (|z| >= Z_MAX) cannot fall with batches;
            # nothing in a run contradicts the claim, a small one may show neither sign
            {
                "claim": "EMPIRICAL has a bias that does not fall with more batches",
                "result": _verdict(s > PLATEAU_SLOPE or abs(z) >= Z_MAX, False),
                "evidence": f"late log-log slope {s:.2f} (B >= {late[0][0]}), error "
                f"{e[-1][1]:.3g} at B={e[-1][0]}, trace ratio {ratio:.3f} (z {z:.1f})",
            }
        )
    bounds = []
    if all(have(t) for t in (FIMType.HUTCHINSON_DG, FIMType.HUTCHINSON_RANKK)):
        bounds = _bounds(loaded, results)
        n_ok = sum(r["ok"] == "yes" for r in bounds)
        n_no = sum(r["ok"] == "NO" for r in bounds)
        claims.append(
            {
                "claim": "HUTCHINSON_DG >= EXACT >= HUTCHINSON_RANKK >= HUTCHINSON_RANK1 "
                "per parameter",
                "result": _verdict(n_ok == len(bounds), n_no > 0),
                "evidence": f"{n_ok}/{len(bounds)} parameter tensors in order (traces), "
                f"{n_no} out of order beyond {Z_MAX:g} standard errors of the paired batches",
            }
        )
    return {"claims": claims, "bounds": bounds}


def _bounds(loaded, results) -> list[dict[str, Any]]:
    """Per parameter tensor, the traces of DG, RANKK and RANK1 as ratios to EXACT's, and whether
    they are in the order DG >= EXACT >= RANKK >= RANK1: ``yes``; else ``NO`` when a pair is out
    of order by more than ``Z_MAX`` standard errors of its per-batch differences (DG, RANKK and
    RANK1 are random estimates of the bounds: the order holds in expectation), ``noise`` when
    within them. A pair equal in law is not ordered (two estimates of one number fall in either
    order): RANKK and RANK1 at ``top_k=1``, RANKK and EXACT at ``top_k=C-1`` (the whole core FIM
    of a softmax, of rank C - 1)."""
    bounds = []
    by_type = {FIMType.parse(f.meta["fim_type"]): f for f in loaded}
    ex = by_type[FIMType.EXACT]
    rk = by_type[FIMType.HUTCHINSON_RANKK].meta
    top_k, C = (rk.get("options") or {}).get("top_k"), rk.get("num_classes")
    for k, g in ex.arrays.items():
        tr = float(np.asarray(g, dtype=np.float64).sum())
        row: dict[str, Any] = {"param": k, "exact_trace": tr}
        chain = [
            (FIMType.HUTCHINSON_DG, "dg"),
            (FIMType.HUTCHINSON_RANKK, "rankk"),
            (FIMType.HUTCHINSON_RANK1, "rank1"),
        ]
        vals = {}
        for t, name in chain:
            if t in by_type:
                v = float(np.asarray(by_type[t].arrays[k], dtype=np.float64).sum())
                vals[name] = v
                row[name] = v / tr if tr > 0 else float("nan")
        whole = top_k is not None and C is not None and top_k >= C - 1
        equal = {(FIMType.EXACT, FIMType.HUTCHINSON_RANKK)} if whole else set()
        if top_k == 1:
            equal.add((FIMType.HUTCHINSON_RANKK, FIMType.HUTCHINSON_RANK1))
        ok = vals["dg"] >= tr
        ok &= whole or tr >= vals["rankk"]
        ok &= top_k == 1 or vals.get("rank1", -1.0) <= vals["rankk"]
        row["ok"] = "yes" if ok else "NO" if _out_of_order(results, k, equal) else "noise"
        bounds.append(row)
    return bounds


def _out_of_order(results, name: str, equal: set) -> bool:
    """Whether a pair of DG >= EXACT >= RANKK >= RANK1 (but those of ``equal``) is reversed on
    ``name`` beyond ``Z_MAX`` standard errors of its per-batch trace differences (paired: the
    same batches)."""
    chain = [t for t in (FIMType.HUTCHINSON_DG, FIMType.EXACT, FIMType.HUTCHINSON_RANKK,
                         FIMType.HUTCHINSON_RANK1) if t in results]
    per = {t: [b[name] for b in results[t].batch_param_traces] for t in chain}
    return any(_paired_z(per[hi], per[lo]) < -Z_MAX for hi, lo in zip(chain, chain[1:])
               if (hi, lo) not in equal)
