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

__all__ = ["convergence", "histograms"]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _labels(files: Sequence[FisherFile]) -> list[str]:
    labels = [f.label for f in files]
    if len(set(labels)) < len(labels):  # the same type twice: use the file names
        labels = [f.path.stem for f in files]
    return labels


def _log10_positive(a: np.ndarray) -> tuple[np.ndarray, int]:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    pos = a > 0
    return np.log10(a[pos]), int(a.size - pos.sum())


def histograms(
    files: Sequence[FisherFile], out: str | Path, bins: int = 60, ncols: int = 3
) -> Path:
    """Write a PNG of log10-value histograms: "all parameters" first, then each parameter.

    ``bins`` is the most bins of a panel; a panel of ``n`` entries gets ``2 sqrt(n)`` (at least 8).
    Entries that are zero (or negative) have no logarithm: they are counted and named in the
    legend, not drawn. Several files share the bins of each panel, drawn as outlines.

    Raises:
        ValueError: no files.
    """
    if not files:
        raise ValueError("files: give at least one result file")
    out = Path(out)
    names: list[str] = []
    for f in files:
        names += [k for k in f.arrays if k not in names]
    panels = ["all parameters"] + names
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.0 * ncols, 3.4 * nrows + 0.8)
    labels = _labels(files)
    colors = [f"C{i % 10}" for i in range(len(files))]
    for p, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        data = []
        for f in files:
            if panel == "all parameters":
                data.append(_log10_positive(f.flat()))
            elif panel in f.arrays:
                data.append(_log10_positive(f.arrays[panel]))
            else:
                data.append((np.empty(0), 0))
        finite = [d for d, _ in data if d.size]
        if not finite:
            ax.set_title(panel, fontsize=9)
            ax.text(0.5, 0.5, "no positive entries", ha="center", transform=ax.transAxes)
            continue
        lo = min(float(d.min()) for d in finite)
        hi = max(float(d.max()) for d in finite)
        n = max(d.size for d in finite)
        nb = int(min(bins, max(8, 2 * math.sqrt(n))))  # small tensors: fewer, fuller bins
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nb + 1)
        for (d, zeros), lab, col in zip(data, labels, colors):
            if d.size == 0 and zeros == 0:
                continue
            tag = f"{lab} ({zeros} zeros)" if zeros else lab
            ax.hist(d, bins=edges, histtype="step", color=col, label=tag, linewidth=1.2)
        total = files[0].arrays[panel].size if panel in files[0].arrays else files[0].flat().size
        ax.set_title(f"{panel}  ({total} entries)", fontsize=9)
        ax.set_xlabel("log10 Fisher diagonal entry", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
        if p == 0:
            ax.legend(fontsize=7, loc="upper left")
    m = files[0].meta
    title = "Diagonal Fisher: histograms of log10 values"
    if m.get("experiment"):
        title += (
            f" - {m['experiment']}, {m.get('num_batches')} batches x {m.get('batch_size')}, "
            f"seed {m.get('seed')}, reduction {m.get('reduction')}"
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def convergence(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    out: str | Path,
    title: str = "",
    guide: str | None = "hutchinson",
    ylabel: str = "relative L2 error",
) -> Path:
    """Write a log-log PNG of relative error against batches, one line per estimator.

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
    styles = ["-o", "-s", "-^", "-v", "-D", "-P", "-X", "-*", "-<", "->"]
    for i, (lab, pts) in enumerate(curves.items()):
        pts = [(b, e) for b, e in pts if e is not None and np.isfinite(e) and e > 0]
        if not pts:
            continue
        b, e = zip(*pts)
        ax.plot(b, e, styles[i % len(styles)], label=lab, markersize=4, linewidth=1.3)
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
