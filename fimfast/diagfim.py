"""DiagFIM: a diagonal Fisher keyed by parameter name, with the operations of a diagonal matrix.

Follows NNGeometry's ``PMatDiag`` (``get_diag``, ``mv``, ``vTMv``, ``solve``, ``trace``,
``frobenius_norm``, ``+``, scalar ``*``) and is keyed by parameter name like curvlinops' results.
Vectors are accepted either as a flat tensor (parameters concatenated in order) or as a mapping
``{name: tensor}``; results come back in the same form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch

Vector = torch.Tensor | Mapping[str, torch.Tensor]


class DiagFIM(Mapping[str, torch.Tensor]):
    """Diagonal of a Fisher information matrix, one tensor per parameter (shaped like it).

    Args:
        diag: ``{param_name: tensor}`` in parameter order.
        meta: free-form metadata (type, reduction, count, ...), kept by :meth:`save`.
    """

    def __init__(self, diag: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None):
        self._d = {str(k): v for k, v in diag.items()}
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
        return (
            f"DiagFIM({len(self)} tensors, {n} entries, trace={self.trace():.4g}, meta={self.meta})"
        )

    def numel(self) -> int:
        """Total number of diagonal entries."""
        return sum(v.numel() for v in self._d.values())

    # -- vectors ------------------------------------------------------------------------------ #
    def to_vector(self) -> torch.Tensor:
        """The diagonal as one flat tensor (parameters concatenated in order)."""
        return torch.cat([v.reshape(-1) for v in self._d.values()])

    get_diag = to_vector

    def from_vector(self, vec: torch.Tensor, meta: Mapping[str, Any] | None = None) -> DiagFIM:
        """A DiagFIM with this one's names and shapes and the entries of a flat ``vec``."""
        return DiagFIM(self._split(vec), self.meta if meta is None else meta)

    def _split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        if vec.dim() != 1 or vec.numel() != self.numel():
            raise ValueError(
                f"v must be a flat tensor of {self.numel()} entries; got {tuple(vec.shape)}"
            )
        out, i = {}, 0
        for k, v in self._d.items():
            out[k] = vec[i : i + v.numel()].view(v.shape)
            i += v.numel()
        return out

    def _as_dict(self, v: Vector, name: str = "v") -> tuple[dict[str, torch.Tensor], bool]:
        if isinstance(v, torch.Tensor):
            return self._split(v), True
        if isinstance(v, Mapping):
            missing = [k for k in self._d if k not in v]
            if missing:
                raise ValueError(f"{name} is missing parameters {missing[:5]}")
            for k, d in self._d.items():
                if tuple(v[k].shape) != tuple(d.shape):
                    raise ValueError(
                        f"{name}[{k!r}] must have shape {tuple(d.shape)}; got {tuple(v[k].shape)}"
                    )
            return {k: v[k] for k in self._d}, False
        raise TypeError(
            f"{name} must be a flat tensor or a mapping name -> tensor; got {type(v).__name__}"
        )

    def _out(self, d: dict[str, torch.Tensor], flat: bool) -> Vector:
        return torch.cat([x.reshape(-1) for x in d.values()]) if flat else d

    # -- linear algebra ----------------------------------------------------------------------- #
    def mv(self, v: Vector) -> Vector:
        """``F v`` (elementwise product)."""
        d, flat = self._as_dict(v)
        return self._out({k: self._d[k] * d[k] for k in self._d}, flat)

    def vTMv(self, v: Vector) -> torch.Tensor:
        """``v^T F v``, a scalar tensor."""
        d, _ = self._as_dict(v)
        return sum((self._d[k] * d[k].to(self._d[k].dtype) ** 2).sum() for k in self._d)

    def _check_damping(self, damping: float) -> float:
        if not isinstance(damping, (int, float)) or damping < 0:
            raise ValueError(f"damping must be a number >= 0; got {damping!r}")
        if damping == 0 and any(bool((v <= 0).any()) for v in self._d.values()):
            raise ValueError("damping must be > 0: the diagonal has zero entries (singular)")
        return float(damping)

    def solve(self, v: Vector, damping: float = 1e-3) -> Vector:
        """``(F + damping I)^{-1} v``."""
        damping = self._check_damping(damping)
        d, flat = self._as_dict(v)
        return self._out({k: d[k] / (self._d[k] + damping) for k in self._d}, flat)

    def inverse(self, damping: float = 1e-3) -> DiagFIM:
        """``(F + damping I)^{-1}`` as a DiagFIM."""
        damping = self._check_damping(damping)
        return DiagFIM({k: 1.0 / (v + damping) for k, v in self._d.items()}, self.meta)

    def trace(self) -> float:
        """Sum of the diagonal."""
        return float(sum(v.double().sum() for v in self._d.values()))

    def frobenius_norm(self) -> float:
        """Frobenius norm of the diagonal matrix."""
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self._d.values())))

    norm = frobenius_norm

    def per_layer(self) -> dict[str, dict[str, float]]:
        """Summary per parameter: numel, trace, mean, min, max, median of the entries."""
        out = {}
        for k, v in self._d.items():
            x = v.detach().double().reshape(-1)
            out[k] = {
                "numel": x.numel(),
                "trace": float(x.sum()),
                "mean": float(x.mean()),
                "min": float(x.min()),
                "max": float(x.max()),
                "median": float(x.median()),
            }
        return out

    # -- arithmetic --------------------------------------------------------------------------- #
    def _binary(self, other: DiagFIM, op) -> DiagFIM:
        if not isinstance(other, DiagFIM):
            return NotImplemented
        if list(other) != list(self) or any(other[k].shape != v.shape for k, v in self._d.items()):
            raise ValueError("other: both DiagFIMs must have the same parameter names and shapes")
        return DiagFIM({k: op(v, other[k]) for k, v in self._d.items()}, self.meta)

    def __add__(self, other: DiagFIM) -> DiagFIM:
        return self._binary(other, torch.add)

    def __sub__(self, other: DiagFIM) -> DiagFIM:
        return self._binary(other, torch.sub)

    def __mul__(self, scalar: float) -> DiagFIM:
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = float(scalar)
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return DiagFIM({k: v * scalar for k, v in self._d.items()}, self.meta)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> DiagFIM:
        return self * (1.0 / scalar)

    def to(self, *args, **kwargs) -> DiagFIM:
        """``Tensor.to`` on every entry."""
        return DiagFIM({k: v.to(*args, **kwargs) for k, v in self._d.items()}, self.meta)

    # -- files -------------------------------------------------------------------------------- #
    def save(self, path: str) -> None:
        """Write a safetensors file (metadata as JSON in the header)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self._d.items()}
        save_file(tensors, str(path), metadata={"fimfast": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> DiagFIM:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {}).get("fimfast", "{}"))
            d = {k: f.get_tensor(k) for k in f.keys()}
        order = meta.get("names")
        if order and set(order) == set(d):
            d = {k: d[k] for k in order}
        return cls(d, meta)
