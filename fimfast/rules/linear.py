"""Rules for linear maps: ``nn.Linear``, Hugging Face's ``Conv1D`` (GPT-2's projections) and
``nn.Bilinear``."""

from __future__ import annotations

import torch

from fimfast import chunks
from fimfast.hooks import Call, Use
from fimfast.rules import fold_rows, routed
from fimfast.rules.base import (
    Outer,
    Patches,
    Rule,
    UseKind,
    Vec,
    _linear_terms,
    front,
    trainable,
)

# nn.Bilinear: input sides of T > 1 positions larger than this (bytes) are formed a few samples
# at a time (a Patches), never for the whole batch at once
BILINEAR_DENSE_BYTES = 2 << 20


class LinearRule(Rule):
    """``nn.Linear``: ``W`` gets ``Outer(G, x)``, ``b`` gets ``sum_t G``; sequence inputs share
    the weight over their tokens (``T > 1``).

    The engine gives the logits layer of this rule a closed form (``closed_form_head``) that
    reads ``call.data["x"]`` as the input of ``F.linear(x, weight, bias)``: a subclass for a
    module that computes anything else sets ``closed_form_head = False`` (or subclasses
    :class:`~fimfast.rules.Rule` instead)."""

    name = "linear"
    takes_functions = True  # its terms tell uses apart by position or kind
    transposed = False  # weight stored (out, in)
    closed_form_head = True  # the logits layer's squares need no backward column

    def capture(self, cap, module, x, y):
        w, b = weight_bias(module)

        def build():
            return [
                Use(p, UseKind.OUTER, transposed=self.transposed) if p is w else Use(p, UseKind.VEC)
                for p in trainable(cap, w, b)
            ]

        uses, internal, key = cap.uses_of(module, self, (w, b), build)
        rows = routed.rows_of(cap, x) if x.dim() == y.dim() else None
        if rows is not None:  # rows gathered from the batch (an expert, a branch of a split)
            return routed.record(cap, module, self, x, y, rows, uses, internal, key)
        k, x0 = folded(cap.samples, y), x
        if k:  # (N * k, ..., O): tapped and recorded as (N, k, ..., O)
            y, x = y.reshape(-1, k, *y.shape[1:]), x.reshape(-1, k, *x.shape[1:])
        tap, out = cap.tap(y, lead=y.dim() - 1, key=(id(module), 0))
        # (an input without gradient, the batch itself, is kept as it is: detach would alias it)
        x = x.detach() if x.requires_grad else x
        cap.record(Call(module, self, [tap], uses, {"x": x}), internal, key)
        if not k:
            return out
        out = out.flatten(0, 1)
        fold_rows.mark(cap, tap, x0, out, cap.samples)  # rows folded by size only: refold
        return out

    def terms(self, call, grads):
        return _linear_terms(call, grads[0], call.taps[0], call.data, "x", call.uses)


def weight_bias(module: torch.nn.Module) -> tuple:
    """``(module.weight, module.bias)``, read from ``module._parameters`` where that is what the
    attributes are: both registered there, neither set on the instance, and the class and its
    bases define neither (a parametrization's property) nor change attribute lookup. Each read
    of a parameter otherwise calls ``nn.Module.__getattr__`` (Python), twice per layer call."""
    d = module.__dict__
    ps = d.get("_parameters")
    if ps is not None and "weight" in ps and "bias" in ps and "weight" not in d and "bias" not in d:
        ty = type(module)
        plain = _PLAIN_LOOKUP.get(ty)
        if plain is None:
            plain = _PLAIN_LOOKUP[ty] = _plain_lookup(ty)
        if plain:
            return ps["weight"], ps["bias"]
    return module.weight, module.bias


def _plain_lookup(ty: type) -> bool:
    return (not hasattr(ty, "weight") and not hasattr(ty, "bias")
            and ty.__getattr__ is torch.nn.Module.__getattr__
            and ty.__getattribute__ is torch.nn.Module.__getattribute__)


_PLAIN_LOOKUP: dict[type, bool] = {}  # module class -> _plain_lookup


def folded(N: int | None, y: torch.Tensor) -> int:
    """``k`` when the layer output ``y`` has the batch folded into its first dim sample by sample,
    ``(N * k, ...)`` with ``k >= 2`` (an input flattened with ``x.reshape(-1, d)``, a batch of
    ``N`` images cut into ``k`` windows each); else 0. The call is then recorded with that dim
    unfolded to ``(N, k)``: the probe checks that sample ``n``'s gradient stays in rows ``n k`` to
    ``n k + k - 1``, or finds the batch in another leading dim of size ``N`` (a sequence-first
    ``(T, N, d)`` with ``T = N k``); a dim folded the other way, ``(k * N)`` time-major, fails it
    and the layer takes the generic path, exactly."""
    if N is None or N < 1 or y.dim() < 2:
        return 0
    M = y.shape[0]
    if M <= N or M % N:
        return 0
    return M // N


class HFConv1DRule(LinearRule):
    """Hugging Face ``Conv1D`` (GPT-2's projections): a Linear layer whose weight is stored
    ``(in, out)``, ``y = x @ W + b``; its squared products are formed transposed."""

    name = "hf_conv1d"
    transposed = True


class BilinearRule(Rule):
    """``nn.Bilinear``: ``y_t = x1_t^T W x2_t + b`` with ``W`` ``(O, I1, I2)``, over any leading
    dims of the two inputs (the same for both). The weight is a linear map of the outer product
    ``x1_t (x) x2_t`` (flattened, ``I1 * I2`` entries in ``W``'s row-major order), so its
    per-unit gradient ``sum_t G_t (x) x1_t (x) x2_t`` is an :class:`Outer` with ``Q_t`` that
    product: the engine sums over the shared positions ``t`` before the square, and with one
    position per sample squares it in closed form, ``(G^2)^T (x1^2 (x) x2^2)`` (docs/math.md §4).
    With several positions the products (``T * I1 * I2`` per sample) are formed a few samples at
    a time as the squares read them (a :class:`~fimfast.rules.base.Patches`) once they exceed
    ``BILINEAR_DENSE_BYTES`` for the batch. The bias gets ``sum_t G``."""

    name = "bilinear"
    takes_functions = True  # its terms tell uses apart by position or kind

    def inputs(self, args, kwargs):
        """The pair ``(input1, input2)``, positional or keyword."""
        x1 = args[0] if args else kwargs.get("input1")
        x2 = args[1] if len(args) > 1 else kwargs.get("input2")
        if not (isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor)):
            return None
        return x1, x2

    def capture(self, cap, module, x, y):
        """``x``: the pair of inputs ``(input1, input2)`` (:meth:`inputs`)."""
        x1, x2 = x
        lead = y.dim() - 1
        if lead < 1 or x1.shape[:-1] != y.shape[:-1] or x2.shape[:-1] != y.shape[:-1]:
            return None  # an unbatched pair of vectors: no batch dimension
        w, b = module.weight, module.bias
        uses = [Use(p, UseKind.OUTER) if p is w else Use(p, UseKind.VEC)
                for p in trainable(cap, w, b)]
        if not uses:  # frozen: nothing to tap
            return None
        tap, out = cap.tap(y, lead=lead, key=(id(module), 0))
        cap.record(Call(module, self, [tap], uses, {"x1": x1.detach(), "x2": x2.detach()}))
        return out

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        tap, data = call.taps[0], call.data
        if "Q" not in data:  # (N, T, I1 * I2), the same for every column: once per step
            data["Q"] = _pair_products(front(data["x1"], tap.bdim, tap.lead),
                                       front(data["x2"], tap.bdim, tap.lead))
        P = front(G, tap.bdim, tap.lead, extra=1)  # (M, N, T, O)
        return [Outer(P, data["Q"]) if u.kind == UseKind.OUTER
                else Vec(P[:, :, 0] if P.shape[2] == 1 else P.sum(2)) for u in call.uses]


def _pair_products(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor | Patches:
    """``a_t (x) c_t`` flattened, ``(N, T, I1 * I2)`` from ``a`` ``(N, T, I1)`` and ``c``
    ``(N, T, I2)``: one tensor, or a :class:`Patches` for many positions (see
    :class:`BilinearRule`)."""

    def make(i: int, j: int) -> torch.Tensor:
        return (a[i:j].unsqueeze(-1) * c[i:j].unsqueeze(-2)).flatten(-2)

    N, T = a.shape[:2]
    per_sample = T * a.shape[-1] * c.shape[-1] * a.element_size()
    if T == 1 or N * per_sample <= BILINEAR_DENSE_BYTES:
        return make(0, N)
    shape = (N, T, a.shape[-1] * c.shape[-1])
    return Patches(make, shape, a.dtype, chunks.patch_samples(per_sample))
