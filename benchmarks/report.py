"""Markdown tables and a PNG bar chart from one results JSON.

``python -m benchmarks.report benchmarks/results/<run>.json`` writes ``<run>.md`` and ``<run>.png``
next to it (or where ``--md`` / ``--png`` say).
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["chart", "load", "markdown", "summary_rows", "write"]

FAMILY_ORDER = ("exact", "per_sample", "hutchinson")
FAMILY_TITLE = {
    "exact": "exact",
    "per_sample": "per-sample MC / empirical",
    "hutchinson": "Hutchinson family",
}


def load(path: str) -> dict:
    """The results of one run."""
    with open(path) as f:
        return json.load(f)


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _err(v: float | None) -> str:
    return "-" if v is None else f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}"


def _floor_ms(w: dict) -> float | None:
    return w["methods"].get("floor", {}).get("time_ms")


def _estimate(r: dict) -> float | None:
    """Extrapolated seconds per call of a stopped method (never below the time it already ran)."""
    est = r.get("est_call_s")
    return None if est is None else max(est, r.get("elapsed_before_abort_s", 0.0))


def _status(r: dict, floor_ms: float | None) -> str:
    st = r.get("status", "?")
    if st == "ok":
        text = ""
    elif st == "too_slow":
        est = _estimate(r)
        if est:
            ratio = f" = ~{est * 1e3 / floor_ms:,.0f}x floor" if floor_ms else ""
            text = f"**too slow**: > {r['elapsed_before_abort_s']:.0f} s, ~{est:,.0f} s per call" \
                   f"{ratio} ({r.get('est_from', '')})"
        elif r.get("est_call_s_lower_bound"):
            text = f"**too slow**: > {r['est_call_s_lower_bound']:,.0f} s per call (lower bound)"
        else:
            text = f"**too slow**: {r.get('error', '')} ({r.get('est_from', '')})"
    else:
        text = f"**{st.replace('_', ' ')}**: `{str(r.get('error', '')).replace('|', '/')[:150]}`"
    notes = list(r.get("notes", []))
    return "; ".join([t for t in [text, *notes] if t])


def _ops(r: dict) -> str:
    """``ops (kernels)``: ATen operators of one call, and those that are not views."""
    ops = r.get("ops_per_call")
    if ops is None:
        return "-"
    return f"{ops} ({ops - r.get('views_per_call', 0)})"


def _ratio(r: dict, floor_ms: float | None) -> float | None:
    if r.get("ratio") is not None:
        return r["ratio"]
    return None


def markdown(data: dict) -> str:
    """Per-workload tables and the summary, in markdown."""
    prov = data["provenance"]
    methods = data["methods"]
    v = prov["versions"]
    backends = ", ".join(b for b, s in prov["fimfast_backends"].items() if s["available"])
    out = [
        f"Run of {prov['time']} on {prov.get('gpu') or prov['cpu']} "
        f"({prov['logical_cpus']} logical CPUs, torch threads {prov['torch_threads']}), "
        f"torch {v['torch']}, fimfast {prov['fimfast_version']} @ "
        f"`{(prov.get('fimfast_git_sha') or '?')[:10]}`"
        f"{' (dirty)' if prov.get('fimfast_git_dirty') else ''}; "
        f"BackPACK {v.get('backpack-for-pytorch')}, NNGeometry {v.get('nngeometry')}, "
        f"curvlinops {v.get('curvlinops-for-pytorch')}. "
        f"fimfast backends: {backends}."
        f" Command: `{' '.join(prov['argv'])}`.",
        "",
        "### Summary: best ratio to the floor per estimator family (same run, same rounds)",
        "",
        summary_markdown(data),
    ]
    for key, w in data["workloads"].items():
        floor = _floor_ms(w)
        ref = w.get("reference", {})
        out += [
            "",
            f"### ({key}) {w['title']}: {w['num_params']:,} parameters, {w['rows']:,} rows, "
            f"{w['classes']:,} classes",
            "",
            f"Reference: {ref.get('method', ref.get('error', '?'))}.",
            "",
            "| method | time ms | x floor | ops/step | peak extra MB | rel. err, 1 draw | "
            "rel. err, mean of n | status / notes |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in w["methods"].items():
            m = methods.get(name, {"label": name, "note": "", "random": False})
            n_mean = f" (n={r['n_mean']})" if r.get("n_mean") else ""
            mean = _err(r.get("err_mean")) + n_mean if m["random"] else (
                "deterministic" if r.get("err_1") is not None else "-")
            note = _status(r, floor)
            if m.get("note"):
                note = "; ".join(t for t in [m["note"], note] if t)
            out.append(
                f"| {m['label']} | {_num(r.get('time_ms'))} | {_num(_ratio(r, floor))} | "
                f"{_ops(r)} | {_num(r.get('peak_extra_mb'), 2)} | {_err(r.get('err_1'))} | "
                f"{mean} | {note} |"
            )
    return "\n".join(out) + "\n"


def _bound(m: dict) -> bool:
    """A deterministic bound in expectation (DG, RANKK): not an estimate of the FIM itself."""
    return bool(m.get("bound", "bound" in m.get("note", "")))


def summary_rows(data: dict) -> list[dict]:
    """Per workload and family: fimfast's best measured ratio and the best peer's.

    The bounds (``hutchinson_dg``, ``hutchinson_rankk``, ``hutchinson_rank1``) are left out: they
    estimate another matrix; the per-workload tables have them.
    """
    rows = []
    methods = data["methods"]
    for key, w in data["workloads"].items():
        for fam in FAMILY_ORDER:
            best = {}
            for side in ("fimfast", "peer"):
                cands = []
                for name, r in w["methods"].items():
                    m = methods.get(name)
                    if m is None or m["family"] != fam or r.get("ratio") is None or _bound(m):
                        continue
                    if (m["library"] == "fimfast") != (side == "fimfast"):
                        continue
                    cands.append((r["ratio"], name, r))
                if cands:
                    ratio, name, r = min(cands)
                    best[side] = {"method": name, "label": methods[name]["label"],
                                  "ratio": ratio, "peak_mb": r.get("peak_extra_mb"),
                                  "err_1": r.get("err_1"), "err_mean": r.get("err_mean")}
                    continue
                # nothing measured: the fastest extrapolated (too slow) method, if any
                floor = _floor_ms(w)
                slow = [((_estimate(r) or r["est_call_s_lower_bound"]) * 1e3 / floor, name,
                         r.get("est_call_s") is None)
                        for name, r in w["methods"].items()
                        if floor and (r.get("est_call_s") or r.get("est_call_s_lower_bound"))
                        and name in methods and not _bound(methods[name])
                        and methods[name]["family"] == fam
                        and (methods[name]["library"] == "fimfast") == (side == "fimfast")]
                if slow:
                    ratio, name, lower = min(slow)
                    best[side] = {"method": name, "label": methods[name]["label"],
                                  "ratio": ratio, "extrapolated": True, "lower_bound": lower}
            rows.append({"workload": key, "family": fam, **best})
    return rows


def _cell(b: dict | None) -> str:
    if not b:
        return "none ran"
    if b.get("extrapolated"):
        how = ">" if b.get("lower_bound") else "~"
        return f"too slow: {how}{b['ratio']:,.0f}x extrapolated ({b['label']})"
    err = _err(b["err_1"])
    if b.get("err_mean") is not None:
        err += f" / {_err(b['err_mean'])}"
    return f"{b['ratio']:.2f}x, {_num(b['peak_mb'], 2)} MB, err {err} ({b['label']})"


def summary_markdown(data: dict) -> str:
    """The summary table (fimfast's best vs the best peer per family)."""
    lines = ["| workload | family | fimfast best: x floor, peak MB, err 1 draw / mean (method) | "
             "best peer: x floor, peak MB, err (method) |", "|---|---|---|---|"]
    for row in summary_rows(data):
        lines.append(f"| {row['workload']} | {FAMILY_TITLE[row['family']]} | "
                     f"{_cell(row.get('fimfast'))} | {_cell(row.get('peer'))} |")
    return "\n".join(lines)


def chart(data: dict, path: str) -> None:
    """Horizontal bars of the ratio to the floor (log scale), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = data["methods"]
    keys = list(data["workloads"])
    heights = [max(2, len(data["workloads"][k]["methods"])) for k in keys]
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 0.28 * sum(heights) + 1.2 * len(keys)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {"fimfast": "#1f77b4", "torch": "#7f7f7f"}
    for ax, key in zip(axes[:, 0], keys):
        w = data["workloads"][key]
        floor = _floor_ms(w)
        labels, values, cols, texts = [], [], [], []
        for name, r in w["methods"].items():
            m = methods.get(name, {"label": name, "library": "?"})
            labels.append(m["label"])
            ratio = r.get("ratio")
            if ratio is None and _estimate(r) and floor:
                ratio = _estimate(r) * 1e3 / floor
                texts.append(f"~{ratio:,.0f}x (too slow, extrapolated)")
                cols.append("#dddddd")
            elif ratio is None:
                texts.append(r.get("status", "?").replace("_", " "))
                cols.append("#ffffff")
            else:
                texts.append(f"{ratio:.2f}x")
                cols.append(colors.get(m["library"], "#ff7f0e"))
            values.append(ratio or 0.0)
        y = range(len(labels))
        ax.barh(list(y), [v if v > 0 else 1e-9 for v in values], color=cols, edgecolor="#555555",
                linewidth=0.4)
        ax.set_xscale("log")
        positive = [v for v in values if v > 0] or [1.0]
        ax.set_xlim(0.5, max(positive) * 8)
        for i, (v, t) in enumerate(zip(values, texts)):
            ax.text(max(v, 0.55), i, " " + t, va="center", fontsize=7)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="#333333", linewidth=0.6)
        ax.set_title(f"({key}) {w['title']}", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("time / time of one training step (fwd+bwd of the CE loss), log scale;"
                           " blue: fimfast, orange: peers", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(json_path: str, md_path: str | None = None, png_path: str | None = None
          ) -> tuple[str, str]:
    """Write the markdown and the chart of ``json_path``; returns their paths."""
    stem = os.path.splitext(json_path)[0]
    md_path = md_path or stem + ".md"
    png_path = png_path or stem + ".png"
    data = load(json_path)
    with open(md_path, "w") as f:
        f.write(markdown(data))
    chart(data, png_path)
    return md_path, png_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    ap.add_argument("results", help="a results JSON of python -m benchmarks")
    ap.add_argument("--md", help="markdown output (default: next to the JSON)")
    ap.add_argument("--png", help="chart output (default: next to the JSON)")
    args = ap.parse_args(argv)
    md, png = write(args.results, args.md, args.png)
    print(md)
    print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
