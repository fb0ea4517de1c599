"""``fimfast metrics``: compare diagonal Fisher estimates with a reference, overall and per layer.

For an estimate ``a`` and the reference ``g`` (flattened over one parameter, or over all):

* ``rel_l2``: ``||a - g|| / ||g||``;
* ``cosine``: ``a . g / (||a|| ||g||)``;
* ``spearman``: Pearson correlation of the ranks (ties get their average rank);
* ``ratio_of_means``: ``mean(a) / mean(g)`` (1 for an unbiased estimator, up to noise; above 1
  for an upper bound such as HUTCHINSON_DG, below 1 for a lower bound such as HUTCHINSON_RANKK).

Every quantity is computed in float64. An undefined value (a zero reference) is ``nan``.
:func:`compare_files` refuses what these numbers cannot compare: a non-finite entry (its rank
would be made up) and a file of another run than the reference (:data:`RUN_KEYS`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fimfast.experiments.store import FisherFile

__all__ = [
    "COLUMNS",
    "compare",
    "compare_files",
    "format_table",
    "rankdata",
    "spearman",
    "write_csv",
    "write_json",
]

ALL = "ALL"
# the metadata that says which quantity a result file estimates: files that differ in one of these
# (both saying it) hold sums over other rows, means of other batches or another network's Fisher
RUN_KEYS = ("experiment", "reduction", "seed", "num_batches", "batch_size", "rows")
COLUMNS = ("file", "type", "param", "numel", "rel_l2", "cosine", "spearman", "ratio_of_means")


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` of a 1-D array, ties sharing their average rank (scipy's ``average``)."""
    x = np.asarray(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    counts = np.diff(np.r_[starts, x.size])
    avg = starts + (counts + 1) / 2.0
    r = np.empty(x.size, dtype=np.float64)
    r[order] = avg[group]
    return r


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two vectors (``nan`` when one is constant)."""
    if a.size < 2:
        return float("nan")
    return _corr(rankdata(a), rankdata(b))


def compare(a: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """The metrics of estimate ``a`` against reference ``g`` (same number of entries)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if a.shape != g.shape:
        raise ValueError(
            f"estimate and reference must have as many entries; got {a.size} and {g.size}"
        )
    ng, na = float(np.linalg.norm(g)), float(np.linalg.norm(a))
    mg = float(g.mean()) if g.size else float("nan")
    return {
        "numel": int(g.size),
        "rel_l2": float(np.linalg.norm(a - g)) / ng if ng > 0 else float("nan"),
        "cosine": float(a @ g) / (na * ng) if na > 0 and ng > 0 else float("nan"),
        "spearman": spearman(a, g),
        "ratio_of_means": float(a.mean()) / mg if mg != 0 else float("nan"),
    }


def _check_same_layout(f: FisherFile, gt: FisherFile) -> None:
    if list(f.arrays) != list(gt.arrays):
        missing = [k for k in gt.arrays if k not in f.arrays]
        extra = [k for k in f.arrays if k not in gt.arrays]
        raise ValueError(
            f"{f.path}: its parameters differ from the reference {gt.path}: missing "
            f"{missing[:5]}, extra {extra[:5]}"
        )
    for k, v in gt.arrays.items():
        if f.arrays[k].shape != v.shape:
            raise ValueError(
                f"{f.path}: parameter {k!r} has shape {f.arrays[k].shape}; the reference "
                f"{gt.path} has {v.shape}"
            )


def _check_finite(f: FisherFile) -> None:
    bad = [k for k, a in f.arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise ValueError(
            f"{f.path}: the entries of {bad[:5]} are not finite (NaN or Inf); no metric compares "
            "them (a NaN's rank would be made up)"
        )


def _check_same_run(f: FisherFile, gt: FisherFile) -> None:
    diff = [k for k in RUN_KEYS if k in f.meta and k in gt.meta and f.meta[k] != gt.meta[k]]
    if diff:
        what = ", ".join(f"{k}={f.meta[k]!r} (reference: {gt.meta[k]!r})" for k in diff)
        raise ValueError(
            f"{f.path}: estimates another quantity than the reference {gt.path}: {what}; "
            "compare files of one run (the same experiment, reduction, seed and batches)"
        )


def compare_files(files: Sequence[FisherFile], gt: FisherFile) -> list[dict[str, Any]]:
    """One row per (file, parameter) and one ``param="ALL"`` row per file.

    Raises:
        ValueError: a file's parameter names or shapes differ from the reference's, an entry of
            a file or of the reference is not finite, or a file's metadata names another run
            than the reference's (one of :data:`RUN_KEYS` differs).
    """
    rows = []
    _check_finite(gt)
    for f in files:
        _check_same_layout(f, gt)
        _check_finite(f)
        _check_same_run(f, gt)
        head = {"file": f.path.name, "type": f.label}
        rows.append({**head, "param": ALL, **compare(f.flat(), gt.flat())})
        for k, g in gt.arrays.items():
            rows.append({**head, "param": k, **compare(f.arrays[k], g)})
    return rows


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else f"{v:#.{digits}g}".replace("e+0", "e+").replace("e-0", "e-")
        )
    return str(v)


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS, digits: int = 3
) -> str:
    """A plain-text table with aligned columns; every float with ``digits`` significant digits
    (trailing zeros kept, so ``1.00`` and ``0.358`` read alike)."""
    cells = [[str(c) for c in columns]] + [
        [_fmt(r.get(c, ""), digits) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the rows as CSV (columns :data:`COLUMNS`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    return path


def write_json(rows: Sequence[dict[str, Any]], path: str | Path, reference: str) -> Path:
    """Write ``{"reference": ..., "rows": [...]}`` as JSON (``nan`` written as ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in rows
    ]
    path.write_text(json.dumps({"reference": reference, "rows": clean}, indent=1) + "\n")
    return path
