"""Fisher-weighted model merging, and Fisher files that can be published and reused.

:func:`fisher_merge` implements Matena & Raffel, *Merging Models with Fisher-Weighted Averaging*
(NeurIPS 2022): for models ``theta_1..theta_N`` with Fisher diagonals ``F_1..F_N`` and weights
``w_i``, every coordinate of the merged model is

    theta*_j = sum_i w_i (F_i,j + eps) theta_i,j / sum_i w_i (F_i,j + eps).

``eps`` (default ``1e-8``) is added to every Fisher entry: where all ``F_i,j`` are 0 (a parameter
no estimate reached, dead units) the coordinate is the plain ``w``-weighted average, and where the
Fishers are much larger than ``eps`` it is the Fisher-weighted average. ``eps`` is absolute: give
Fishers on one scale (all ``reduction="mean"``, the Fisher per sample, is the usual choice).
``eps=0`` is allowed and then requires ``sum_i w_i F_i,j > 0`` everywhere.

Merging streams: models and Fishers may be state dicts, ``nn.Module`` s or safetensors files
(read with ``safe_open``, one tensor at a time), so only one tensor of each input and the merged
model are in memory at once, whatever ``N``.

:func:`save_fisher` / :func:`load_fisher` write a :class:`~fimfast.DiagFIM` with the metadata that
makes it reusable: estimator, reduction, counts of rows and batches, the fingerprint of the model
it was estimated on (:func:`model_fingerprint`) and a free-form revision.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fimfast.diagfim import DiagFIM
from fimfast.entries import check_entries, nonnegative_number

__all__ = ["fisher_merge", "load_fisher", "model_fingerprint", "save_fisher"]

Source = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


class _Reader:
    """Tensors by name from a state dict, a module or a safetensors file (lazily)."""

    def __init__(self, src: Any, what: str, stack: contextlib.ExitStack):
        self.what = what
        self.meta: dict[str, Any] = {}
        if isinstance(src, nn.Module):
            self._d: Mapping[str, torch.Tensor] | None = src.state_dict()
            self._file = None
        elif isinstance(src, Mapping):
            self._d, self._file = src, None
            self.meta = dict(getattr(src, "meta", {}) or {})
        elif isinstance(src, (str, os.PathLike)):
            from safetensors import safe_open

            if not os.path.isfile(src):
                raise FileNotFoundError(f"{what}: no such file {os.fspath(src)!r}")
            self._d = None
            self._file = stack.enter_context(safe_open(os.fspath(src), framework="pt"))
            with contextlib.suppress(Exception):
                self.meta = DiagFIM.read_metadata(os.fspath(src))
        else:
            raise TypeError(
                f"{what} must be an nn.Module, a mapping name -> tensor or a safetensors path; "
                f"got {type(src).__name__}"
            )

    def keys(self) -> list[str]:
        return list(self._d.keys()) if self._d is not None else list(self._file.keys())

    def __contains__(self, name: str) -> bool:
        if self._d is not None:
            return name in self._d
        return name in self._keyset()

    def _keyset(self) -> set[str]:
        if not hasattr(self, "_ks"):
            self._ks = set(self._file.keys())
        return self._ks

    def get(self, name: str) -> torch.Tensor:
        if self._d is not None:
            t = self._d[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.what}[{name!r}] is a {type(t).__name__}, not a tensor")
            return t.detach()
        return self._file.get_tensor(name)


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights must have one entry per model ({n}); got {len(w)}")
    if any(not 0 <= x < math.inf for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be >= 0, finite and not all 0; got {w}")
    s = sum(w)
    return [x / s for x in w]


def _check_args(models, fishers, eps) -> None:
    if isinstance(models, (nn.Module, Mapping, str, os.PathLike)) or not len(models):
        raise TypeError("models must be a non-empty sequence of models, state dicts or paths")
    if isinstance(fishers, (Mapping, str, os.PathLike)) or len(fishers) != len(models):
        raise ValueError(
            f"fishers must be a sequence with one Fisher per model ({len(models)}); got "
            f"{len(fishers) if isinstance(fishers, Sequence) else type(fishers).__name__}"
        )
    nonnegative_number(eps, "eps")


def _scales(fs) -> list[float]:
    """``1 / mean`` of each Fisher over all its entries (``normalize=True``)."""
    scales = [1.0] * len(fs)
    for i, f in enumerate(fs):
        total, count = 0.0, 0
        for k in f.keys():
            t = f.get(k)
            total += float(t.double().sum())
            count += t.numel()
        if not total > 0:
            raise ValueError(f"normalize=True: fishers[{i}] is all zero")
        scales[i] = count / total
    return scales


def _check_names(ms, fs, names) -> None:
    """Every model has the tensors of the first; no Fisher names a tensor the models lack."""
    for i, m in enumerate(ms[1:], 1):
        if set(m.keys()) != set(names):
            a = sorted(set(names) - set(m.keys()))[:3]
            b = sorted(set(m.keys()) - set(names))[:3]
            raise ValueError(
                f"models[{i}] has other tensors than models[0]: missing {a}, extra {b}"
            )
    for i, f in enumerate(fs):
        extra = [k for k in f.keys() if k not in set(names)]
        if extra:
            raise ValueError(f"fishers[{i}] names tensors the models lack: {extra[:3]}")


@torch.no_grad()
def fisher_merge(
    models: Sequence[Source],
    fishers: Sequence[DiagFIM | Mapping[str, torch.Tensor] | str | os.PathLike],
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
    out: nn.Module | str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    normalize: bool = False,
) -> dict[str, torch.Tensor] | nn.Module | str:
    """Fisher-weighted average of models, one tensor at a time.

    Args:
        models: ``N >= 1`` models, each a state dict, an ``nn.Module`` (its ``state_dict()``) or
            the path of a safetensors file of its state dict. All must have the same names and
            shapes.
        fishers: one Fisher diagonal per model (a :class:`~fimfast.DiagFIM`, a mapping, or a file
            written by :meth:`DiagFIM.save` / :func:`save_fisher`), keyed by parameter name.
            A tensor with an entry in every Fisher is Fisher-averaged; a floating tensor with an
            entry in none (buffers, frozen parameters) is ``w``-averaged; any other tensor
            (integer buffers such as BatchNorm's counter) is taken from the first model. A tensor
            with Fisher entries for some models only is an error.
        weights: ``w_i >= 0`` (normalised to sum 1; default equal weights).
        eps: added to every Fisher entry (``>= 0``); see the module docstring.
        out: where to put the result: ``None`` returns a new state dict; an ``nn.Module`` receives
            it in place (``load_state_dict``-like copy into its tensors, returned); a path writes a
            safetensors file (returned).
        device: where the arithmetic runs. Sums run in float32 (float64 for float64 tensors);
            results take the first model's dtype.
        normalize: divide each Fisher by the mean of all its entries first (one extra pass over
            the Fishers). A model whose predictions are more confident, or whose Fisher has
            another reduction or data size, has a Fisher larger or smaller overall; normalised,
            each model weighs where its Fisher is large relative to its own average instead.
            ``eps`` then compares with a mean of 1.

    Returns:
        The merged state dict, ``out`` module, or ``out`` path.

    Raises:
        ValueError: the models differ in names or shapes, a Fisher has a negative entry or the
            wrong shape, ``eps == 0`` leaves a coordinate with zero total Fisher weight.
    """
    _check_args(models, fishers, eps)
    w = _check_weights(weights, len(models))
    device = torch.device(device)
    result: dict[str, torch.Tensor] = {}
    target = out.state_dict() if isinstance(out, nn.Module) else None
    with contextlib.ExitStack() as stack:
        ms = [_Reader(m, f"models[{i}]", stack) for i, m in enumerate(models)]
        fs = [_Reader(f, f"fishers[{i}]", stack) for i, f in enumerate(fishers)]
        reductions = {f.meta.get("reduction") for f in fs} - {None}
        if len(reductions) > 1:
            warnings.warn(
                f"fishers have different reductions {sorted(reductions)}: a 'sum' Fisher is "
                "count times a 'mean' one, so it dominates the average; give Fishers on one scale",
                stacklevel=2,
            )
        names = ms[0].keys()
        scales = _scales(fs) if normalize else [1.0] * len(fs)
        _check_names(ms, fs, names)
        for name, merged in _merged(names, ms, fs, w, float(eps), device, scales):
            if target is not None:
                if name not in target:
                    raise ValueError(f"out has no tensor {name!r}")
                target[name].copy_(merged)
            else:
                result[name] = merged.cpu() if out is not None else merged
    if isinstance(out, nn.Module):
        return out
    if out is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in result.items()}, os.fspath(out))
        return out
    return result


def _merged(names, ms: list[_Reader], fs: list[_Reader], w, eps, device, scales):
    """``(name, merged tensor)`` for every name, one at a time. A tied alias (a head sharing the
    embedding's matrix) without a Fisher entry takes the merge of the tensor it shares, not a
    plain average that loading the result would write over it."""
    tied = _aliases(ms[0])
    shared = set(tied.values())
    done: dict[str, torch.Tensor] = {}  # the merges of tensors that have tied aliases
    for name in names:
        first = tied.get(name)
        if first in done and not any(name in f for f in fs):
            yield name, done[first].clone()
            continue
        merged = _merge_one(name, ms, fs, w, eps, device, scales)
        if name in shared:
            done[name] = merged
        yield name, merged


def _aliases(reader: _Reader) -> dict[str, str]:
    """``{name: first name}`` for the tensors of a state dict (or module) that are views of the
    same memory as an earlier one (tied weights: ``state_dict()`` lists them under each name)."""
    if reader._d is None:
        return {}  # a safetensors file holds no shared tensors
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for k, t in reader._d.items():
        if isinstance(t, torch.Tensor) and t.numel() and t.layout == torch.strided:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                   t.stride(), t.dtype, t.device)
            out[k] = seen.setdefault(key, k)
    return {k: v for k, v in out.items() if k != v}


def _merge_one(
    name: str,
    ms: list[_Reader],
    fs: list[_Reader],
    w: list[float],
    eps: float,
    device: torch.device,
    scales: list[float],
) -> torch.Tensor:
    first = ms[0].get(name)
    shape, dtype = first.shape, first.dtype
    has = [name in f for f in fs]
    if any(has) and not all(has):
        raise ValueError(
            f"{name!r} has a Fisher entry in fishers {[i for i, h in enumerate(has) if h]} only; "
            "give it in every Fisher or in none"
        )
    if not first.is_floating_point():
        for i, m in enumerate(ms[1:], 1):
            if not torch.equal(m.get(name), first):
                warnings.warn(
                    f"{name!r} ({dtype}) differs between models[0] and models[{i}]; the first "
                    "model's value is kept",
                    stacklevel=4,
                )
                break
        return first.clone()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    num = torch.zeros(shape, dtype=acc, device=device)
    den = torch.zeros(shape, dtype=acc, device=device) if all(has) else None
    for i, (m, wi) in enumerate(zip(ms, w)):
        theta = first if i == 0 else m.get(name)
        if tuple(theta.shape) != tuple(shape):
            raise ValueError(
                f"models[{i}][{name!r}] has shape {tuple(theta.shape)}; models[0] has "
                f"{tuple(shape)}"
            )
        theta = theta.to(device=device, dtype=acc)
        if den is None:
            num.add_(theta, alpha=wi)
            continue
        f = fs[i].get(name)
        if tuple(f.shape) != tuple(shape):
            raise ValueError(
                f"fishers[{i}][{name!r}] has shape {tuple(f.shape)}; the parameter has "
                f"{tuple(shape)}"
            )
        f = f.to(device=device, dtype=acc)
        check_entries(f, f"fishers[{i}][{name!r}]",
                      negative=f"fishers[{i}][{name!r}] has negative entries")
        fw = (f * scales[i] + eps).mul_(wi)
        num.addcmul_(fw, theta)
        den.add_(fw)
    if den is not None:
        if bool((den == 0).any()):
            raise ValueError(
                f"{name!r}: some coordinates have zero Fisher in every model weighted > 0; "
                "use eps > 0 (those coordinates then take the weighted average)"
            )
        num.div_(den)
    return num.to(dtype)


# -- Fisher files ------------------------------------------------------------------------------ #
def model_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's parameters: names, shapes, dtypes and values, in order.

    Two models have the same fingerprint exactly when their ``named_parameters()`` (or the given
    state dict's tensors) agree bit for bit. Costs one pass over the parameters' bytes.
    """
    if isinstance(model, nn.Module):
        items: Iterator[tuple[str, torch.Tensor]] = iter(model.named_parameters())
    elif isinstance(model, Mapping):
        items = iter(model.items())
    else:
        raise TypeError(f"model must be an nn.Module or a state dict; got {type(model).__name__}")
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_fisher(
    fisher: DiagFIM,
    path: str | os.PathLike,
    model: nn.Module | None = None,
    revision: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write a Fisher diagonal to a safetensors file with the metadata needed to reuse it.

    The header keeps the Fisher's own metadata (estimator options, ...) and adds:
    ``estimator`` (its ``fim_type``), ``reduction``, ``count`` (rows: samples or tokens),
    ``batches`` (steps), ``model_sha256`` (:func:`model_fingerprint` of ``model``, when given),
    ``model_revision`` (``revision``), ``fimfast_version``, ``created`` (UTC, ISO 8601) and any
    ``extra`` key (JSON-serialisable values, e.g. ``dataset="mnist train[:2048]"``).

    Returns:
        The metadata written.
    """
    import fimfast

    if not isinstance(fisher, DiagFIM):
        raise TypeError(f"fisher must be a DiagFIM; got {type(fisher).__name__}")
    meta = dict(fisher.meta)
    meta.setdefault("estimator", meta.get("fim_type"))
    meta.setdefault("reduction", None)
    meta.setdefault("count", None)
    meta.setdefault("batches", meta.get("steps"))
    if model is not None:
        meta["model_sha256"] = model_fingerprint(model)
    if revision is not None:
        meta["model_revision"] = str(revision)
    meta["fimfast_version"] = fimfast.__version__
    meta["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta.update(extra)
    DiagFIM(dict(fisher), meta).save(os.fspath(path))
    return meta


def load_fisher(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    check: bool = True,
) -> DiagFIM:
    """Read a Fisher file (:func:`save_fisher` or :meth:`DiagFIM.save`).

    Args:
        path: the file.
        model: when given (and ``check``), the Fisher's names and shapes must match the model's
            parameters, and a recorded ``model_sha256`` must equal the model's fingerprint.
        device: where the tensors are loaded.
        check: verify against ``model``.

    Raises:
        ValueError: with ``check``, the Fisher does not belong to ``model``.
    """
    F = DiagFIM.load(os.fspath(path), device=device)
    if model is not None and check:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for n, t in F.items():
            if n not in shapes or shapes[n] != tuple(t.shape):
                raise ValueError(
                    f"{os.fspath(path)}: entry {n!r} {tuple(t.shape)} is not a parameter of the "
                    f"model ({shapes.get(n, 'missing')})"
                )
        want = F.meta.get("model_sha256")
        if want is not None and want != model_fingerprint(model):
            raise ValueError(
                f"{os.fspath(path)} was estimated on a model with fingerprint {want[:12]}...; "
                "this model's parameters differ (pass check=False to use it anyway)"
            )
    return F
