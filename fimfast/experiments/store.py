"""Result files: one ``.npz`` per (experiment, type, batches, batch size, seed, reduction and the
options that change that type's estimate).

A file holds one float array per parameter name (shaped like the parameter) and one JSON metadata
entry, ``__fimfast_meta__`` (a 0-d unicode array), so it loads with
``numpy.load(path, allow_pickle=False)``. Files are written to a temporary file in the same folder
and moved into place with :func:`os.replace`, so a reader (or an interrupted run) never sees half a
file; the file gets the permissions of any new file (``0o666`` less the process's umask).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "META_KEY",
    "FORMAT",
    "FisherFile",
    "ResultFileError",
    "atomic_temp",
    "load_result",
    "new_file_mode",
    "result_name",
    "save_result",
]

META_KEY = "__fimfast_meta__"
FORMAT = "fimfast-diag-fisher-npz"
FORMAT_VERSION = 1


class ResultFileError(ValueError):
    """A result file is missing, corrupted, pickled, or not a fimfast result."""


def result_name(
    experiment: str,
    fim_type: str,
    num_batches: int,
    batch_size: int,
    seed: int,
    reduction: str = "sum",
    tag: str = "",
) -> str:
    """``<experiment>_<type>_nb<NB>_bs<BS>_seed<S>[_mean][_<tag>].npz``.

    ``_mean`` marks ``reduction="mean"``; ``tag`` names the options that change the estimate
    (:func:`fimfast.experiments.runner.option_tag`), so runs with other options never overwrite
    each other.
    """
    name = f"{experiment}_{fim_type}_nb{num_batches}_bs{batch_size}_seed{seed}"
    if reduction != "sum":
        name += f"_{reduction}"
    if tag:
        name += f"_{tag}"
    return name + ".npz"


def new_file_mode() -> int:
    """The permission bits of a newly created file: ``0o666`` less the process's umask."""
    try:  # Linux: read the umask without changing it (os.umask would, for a moment, in all threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_temp(path: Path) -> str:
    """A new temporary file beside ``path`` (to be moved onto it with :func:`os.replace`), with
    the permissions of a newly created file rather than ``mkstemp``'s ``0o600``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
    finally:
        os.close(fd)
    return tmp


@dataclass
class FisherFile:
    """A loaded result file.

    Attributes:
        path: where it was read from.
        arrays: ``{param_name: float array shaped like the parameter}``, in parameter order.
        meta: the metadata (``fim_type``, ``experiment``, ``options``, ...).
    """

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        """A short name for tables and legends: the type, or the file stem."""
        return str(self.meta.get("fim_type") or self.path.stem)

    def flat(self) -> np.ndarray:
        """All entries as one float64 vector (parameters in order)."""
        return np.concatenate([a.reshape(-1).astype(np.float64) for a in self.arrays.values()])


def save_result(
    path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Write ``arrays`` and ``meta`` atomically to ``path`` (a ``.npz``).

    Raises:
        ValueError: a parameter name collides with the metadata key or an array is not numeric.
    """
    path = Path(path)
    if META_KEY in arrays:
        raise ValueError(f"arrays: the name {META_KEY!r} is reserved for the metadata")
    payload: dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"arrays[{k!r}] must be numeric; got dtype {a.dtype}")
        payload[k] = a
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "names": list(arrays)}
    payload[META_KEY] = np.array(json.dumps(meta, sort_keys=False, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_temp(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # an exception or Ctrl-C before os.replace leaves no partial file behind
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_result(path: str | Path) -> FisherFile:
    """Read a result file written by :func:`save_result`, never unpickling anything.

    Raises:
        ResultFileError: the file is missing, not a valid ``.npz``, holds pickled objects, has no
            fimfast metadata, or its arrays do not match the metadata (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":  # neither a zip (.npz) nor a .npy
        raise ResultFileError(
            f"{path}: not a .npz file (it does not start with the zip signature; "
            "fimfast result files are written by `fimfast run`)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ResultFileError(
                    f"{path}: is a single .npy array, not a fimfast .npz result file"
                )
            data = {k: z[k] for k in z.files}
    except ResultFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ResultFileError(
                f"{path}: holds pickled Python objects; fimfast result files contain plain "
                "arrays only and pickled data is refused (allow_pickle=False)"
            ) from exc
        raise ResultFileError(f"{path}: not a valid .npz file ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ResultFileError(
            f"{path}: not a valid .npz file, corrupted or truncated ({exc})"
        ) from exc
    if META_KEY not in data:
        raise ResultFileError(
            f"{path}: has no {META_KEY!r} entry, so it is not a fimfast result file "
            f"(entries: {sorted(data)[:6]})"
        )
    raw = data.pop(META_KEY)
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, TypeError, IndexError) as exc:
        raise ResultFileError(f"{path}: its metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ResultFileError(f"{path}: metadata format is not {FORMAT!r}")
    names = meta.get("names", list(data))
    if sorted(names) != sorted(data):
        raise ResultFileError(
            f"{path}: arrays {sorted(data)[:6]} do not match the names in the metadata "
            f"{sorted(names)[:6]}"
        )
    for k in names:
        if data[k].dtype.kind not in "fiu":
            raise ResultFileError(f"{path}: array {k!r} has non-numeric dtype {data[k].dtype}")
    return FisherFile(path, {k: data[k] for k in names}, meta)
