"""The common part of every structured Fisher: parameter layout, vectors, files.

Vectors ``v`` are accepted either as a flat tensor (the trainable parameters of
``model.named_parameters()`` concatenated in that order, each flattened row-major) or as a mapping
``{name: tensor shaped like the parameter}``; results come back in the form of ``v``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from fimfast.diagfim import DiagFIM

Vector = torch.Tensor | Mapping[str, torch.Tensor]

# largest P for which a dense (P, P) matrix is formed (dense representation, generic inverse)
DENSE_LIMIT = 20000

_KINDS: dict[str, type[StructuredFIM]] = {}


def register(kind: str):
    """Class decorator: the representation name under which :meth:`StructuredFIM.load` finds it."""

    def deco(cls):
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return deco


def check_damping(damping: Any) -> float:
    """``damping`` as a float ``>= 0`` (``ValueError`` naming the argument otherwise)."""
    if isinstance(damping, torch.Tensor) and damping.numel() == 1:
        damping = float(damping)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
            0 <= damping < math.inf):
        raise ValueError(f"damping must be a number >= 0 and finite; got {damping!r}")
    return float(damping)


def check_draws(n: Any) -> None:
    """``n`` draws of a ``sample``: an integer ``>= 1`` (``ValueError`` naming ``n``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")


def check_invertible(values: list[torch.Tensor], damping: float) -> None:
    """With ``damping == 0``, refuse a matrix that is singular to working precision.

    ``values`` are the eigenvalues (or the pivots of an exact factorisation) of its blocks, one
    tensor per block that is decomposed on its own (a dense matrix, a module's block, a
    layer's Kronecker eigenvalues ``lam_G lam_A^T``). A value at most ``n * eps * max |value|``
    of its tensor in absolute value (``n`` its largest dimension, ``eps`` of its dtype: the
    tolerance of ``torch.linalg.matrix_rank``, the size of the rounding of the decomposition)
    is zero up to rounding: ``1 / value`` would be noise of any size and sign, so no solve or
    inverse is returned (``ValueError`` naming ``damping``). ``damping > 0``: only
    :func:`check_damping`."""
    if damping > 0:
        return
    for v in values:
        if v.numel() == 0:
            continue
        n = max(v.shape)
        v = v.detach().reshape(-1)
        top = float(v.abs().max())
        tol = top * n * torch.finfo(v.dtype).eps
        low = float(v[v.abs().argmin()]) if bool(torch.isfinite(v).all()) else float("nan")
        if not abs(low) > tol:  # a quasi-diagonal may be indefinite: only |value| counts
            raise ValueError(
                f"damping=0 leaves F singular: a block has the eigenvalue {low:.3g} against its "
                f"largest {top:.3g} (zero up to rounding below {tol:.3g}), so (F + damping I)^-1 "
                "does not exist to working precision; use damping > 0"
            )


def check_arrowheads(dg: list, cross: list, damping: float) -> None:
    """:func:`check_invertible` for the quasi-diagonal's arrowheads (``dg`` the diagonals, ``cross``
    the weight-bias entries or ``None``) through their pivots: the weight diagonal, then the
    Schur complement of the bias (which divides by the former, so those are checked first)."""
    if damping != 0:
        return
    check_invertible([d if c is None else d[:, :-1] for d, c in zip(dg, cross)], damping)
    check_invertible([d if c is None else torch.cat(
        [d[:, :-1], (d[:, -1] - (c * c / d[:, :-1]).sum(1)).unsqueeze(1)], 1)
        for d, c in zip(dg, cross)], damping)


def check_dense_size(P: int, what: str) -> None:
    """Refuse a ``(P, P)`` matrix above :data:`DENSE_LIMIT`."""
    if P > DENSE_LIMIT:
        gib = P * P * 4 / 2**30
        raise ValueError(
            f"{what} needs a dense ({P} x {P}) matrix ({gib:.1f} GiB in float32); the limit is "
            f"P <= {DENSE_LIMIT} parameters. Use representation='kfac', 'ekfac', 'block_diag', "
            "'low_rank' or 'diag', or freeze parameters (requires_grad=False)"
        )


class StructuredFIM:
    """Base class of the structured Fisher matrices (see docs/structured.md).

    Attributes:
        names: trainable parameter names, in ``model.named_parameters()`` order.
        shapes: their shapes.
        meta: metadata (type, reduction, count, options), kept by :meth:`save`.
    """

    kind = "abstract"

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], meta: Mapping | None):
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.meta = dict(meta or {})
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

    # -- layout ------------------------------------------------------------------------------- #
    def numel(self) -> int:
        """``P``, the number of parameters the matrix acts on."""
        return self.offsets[-1]

    def slice_of(self, name: str) -> slice:
        """Position of parameter ``name`` in the flat layout."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def __repr__(self) -> str:
        n = len(self.names)
        return f"{type(self).__name__}(P={self.numel()}, {n} tensors, meta={self.meta})"

    # -- vectors ------------------------------------------------------------------------------ #
    def flat(self, v: Vector, name: str = "v") -> tuple[torch.Tensor, bool]:
        """``(flat vector, came_flat)`` from a flat tensor or a ``{name: tensor}`` mapping
        (real: a complex vector is refused, naming ``name``, where its imaginary part would be
        dropped by the cast to the matrix's dtype)."""
        x, came_flat = self._flat(v, name)
        if x.is_complex():
            raise ValueError(f"{name} must be real; got dtype {x.dtype} (apply the matrix to its "
                             "real and imaginary parts)")
        return x, came_flat

    @property
    def device(self) -> torch.device:
        """The device of the matrix's tensors (a vector must be on it)."""
        for key in ("data", "factor", "_A", "D", "dg"):
            t = getattr(self, key, None)
            t = t[0] if isinstance(t, list) and t else t
            if hasattr(t, "device"):
                return t.device
        return torch.device("cpu")

    def _check_part(self, t: torch.Tensor, label: str) -> None:
        """A vector (or a part of a mapping) is a dense tensor on the matrix's device (before, a
        vector on another device was refused by torch without its name, by ``block_diag``'s
        ``solve`` as a singular matrix, or, on the ``meta`` device, taken by ``kfac`` and
        ``ekfac`` as if it held values; a sparse one raised torch's missing-kernel error)."""
        if t.layout != torch.strided:
            raise ValueError(f"{label} must be a dense tensor; got layout {t.layout} (use "
                             ".to_dense())")
        if t.device != self.device:
            raise ValueError(f"{label} is on device {t.device}; the matrix is on {self.device} "
                             f"(move it with {label}.to({str(self.device)!r}))")

    def _flat(self, v: Vector, name: str) -> tuple[torch.Tensor, bool]:
        P = self.numel()
        if isinstance(v, torch.Tensor):
            if v.dim() != 1 or v.numel() != P:
                raise ValueError(f"{name} must be a flat tensor of {P} entries; got shape "
                                 f"{tuple(v.shape)}")
            self._check_part(v, name)
            return v, True
        if isinstance(v, Mapping):
            missing = [k for k in self.names if k not in v]
            if missing:
                raise ValueError(f"{name} is missing parameters {missing[:5]}")
            parts = []
            for k, s in zip(self.names, self.shapes):
                t = v[k]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != s:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{name}[{k!r}] must have shape {s}; got {got}")
                self._check_part(t, f"{name}[{k!r}]")
                parts.append(t.reshape(-1))
            return torch.cat(parts), False
        raise TypeError(
            f"{name} must be a flat tensor or a mapping name -> tensor; got {type(v).__name__}"
        )

    def unflat(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``(P,)`` vector -> ``{name: tensor}``."""
        return {k: x[a:b].reshape(s) for k, s, a, b in
                zip(self.names, self.shapes, self.offsets, self.offsets[1:])}

    def _out(self, x: torch.Tensor, flat: bool) -> Vector:
        return x if flat else self.unflat(x)

    # -- operations (subclasses implement the _flat versions) -------------------------------- #
    def mv(self, v: Vector) -> Vector:
        """``F v``, in the form of ``v``."""
        x, flat = self.flat(v)
        return self._out(self._mv(x), flat)

    def vTMv(self, v: Vector) -> torch.Tensor:
        """``v^T F v`` (a scalar tensor)."""
        x, _ = self.flat(v)
        return torch.dot(x.to(self.dtype), self._mv(x))

    def solve(self, v: Vector, damping: float = 1e-3) -> Vector:
        """``(F + damping I)^{-1} v``, in the form of ``v``."""
        d = check_damping(damping)
        x, flat = self.flat(v)
        return self._out(self._solve(x, d), flat)

    def inverse(self, damping: float = 1e-3) -> StructuredFIM:
        """``(F + damping I)^{-1}`` (dense fallback; representations override it exactly)."""
        from fimfast.structured.dense import DenseFIM

        d = check_damping(damping)
        check_dense_size(self.numel(), f"{type(self).__name__}.inverse")
        M = self.to_dense().double()
        if d == 0:
            check_invertible([torch.linalg.eigvalsh((M + M.T) / 2).to(self.dtype)], d)
        M.diagonal().add_(d)
        inv = torch.linalg.inv(M).to(self.dtype)
        return DenseFIM(self.names, self.shapes, inv, {**self.meta, "inverse_damping": d})

    def diag(self) -> DiagFIM:
        """The diagonal as a :class:`~fimfast.DiagFIM` keyed by parameter name."""
        return DiagFIM(self.unflat(self._diag()), dict(self.meta))

    def _dense_check(self) -> None:
        check_dense_size(self.numel(), f"{type(self).__name__}.to_dense")

    def to_torch(self) -> torch.Tensor:
        """NNGeometry's name of :meth:`to_dense`."""
        return self.to_dense()

    # -- NNGeometry --------------------------------------------------------------------------- #
    def to_nngeometry(self, target: Any):
        """The matching NNGeometry ``PMat*`` (``target``: a model or a ``LayerCollection``)."""
        from fimfast.structured.nngeometry import to_nngeometry

        return to_nngeometry(self, target)

    @staticmethod
    def from_nngeometry(pmat: Any, model: torch.nn.Module, meta: Mapping | None = None):
        """A structured Fisher from an NNGeometry ``PMat*`` on ``model``'s trainable
        parameters."""
        from fimfast.structured.nngeometry import from_nngeometry

        return from_nngeometry(pmat, model, meta)

    # -- files -------------------------------------------------------------------------------- #
    def save(self, path: str) -> None:
        """Write a safetensors file (the representation's tensors, layout and metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self._tensors().items()}
        header = {
            "fimfast_structured": self.kind,
            "names": json.dumps(self.names),
            "shapes": json.dumps(self.shapes),
            "meta": json.dumps(self.meta, default=str),
            "extra": json.dumps(self._extra()),
        }
        save_file(tensors, str(path), metadata=header)

    @staticmethod
    def load(path: str, device: str | torch.device = "cpu") -> StructuredFIM:
        """Read any structured Fisher written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        kind = header.get("fimfast_structured")
        if kind not in _KINDS:
            raise ValueError(f"{path}: not a structured Fisher file (kind {kind!r}; known: "
                             f"{sorted(_KINDS)})")
        names = json.loads(header["names"])
        shapes = [tuple(s) for s in json.loads(header["shapes"])]
        return _KINDS[kind]._from_tensors(
            names, shapes, tensors, json.loads(header["extra"]), json.loads(header["meta"])
        )

    def _extra(self) -> Any:
        return None
