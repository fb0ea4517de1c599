"""DiagFIM: a diagonal Fisher keyed by parameter name, with the operations of a diagonal matrix.

Follows NNGeometry's ``PMatDiag`` (``get_diag``, ``mv``, ``vTMv``, ``solve``, ``inverse``,
``trace``, ``frobenius_norm``, ``mm``, ``+``, ``-``, scalar ``*``) and is keyed by parameter name
like curvlinops' results. Vectors are accepted either as a flat tensor (parameters concatenated in
this DiagFIM's order) or as a mapping ``{name: tensor}``; results come back in the same form.
:meth:`DiagFIM.to_nngeometry` and :meth:`DiagFIM.from_nngeometry` convert to and from NNGeometry
(``pip install nngeometry``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fimfast.entries import finite_scalar, nonnegative_number, same_scale

Vector = torch.Tensor | Mapping[str, torch.Tensor]

# safetensors metadata key holding the parameter order (the format itself sorts tensor names)
_ORDER_KEY = "fimfast_names"
_META_KEY = "fimfast"
_FORMAT_KEY = "fimfast_format"
# version of the file layout written by DiagFIM.save (1: order, meta and this key in the header)
FORMAT_VERSION = 1


class DiagFIM(Mapping[str, torch.Tensor]):
    """Diagonal of a Fisher information matrix, one tensor per parameter (shaped like it).

    Args:
        diag: ``{param_name: tensor}`` in parameter order.
        meta: free-form metadata (type, reduction, count, ...), kept by :meth:`save`.

    Example:
        >>> F = est.result()
        >>> step = F.solve(grads, damping=1e-3)   # (F + 1e-3 I)^-1 g, same form as grads
        >>> F.trace(), F.frobenius_norm(), F.per_layer(by="module")
    """

    def __init__(self, diag: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None):
        if not isinstance(diag, Mapping):
            raise TypeError(f"diag must be a mapping name -> tensor; got {type(diag).__name__}")
        d = {}
        for k, v in diag.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"diag[{k!r}] must be a torch.Tensor; got {type(v).__name__}")
            d[str(k)] = v
        self._d = d
        self.meta = dict(meta or {})

    # -- mapping ------------------------------------------------------------------------------ #
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._d[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        n = self.numel()
        tr = self.trace() if self._d else 0.0
        return f"DiagFIM({len(self)} tensors, {n} entries, trace={tr:.4g}, meta={self.meta})"

    def numel(self) -> int:
        """Total number of diagonal entries."""
        return sum(v.numel() for v in self._d.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}``."""
        return {k: tuple(v.shape) for k, v in self._d.items()}

    # -- vectors ------------------------------------------------------------------------------ #
    def to_vector(self) -> torch.Tensor:
        """The diagonal as one flat tensor (parameters concatenated in order)."""
        if not self._d:
            return torch.zeros(0)
        return torch.cat([v.reshape(-1) for v in self._d.values()])

    get_diag = to_vector

    def to_dense(self) -> torch.Tensor:
        """The ``(P, P)`` dense diagonal matrix (for small models and tests)."""
        return torch.diag(self.to_vector())

    to_torch = to_dense  # NNGeometry's name

    def from_vector(self, vec: torch.Tensor, meta: Mapping[str, Any] | None = None) -> DiagFIM:
        """A DiagFIM with this one's names and shapes and the entries of a flat ``vec``."""
        return DiagFIM(self._split(vec, "vec"), self.meta if meta is None else meta)

    def _split(self, vec: torch.Tensor, name: str = "v") -> dict[str, torch.Tensor]:
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() != self.numel():
            got = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{name} must be a flat tensor of {self.numel()} entries; got {got}")
        out, i = {}, 0
        for k, v in self._d.items():
            out[k] = vec[i : i + v.numel()].reshape(v.shape)
            i += v.numel()
        return out

    def _as_dict(self, v: Vector, name: str = "v") -> tuple[dict[str, torch.Tensor], bool]:
        if isinstance(v, torch.Tensor):
            return self._split(v, name), True
        if isinstance(v, Mapping):
            missing = [k for k in self._d if k not in v]
            if missing:
                raise ValueError(f"{name} is missing parameters {missing[:5]}")
            for k, d in self._d.items():
                if not isinstance(v[k], torch.Tensor) or tuple(v[k].shape) != tuple(d.shape):
                    got = tuple(v[k].shape) if isinstance(v[k], torch.Tensor) else type(v[k])
                    raise ValueError(f"{name}[{k!r}] must have shape {tuple(d.shape)}; got {got}")
            return {k: v[k] for k in self._d}, False
        raise TypeError(
            f"{name} must be a flat tensor or a mapping name -> tensor; got {type(v).__name__}"
        )

    def _out(self, d: dict[str, torch.Tensor], flat: bool) -> Vector:
        if flat:
            return torch.cat([x.reshape(-1) for x in d.values()])
        return d

    # -- linear algebra ----------------------------------------------------------------------- #
    def mv(self, v: Vector) -> Vector:
        """``F v`` (elementwise product), in the form of ``v``."""
        d, flat = self._as_dict(v)
        return self._out({k: self._d[k] * d[k] for k in self._d}, flat)

    def vTMv(self, v: Vector) -> torch.Tensor:
        """``v^T F v``, a scalar tensor (in the promoted dtype of ``F`` and ``v``)."""
        d, _ = self._as_dict(v)
        terms = [(self._d[k] * d[k] * d[k]).sum() for k in self._d]
        if not terms:
            return torch.zeros(())
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()

    def _check_damping(self, damping: float) -> float:
        if isinstance(damping, torch.Tensor) and damping.numel() == 1:
            damping = float(damping)
        damping = nonnegative_number(damping, "damping")
        if damping == 0:
            self._check_invertible()
        for k, v in self._d.items():
            if bool((v + damping == 0).any()):
                raise ValueError(
                    f"damping={damping!r} leaves F + damping*I singular: {k!r} has entries equal "
                    f"to {-damping!r}; use damping > 0"
                )
        return damping

    def _check_invertible(self) -> None:
        """With ``damping=0``: refuse entries zero up to rounding, at most ``P * eps * max|F|``
        in absolute value (``P`` entries; the tolerance of ``torch.linalg.matrix_rank``, as the
        structured representations' ``check_invertible``): their reciprocals would be noise of
        any size and sign (a structural zero computed as ``1e-44``)."""
        vals = [v.detach() for v in self._d.values() if v.numel()]
        if not vals:
            return
        if not all(bool(torch.isfinite(v).all()) for v in vals):
            raise ValueError("damping=0 on a diagonal with non-finite entries; use damping > 0")
        top = max(float(v.abs().max()) for v in vals)
        n = sum(v.numel() for v in vals)
        for k, v in self._d.items():
            if not v.numel():
                continue
            tol = n * torch.finfo(v.dtype).eps * top if v.is_floating_point() else 0.0
            low = float(v.detach().abs().min())
            if not low > tol:
                raise ValueError(
                    f"damping=0 leaves F singular: {k!r} has an entry {low:.3g} against the "
                    f"largest {top:.3g} (zero up to rounding below {tol:.3g}); use damping > 0"
                )

    def solve(self, v: Vector, damping: float = 1e-3) -> Vector:
        """``(F + damping I)^{-1} v``, in the form of ``v``."""
        damping = self._check_damping(damping)
        d, flat = self._as_dict(v)
        return self._out({k: d[k] / (self._d[k] + damping) for k in self._d}, flat)

    def inverse(self, damping: float = 1e-3) -> DiagFIM:
        """``(F + damping I)^{-1}`` as a DiagFIM."""
        damping = self._check_damping(damping)
        return DiagFIM({k: 1.0 / (v + damping) for k, v in self._d.items()}, self.meta)

    def mm(self, other: DiagFIM) -> DiagFIM:
        """Matrix product with another diagonal (elementwise product of the diagonals)."""
        return self._binary(other, torch.mul, "other")

    def trace(self) -> float:
        """Sum of the diagonal (accumulated in float64)."""
        return float(sum(v.double().sum() for v in self._d.values()))

    def frobenius_norm(self) -> float:
        """Frobenius norm of the diagonal matrix (accumulated in float64)."""
        return math.sqrt(float(sum((v.double() ** 2).sum() for v in self._d.values())))

    norm = frobenius_norm

    def per_layer(self, by: str = "param") -> dict[str, dict[str, float]]:
        """Summary statistics per parameter (``by="param"``) or per module (``by="module"``:
        parameters grouped by the name before their last dot, ``"0.weight"`` -> ``"0"``).

        Returns:
            ``{name: {"numel", "trace", "mean", "min", "max", "median"}}``.
        """
        if by not in ("param", "module"):
            raise ValueError(f"by must be 'param' or 'module'; got {by!r}")
        groups: dict[str, list[torch.Tensor]] = {}
        for k, v in self._d.items():
            key = k if by == "param" else (k.rsplit(".", 1)[0] if "." in k else "")
            groups.setdefault(key, []).append(v.detach().double().reshape(-1))
        out = {}
        for k, parts in groups.items():
            x = torch.cat(parts)
            out[k] = {
                "numel": x.numel(),
                "trace": float(x.sum()),
                "mean": float(x.mean()),
                "min": float(x.min()),
                "max": float(x.max()),
                "median": float(x.median()),
            }
        return out

    def allclose(self, other: Mapping[str, torch.Tensor], rtol=1e-5, atol=1e-8) -> bool:
        """Same names and shapes, and ``torch.allclose`` entries."""
        if set(other) != set(self._d):
            return False
        return all(
            v.shape == other[k].shape and torch.allclose(v, other[k].to(v), rtol, atol)
            for k, v in self._d.items()
        )

    # -- arithmetic --------------------------------------------------------------------------- #
    def _binary(self, other: DiagFIM, op: Callable, name: str = "other") -> DiagFIM:
        if not isinstance(other, DiagFIM):
            return NotImplemented
        if set(other) != set(self._d):
            only_a = sorted(set(self._d) - set(other))[:3]
            only_b = sorted(set(other) - set(self._d))[:3]
            raise ValueError(
                f"{name}: both DiagFIMs must have the same parameter names; only in the left: "
                f"{only_a}, only in the right: {only_b}"
            )
        for k, v in self._d.items():
            if other[k].shape != v.shape:
                raise ValueError(
                    f"{name}[{k!r}] has shape {tuple(other[k].shape)}; expected {tuple(v.shape)}"
                )
        same_scale(self.meta, other.meta, name)  # the result keeps this DiagFIM's meta
        return DiagFIM({k: op(v, other[k]) for k, v in self._d.items()}, self.meta)

    def __add__(self, other: DiagFIM) -> DiagFIM:
        return self._binary(other, torch.add)

    def __radd__(self, other: Any) -> DiagFIM:
        if isinstance(other, (int, float)) and other == 0:  # sum([F1, F2, ...]) starts at 0
            return self
        return NotImplemented

    def __sub__(self, other: DiagFIM) -> DiagFIM:
        return self._binary(other, torch.sub)

    def __neg__(self) -> DiagFIM:
        return self * -1.0

    @staticmethod
    def _scalar(x: Any) -> float | None:
        if isinstance(x, torch.Tensor) and x.numel() == 1 or (
                isinstance(x, (int, float)) and not isinstance(x, bool)):
            return finite_scalar(float(x))
        return None

    def __mul__(self, scalar: float) -> DiagFIM:
        s = self._scalar(scalar)
        if s is None:
            return NotImplemented
        return DiagFIM({k: v * s for k, v in self._d.items()}, self.meta)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> DiagFIM:
        s = self._scalar(scalar)
        if s is None:
            return NotImplemented
        if s == 0:
            raise ZeroDivisionError("DiagFIM divided by zero")
        return DiagFIM({k: v / s for k, v in self._d.items()}, self.meta)

    def to(self, *args, **kwargs) -> DiagFIM:
        """``Tensor.to`` on every entry."""
        return DiagFIM({k: v.to(*args, **kwargs) for k, v in self._d.items()}, self.meta)

    def clone(self) -> DiagFIM:
        """A deep copy of the entries (and of the metadata dict)."""
        return DiagFIM({k: v.detach().clone() for k, v in self._d.items()}, dict(self.meta))

    # -- files -------------------------------------------------------------------------------- #
    def save(self, path: str) -> None:
        """Write a safetensors file (parameter order and metadata as JSON in the header)."""
        from safetensors.torch import save_file

        # clone: entries may be views of one flat vector (from_vector), which safetensors refuses
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self._d.items()}
        header = {
            _META_KEY: json.dumps(self.meta, default=str),
            _ORDER_KEY: json.dumps(list(self._d)),
            _FORMAT_KEY: str(FORMAT_VERSION),
        }
        save_file(tensors, str(path), metadata=header)

    @staticmethod
    def read_metadata(path: str) -> dict[str, Any]:
        """The metadata of a file written by :meth:`save`, read from its header alone (no tensor
        is loaded): the ``meta`` dict, plus ``"format"`` (the file format version, ``0`` for
        files written before it was recorded)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get(_META_KEY, "{}"))
        meta.setdefault("format", int(header.get(_FORMAT_KEY, 0)))
        return meta

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> DiagFIM:
        """Read a file written by :meth:`save` (entries in their saved order)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            if "fimfast_structured" in header:  # StructuredFIM.save: its tensors are no diagonal
                raise ValueError(f"{path}: a structured Fisher file (representation "
                                 f"{header['fimfast_structured']!r}), not a diagonal; read it "
                                 "with fimfast.structured.load")
            meta = json.loads(header.get(_META_KEY, "{}"))
            d = {k: f.get_tensor(k) for k in f.keys()}
        order = json.loads(header[_ORDER_KEY]) if _ORDER_KEY in header else meta.get("names")
        if order and set(order) == set(d):
            d = {k: d[k] for k in order}
        return cls(d, meta)

    # -- NNGeometry --------------------------------------------------------------------------- #
    def to_nngeometry(self, target: Any):
        """This diagonal as an NNGeometry ``PMatDiag``.

        Args:
            target: an NNGeometry ``LayerCollection``, or a model (its
                ``LayerCollection.from_model``). The entries are laid out in the collection's
                order (per layer: weight, then bias); parameters outside the collection are left
                out.

        Returns:
            ``nngeometry.object.PMatDiag`` on the device of this DiagFIM's entries.

        Raises:
            ImportError: NNGeometry is not installed.
            ValueError: a parameter of the collection is missing here or has another shape.
        """
        from nngeometry.backend import DummyGenerator
        from nngeometry.layercollection import LayerCollection
        from nngeometry.object import PMatDiag

        if isinstance(target, torch.nn.Module):
            lc = LayerCollection.from_model(target)
        elif isinstance(target, LayerCollection):
            lc = target
        else:
            raise TypeError(
                "target must be an nngeometry LayerCollection or a torch.nn.Module; got "
                f"{type(target).__name__}"
            )
        parts = []
        for name, size in _nngeometry_entries(lc):
            if name not in self._d:
                raise ValueError(
                    f"the layer collection has parameter {name!r}, which this DiagFIM lacks "
                    f"(it has {list(self._d)[:6]})"
                )
            if tuple(self._d[name].shape) != size:
                raise ValueError(
                    f"{name!r} has shape {tuple(self._d[name].shape)} here and {size} in the "
                    "layer collection"
                )
            parts.append(self._d[name].reshape(-1))
        data = torch.cat(parts) if parts else torch.zeros(0)
        return PMatDiag(generator=DummyGenerator(lc, data.device), data=data)

    @classmethod
    def from_nngeometry(
        cls, pmat: Any, model: torch.nn.Module | None = None, meta: Mapping[str, Any] | None = None
    ) -> DiagFIM:
        """A DiagFIM from any NNGeometry ``PMat*`` (its ``get_diag()``; exact for ``PMatDiag``).

        Args:
            pmat: an NNGeometry matrix with a ``generator.layer_collection``.
            model: when given, entries follow ``model.named_parameters()`` order (parameters
                outside the collection are left out); otherwise the collection's order.
            meta: metadata of the result.
        """
        lc = getattr(getattr(pmat, "generator", None), "layer_collection", None)
        if lc is None or not hasattr(pmat, "get_diag"):
            raise TypeError(
                "pmat must be an NNGeometry PMat (with get_diag() and generator.layer_collection); "
                f"got {type(pmat).__name__}"
            )
        diag = pmat.get_diag()
        entries = _nngeometry_entries(lc)
        total = sum(math.prod(s) for _, s in entries)
        if diag.dim() != 1 or diag.numel() != total:
            raise ValueError(
                f"pmat.get_diag() has shape {tuple(diag.shape)}; its layer collection has {total} "
                "parameters"
            )
        d, i = {}, 0
        for name, size in entries:
            k = math.prod(size)
            d[name] = diag[i : i + k].reshape(size)
            i += k
        if model is not None:
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            for n, t in d.items():
                if n not in shapes:
                    raise ValueError(f"model has no parameter {n!r} (from the layer collection)")
                if shapes[n] != tuple(t.shape):
                    raise ValueError(
                        f"{n!r}: shape {tuple(t.shape)} in pmat, {shapes[n]} in the model"
                    )
            d = {n: d[n] for n in shapes if n in d}
        return cls(d, meta or {"source": "nngeometry"})


def _nngeometry_entries(lc: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(parameter name, shape)`` of a LayerCollection, in its flat order."""
    out = []
    for lid, layer in lc.layers.items():
        prefix = f"{lid}." if lid else ""
        out.append((prefix + "weight", tuple(layer.weight.size)))
        if getattr(layer, "bias", None) is not None:
            out.append((prefix + "bias", tuple(layer.bias.size)))
    return out
