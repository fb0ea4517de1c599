"""Per-coordinate derivatives of the logits, ``v = dz/dtheta_i`` and ``w = d^2 z/dtheta_i^2``.

For small models only (the analysis of docs/math.md §8, as in Soen & Sun's MNIST MLP figure).
Both come out of one forward-over-forward pass per coordinate: the first-order tangent of
``theta -> jvp(f, theta, e_i)`` along ``e_i`` is ``w`` and its primal is ``v``, for every row of
the batch at once. The passes are vectorised over chunks of coordinates with ``torch.func.vmap``;
the cost is about ``P_selected`` forward passes of the batch, each ~4x a plain forward, so it grows
as ``P_selected * R * P``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fimfast import _env
from fimfast import batch as batchlib
from fimfast.ops import compute_dtype

__all__ = ["DEFAULT_MAX_PARAMS", "LogitFunction", "logit_function"]

# Above this many analysed coordinates the exact second derivatives take minutes on a CPU
# (measured: the 8,746 coordinates of a 196-32-32-32-10 MLP on 32 rows take 4-12 s on 2 shared
# cores, both derivatives).
DEFAULT_MAX_PARAMS = 50_000


class _Forward(torch.nn.Module):
    """``forward() -> logits`` of ``model`` on a fixed batch, for ``functional_call``."""

    def __init__(self, model: torch.nn.Module, batch: Any, forward_fn):
        super().__init__()
        self.model = model
        self._batch = batch
        self._forward_fn = forward_fn

    def forward(self) -> torch.Tensor:
        if self._forward_fn is not None:
            out = self._forward_fn(self.model, self._batch)
        else:
            inputs, _, _ = batchlib.split(self._batch)
            out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        return batchlib.logits_of(out)


@dataclass
class LogitFunction:
    """The valid rows of a model's logits as a function of its flat trainable parameters.

    Attributes:
        names: trainable parameter names (``requires_grad``; tied weights once).
        shapes: their shapes.
        theta: ``(P,)`` detached flat parameters (model dtype).
        z: ``(R, C)`` detached logits of the valid rows.
        labels: ``(R,)`` or ``(R, C)`` labels of the valid rows, or ``None``.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    theta: torch.Tensor
    z: torch.Tensor
    labels: torch.Tensor | None
    _module: _Forward
    _index: torch.Tensor
    _buffers: dict[str, torch.Tensor]

    @property
    def numels(self) -> list[int]:
        """Number of entries of every parameter."""
        return [math.prod(s) for s in self.shapes]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(P,)`` flat vector -> ``{name: tensor}`` (views)."""
        out, i = {}, 0
        for n, s, k in zip(self.names, self.shapes, self.numels):
            out[n] = flat[i : i + k].reshape(s)
            i += k
        return out

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``(R, C)`` logits of the valid rows at the flat parameters ``theta``."""
        params = {"model." + n: t for n, t in self.split(theta).items()}
        # buffers are passed as copies: a train-mode BatchNorm updates the copies, not the model
        params.update({"model." + n: b.clone() for n, b in self._buffers.items()})
        # the math attention kernel: the fused CPU/GPU kernels have no forward-mode derivative
        with sdpa_kernel(SDPBackend.MATH):
            logits = functional_call(self._module, params, ())
        C = logits.shape[-1]
        return logits.reshape(-1, C).index_select(0, self._index)

    def coordinates(self, params: Sequence[str] | None = None) -> torch.Tensor:
        """``(K,)`` int64 flat indices of the coordinates of ``params`` (all when ``None``)."""
        if params is None:
            return torch.arange(self.theta.numel(), device=self.theta.device)
        if isinstance(params, str):
            params = [params]
        unknown = [n for n in params if n not in self.names]
        if unknown:
            raise ValueError(
                f"params: unknown parameter name(s) {unknown[:5]}; trainable parameters are "
                f"{self.names[:10]}{' ...' if len(self.names) > 10 else ''}"
            )
        starts, i = {}, 0
        for n, k in zip(self.names, self.numels):
            starts[n] = (i, k)
            i += k
        chunks = [torch.arange(a, a + k) for n in self.names if n in params for a, k in [starts[n]]]
        return torch.cat(chunks).to(self.theta.device)

    def derivatives(
        self, coords: torch.Tensor, second: bool = True, chunk: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(idx (K,), v (K, R, C), w (K, R, C) or None)`` chunk by chunk.

        ``v[k] = dz/dtheta_idx[k]`` and ``w[k] = d^2 z/dtheta_idx[k]^2`` for every valid row, in
        the model's dtype. ``w`` only when ``second``.
        """
        theta = self.theta
        P = theta.numel()
        R, C = self.z.shape
        if chunk is None:
            # one-hot tangents (P each) plus duals of logits and activations per coordinate
            per = theta.element_size() * 16 * (P + 4 * R * C)
            chunk = int(max(1, min(1024, _env.memory_budget_bytes() // per)))

        def first(e: torch.Tensor, t: torch.Tensor = theta):
            return jvp(self, (t,), (e,))[1]

        def both(e: torch.Tensor):
            # the primal of the outer jvp is v, its tangent is w = e^T (d^2 z) e
            return jvp(lambda t: first(e, t), (theta,), (e,))

        fn = both if second else first
        vfn = vmap(fn)
        for s in range(0, coords.numel(), chunk):
            idx = coords[s : s + chunk]
            E = torch.zeros(idx.numel(), P, dtype=theta.dtype, device=theta.device)
            E[torch.arange(idx.numel(), device=theta.device), idx] = 1
            try:
                out = vfn(E)
            except (RuntimeError, NotImplementedError):
                # an op vmap cannot batch (data-dependent control flow, in-place buffer update):
                # the same derivatives one coordinate at a time
                per = [fn(e) for e in E]
                out = tuple(torch.stack(t) for t in zip(*per)) if second else torch.stack(per)
            if second:
                yield idx, out[0].detach(), out[1].detach()
            else:
                yield idx, out.detach(), None


def logit_function(
    model: torch.nn.Module,
    batch: Any,
    likelihood: str = "categorical",
    ignore_index: int = -100,
    forward_fn=None,
) -> LogitFunction:
    """Build :class:`LogitFunction` for ``model`` on ``batch`` (one plain forward to find rows).

    ``batch`` follows :mod:`fimfast.batch` (tuple, tensor, mapping, or anything with
    ``forward_fn(model, batch) -> output``); masked tokens and ``ignore_index`` labels are left out.
    The model must be deterministic (call ``model.eval()`` when it has dropout).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    if forward_fn is None:
        _, labels, mask = batchlib.split(batch)
    else:
        labels, mask = batchlib.labels_of(batch)
    module = _Forward(model, batch, forward_fn)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    with torch.no_grad():  # on copies of the buffers: a train-mode BatchNorm keeps its statistics
        logits = functional_call(module, {"model." + n: b.clone() for n, b in buffers.items()}, ())
    rows = batchlib.rows(logits, labels, mask, likelihood, ignore_index, need_labels=False)
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    return LogitFunction(
        names=[n for n, _ in named],
        shapes=[tuple(p.shape) for _, p in named],
        theta=theta,
        z=rows.flat.detach(),
        labels=rows.labels,
        _module=module,
        _index=rows.index,
        _buffers=buffers,
    )


def as_compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64: the variance formulas take differences of fourth powers."""
    return x.to(torch.float64) if compute_dtype(x.dtype) != torch.float64 else x
