"""Figures of the command-line tool (matplotlib's Agg canvas; pyplot and its global state are not
used, so nothing here changes the caller's backend).

* :func:`histograms`: histograms of log10 Fisher values, one panel for all parameters and one per
  parameter, several files overlaid.
* :func:`convergence`: relative error against the number of batches, log-log, with a 1/sqrt(B)
  guide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fimfast.experiments.store import FisherFile

__all__ = ["COLORS", "color_of", "convergence", "histogram_figure", "histograms"]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


#: one colour per estimator, the same in every figure (fixed by name, not by file order)
COLORS = {
    "exact": "black",
    "empirical": "tab:red",
    "monte_carlo": "tab:green",
    "hutchinson": "tab:blue",
    "hutchinson_sqrt": "tab:cyan",
    "hutchinson_dg": "tab:orange",
    "hutchinson_rankk": "tab:purple",
    "hutchinson_rank1": "tab:pink",
}
_OTHER_COLORS = ("tab:brown", "tab:olive", "tab:gray")
_LINESTYLES = ("-", ":", "-.", (0, (5, 1)))
#: the reference is drawn on top of the others, dashed, so curves lying on it stay visible
REFERENCE = "exact"

#: histograms show log10 values from this quantile of a panel's positive entries up to the largest
#: (a thin tail far below the bulk would otherwise stretch the axis over tens of decades)
LOW_QUANTILE = 0.01


def color_of(name: str) -> str:
    """The colour of an estimator (or of any other label, stable across figures)."""
    key = str(name).lower()
    if key in COLORS:
        return COLORS[key]
    return _OTHER_COLORS[sum(key.encode()) % len(_OTHER_COLORS)]


def _style(name: str, repeat: int = 0) -> dict:
    ref = str(name).lower() == REFERENCE
    return {
        "color": color_of(name),
        "linestyle": "--" if ref else _LINESTYLES[repeat % len(_LINESTYLES)],
        "linewidth": 1.8 if ref else 1.2,
        "zorder": 10 if ref else 2,
    }


def _labels(files: Sequence[FisherFile]) -> list[str]:
    labels = [f.label for f in files]
    if len(set(labels)) < len(labels):  # the same type twice: use the file names
        labels = [f.path.stem for f in files]
    return labels


def _log10_positive(a: np.ndarray) -> tuple[np.ndarray, int]:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    pos = a > 0
    return np.log10(a[pos]), int(a.size - pos.sum())


def _count_note(counts: list[int], labels: list[str], what: str) -> str:
    """``"16277 zero entries in every file"``; per file (up to 3 files) or as a range when the
    files differ; ``""`` if there are none."""
    if not any(counts):
        return ""
    if len(set(counts)) == 1:
        return f"{counts[0]} {what} in every file" if len(counts) > 1 else f"{counts[0]} {what}"
    if len(counts) <= 3:
        return f"{what}: " + ", ".join(f"{lab} {c}" for lab, c in zip(labels, counts))
    return f"{what}: {min(counts)} to {max(counts)} per file"


def histograms(
    files: Sequence[FisherFile], out: str | Path, bins: int = 60, ncols: int = 3
) -> Path:
    """Write :func:`histogram_figure` as a PNG to ``out``; returns ``out``."""
    out = Path(out)
    fig = histogram_figure(files, bins, ncols)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _draw_panel(ax, panel: str, files, labels, styles, order, bins: int, handles: dict) -> None:
    """One panel: the histogram of each file's log10 entries of ``panel`` (or of all of them),
    with notes on the zero entries and those below the axis; adds legend handles to
    ``handles``."""
    data = []
    for f in files:
        if panel == "all parameters":
            data.append(_log10_positive(f.flat()))
        elif panel in f.arrays:
            data.append(_log10_positive(f.arrays[panel]))
        else:
            data.append((np.empty(0), 0))
    finite = [d for d, _ in data if d.size]
    ax.set_title(panel, fontsize=9)
    if not finite:
        ax.text(0.5, 0.5, "no positive entries", ha="center", transform=ax.transAxes)
        return
    pooled = np.concatenate(finite)
    lo = float(np.quantile(pooled, LOW_QUANTILE)) if pooled.size >= 200 else float(pooled.min())
    hi = float(pooled.max())
    n = max(d.size for d in finite)
    nb = int(min(bins, max(8, 2 * math.sqrt(n))))  # small tensors: fewer, fuller bins
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nb + 1)
    for i in order:
        d, zeros = data[i]
        if d.size == 0 and zeros == 0:
            continue
        *_, patches = ax.hist(
            d[d >= edges[0]], bins=edges, histtype="step", label=labels[i], **styles[i]
        )
        handles.setdefault(labels[i], patches[0])
    total = files[0].arrays[panel].size if panel in files[0].arrays else files[0].flat().size
    ax.set_title(f"{panel}  ({total} entries)", fontsize=9)
    zero_note = _count_note([z for _, z in data], labels, "zero entries (no log)")
    below = [int((d < edges[0]).sum()) for d, _ in data]
    below_note = _count_note(below, labels, f"entries below 10^{edges[0]:.1f} not shown")
    notes = "\n".join(t for t in (zero_note, below_note) if t)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("log10 Fisher diagonal entry" + (f"\n{notes}" if notes else ""), fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)


def _title(m: dict) -> str:
    title = "Diagonal Fisher: histograms of log10 values"
    if m.get("experiment"):
        title += (
            f" - {m['experiment']}, {m.get('num_batches')} batches x {m.get('batch_size')}, "
            f"seed {m.get('seed')}, reduction {m.get('reduction')}"
        )
    return title


def histogram_figure(files: Sequence[FisherFile], bins: int = 60, ncols: int = 3):
    """A figure of log10-value histograms: "all parameters" first, then each parameter.

    ``bins`` is the most bins of a panel; a panel of ``n`` entries gets ``2 sqrt(n)`` (at least 8).
    Each estimator has its colour (:data:`COLORS`) in every figure; EXACT is drawn dashed, on top.
    Entries that are zero (or negative) have no logarithm: each panel says once how many there
    are. The axis runs from the :data:`LOW_QUANTILE` quantile of the panel's positive entries to
    the largest; each panel says how many entries lie below it.

    Raises:
        ValueError: no files.
    """
    if not files:
        raise ValueError("files: give at least one result file")
    names: list[str] = []
    for f in files:
        names += [k for k in f.arrays if k not in names]
    panels = ["all parameters"] + names
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.0 * ncols, 3.4 * nrows + 0.8)
    labels = _labels(files)
    seen: dict[str, int] = {}
    styles = []
    for f in files:
        styles.append(_style(f.label, seen.get(f.label, 0)))
        seen[f.label] = seen.get(f.label, 0) + 1
    order = sorted(range(len(files)), key=lambda i: styles[i]["zorder"])  # reference last
    handles = {}
    for p, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        _draw_panel(ax, panel, files, labels, styles, order, bins, handles)
    ordered = [lab for lab in labels if lab in handles]
    fig.legend(
        [handles[lab] for lab in ordered],
        ordered,
        loc="upper center",
        ncol=min(8, len(ordered)),
        fontsize=8,
        bbox_to_anchor=(0.5, 0.985 - 0.012 * (3 / max(nrows, 1))),
    )
    title = _title(files[0].meta)
    fig.suptitle(title, fontsize=11, y=0.998)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if nrows > 1 else 0.85))
    return fig


def convergence(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    out: str | Path,
    title: str = "",
    guide: str | None = "hutchinson",
    ylabel: str = "relative L2 error",
) -> Path:
    """Write a log-log PNG of relative error against batches, one line per estimator, in the
    estimator's colour (:data:`COLORS`).

    Args:
        curves: ``{label: [(batches, relative error), ...]}``.
        out: the PNG path.
        title: figure title.
        guide: label of the curve a dashed ``c / sqrt(B)`` line starts from (``None``: no line).
        ylabel: label of the error axis.
    """
    out = Path(out)
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    markers = {name: m for name, m in zip(COLORS, "ods^vDPX")}
    for lab, pts in curves.items():
        pts = [(b, e) for b, e in pts if e is not None and np.isfinite(e) and e > 0]
        if not pts:
            continue
        b, e = zip(*pts)
        st = _style(lab)
        ax.plot(
            b,
            e,
            marker=markers.get(str(lab).lower(), "o"),
            label=lab,
            markersize=4,
            color=st["color"],
            linestyle=st["linestyle"],
            linewidth=st["linewidth"] + 0.1,
            zorder=st["zorder"],
        )
    if guide in curves and curves[guide]:
        b0, e0 = curves[guide][0]
        bs = np.array(sorted({b for pts in curves.values() for b, _ in pts}), dtype=float)
        ax.plot(bs, e0 * np.sqrt(b0 / bs), "k--", linewidth=1, label="1/sqrt(batches)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of batches B")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
