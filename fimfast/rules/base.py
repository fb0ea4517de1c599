"""The rule interface of the fast per-sample engine: terms, use kinds, the :class:`Rule` base.

A rule turns what a layer saw in the forward (its input) and the gradient at its output for a
chunk of ``M`` backward columns into *terms*: the per-unit gradient of each parameter it uses, in
a form the engine squares and sums without materialising per-unit gradients of the model
(docs/math.md §4). A *unit* ``u = (column m, sample n)``: for ``(N, C)``
logits one backward column covers every sample at once; for ``(N, T, C)`` logits one column is a
(class, token position) pair and covers that position of every sequence.

* :class:`Outer` (:attr:`UseKind.OUTER`): ``grad_u = sum_t P[m, n, t] (x) Q[n, t]``. ``t`` runs
  over the positions that share the weight (tokens of a sequence, output positions of a
  convolution); ``Q`` does not depend on the column.
* :class:`Rows` (:attr:`UseKind.ROWS`): an embedding table, ``grad_u = sum_t e_{ids[n, t]} (x)
  Qe[m, n, t]``; repeated ids of one sample add before the square, masked tokens do not count.
* :class:`Vec` (:attr:`UseKind.VEC`): the per-unit gradient itself, for small parameters (biases,
  norm affines).

See docs/rules.md for writing a rule for a module of one's own.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import wraps
from typing import Any

import torch
from torch import nn

from fimfast.dtypes import compute_dtype
from fimfast.hooks import Call, Capture, Use

__all__ = [
    "Outer",
    "Rows",
    "Rule",
    "Term",
    "UseKind",
    "Vec",
    "front",
    "trainable",
]


class UseKind(str, Enum):
    """How a call uses a parameter (:attr:`fimfast.hooks.Use.kind`), and so which term its rule
    returns for it. A ``str`` subclass: ``UseKind.OUTER == "outer"``, and the engine's plain
    string comparisons and hashes see the same value."""

    OUTER = "outer"  #: weight of a linear map: an :class:`Outer` term
    ROWS = "rows"  #: embedding table: a :class:`Rows` term
    VEC = "vec"  #: per-unit gradient given directly: a :class:`Vec` term

    __hash__ = str.__hash__  # hash like the plain string (sets and dict keys mix both)

    def __str__(self) -> str:
        return self.value


# --------------------------------------------------------------------------------------------- #
# terms
# --------------------------------------------------------------------------------------------- #
@dataclass
class Outer:
    """Per-unit gradient ``sum_t P[m, n, t] (x) Q[n, t]`` of a 2-D block of a parameter.

    The engine forms ``sum_{m, n} (P[m, n]^T Q[n])^2``, laid out ``(O, I)`` row-major like the
    parameter (or its :attr:`~fimfast.hooks.Use.block`), or ``(I, O)`` for a use with
    ``transposed=True``; with ``g`` groups ``(g, O/g, I/g)``.

    With ``index``, the product holds only some entries of the parameter (block), in an order of
    its own: entry ``e`` of the flattened product is entry ``index[e]`` of the flattened
    parameter (block). A rule may then list the same parameter in several uses of one call, one
    term each, covering disjoint entries (the phases of a transposed convolution:
    fimfast/rules/conv.py); terms of one parameter with equal indices add up before the square.

    Attributes:
        P: ``(M, N, T, O)`` output-side factor, or ``(M, N, T, g, O/g)`` for ``g`` groups.
        Q: ``(N, T, I)`` input-side factor (the same for every column), or ``(N, T, g, I/g)``;
            or a :class:`Patches` of that shape, formed a few samples at a time.
        index: ``None`` (the product is laid out as the parameter), or int64 positions in the
            flattened parameter (block), one per entry of the product, no two equal.
    """

    P: torch.Tensor
    Q: torch.Tensor
    index: torch.Tensor | None = None


class Patches:
    """An input-side factor ``Q`` of an :class:`Outer` that is formed a few samples at a time,
    never for the whole batch at once (a convolution's unfolded input patches, about
    ``prod(kernel)`` times its input: fimfast/rules/conv.py).

    ``Q[a:b]`` (a slice of samples, step 1) forms samples ``a`` to ``b``; :meth:`full` forms all
    of them (for the rare consumers that need the whole factor). The squares
    (fimfast/persample/squares.py) take ``chunk`` samples at a time.

    Attributes:
        shape: the shape of the whole factor, ``(N, T, I)`` or ``(N, T, g, I/g)``.
        dtype: its dtype.
        chunk: samples per piece (:func:`fimfast.chunks.patch_samples`).
    """

    def __init__(self, make: Callable[[int, int], torch.Tensor], shape: tuple[int, ...],
                 dtype: torch.dtype, chunk: int) -> None:
        self.make, self.shape, self.dtype = make, torch.Size(shape), dtype
        self.chunk = max(1, int(chunk))

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx: slice) -> torch.Tensor:
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise TypeError(f"Patches take a slice of samples (step 1); got {idx!r}")
        a, b, _ = idx.indices(self.shape[0])
        return self.make(a, max(a, b))

    def full(self) -> torch.Tensor:
        """The whole factor (every sample at once)."""
        return self.make(0, self.shape[0])


def dense(Q: torch.Tensor | Patches) -> torch.Tensor:
    """``Q`` as one tensor (a :class:`Patches` formed whole)."""
    return Q.full() if isinstance(Q, Patches) else Q


@dataclass
class Rows:
    """Per-unit gradient ``sum_t e_{ids[n, t]} (x) Qe[m, n, t]`` of a ``(V, d)`` embedding table.

    Attributes:
        ids: ``(N, S)`` int64 row indices.
        keep: ``(N, S)`` bool, the tokens that count (``None``: all).
        Qe: ``(M, N, S, d)`` gradients at the embedding output.
    """

    ids: torch.Tensor
    keep: torch.Tensor | None
    Qe: torch.Tensor


@dataclass
class Vec:
    """Per-unit gradient of a small parameter block, given directly.

    Attributes:
        V: ``(M, N, *block)``: ``V[m, n]`` is the gradient of unit ``(m, n)``, shaped like the
            parameter (or its block).
    """

    V: torch.Tensor


Term = Outer | Rows | Vec

# the term each use kind takes
TERM_OF_KIND: dict[UseKind, type] = {UseKind.OUTER: Outer, UseKind.ROWS: Rows, UseKind.VEC: Vec}


# --------------------------------------------------------------------------------------------- #
# helpers shared by the rules
# --------------------------------------------------------------------------------------------- #
def front(t: torch.Tensor, b: int, lead: int, extra: int = 0) -> torch.Tensor:
    """Move batch dim ``b`` (of the ``lead`` leading dims, after ``extra`` dims) to the front and
    flatten the other leading dims into one: ``(*extra, *lead, *feat) -> (*extra, N, T, *feat)``.

    Args:
        t: a layer input or output gradient.
        b: the batch dimension among the ``lead`` leading dims (``Tap.bdim``).
        lead: number of leading dims (batch and positions) before the feature dims.
        extra: dims before those (1 for the column dim ``M`` of a gradient).

    ``t`` itself when it is laid out so already (batch first of two leading dims): no view.
    """
    if b:
        t = t.movedim(extra + b, extra)
    if lead == 2:
        return t
    s = t.shape
    T = math.prod(s[extra + 1 : extra + lead])
    return t.reshape(*s[:extra], s[extra], T, *s[extra + lead :])


def trainable(cap: Capture, *ps: torch.Tensor | None) -> list[torch.Tensor]:
    """The parameters among ``ps`` that the estimate covers (not ``None``, not frozen), and
    the tensors among them that are elementwise functions of such a parameter, made for this
    call (a pruned module's ``weight = weight_orig * weight_mask``: :meth:`Capture.record`
    lists their parameter, with the derivative)."""
    return [
        p for p in ps
        if p is not None and (
            id(p) in cap.param_ids or (cap.derived is not None and cap.derived(p) is not None)
        )
    ]


def _usable(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.grad_fn is not None


_acc_dtype = compute_dtype  # the name fimfast.layers re-exports


def _linear_terms(call: Call, G, tap, data: dict, key: str, uses: list[Use]) -> list[Term | None]:
    """Terms of a linear map ``y = x W^T + b`` whose input is ``data[key]``: ``Outer(G, x)`` for
    the weight, ``sum_t G`` for the bias (``G``: ``(M, *tap.shape)`` or ``None``)."""
    if G is None:
        return [None] * len(uses)
    b, lead = tap.bdim, tap.lead
    qkey = ("Q", key)
    if qkey not in data:  # the input side does not depend on the column: once per step
        data[qkey] = front(data[key], b, lead)
    P = front(G, b, lead, extra=1)
    out: list[Term | None] = []
    for u in uses:
        if u.kind == UseKind.OUTER:
            out.append(Outer(P, data[qkey]))
        else:  # bias: sum over tokens (a view if one)
            out.append(Vec(P[:, :, 0] if P.shape[2] == 1 else P.sum(2)))
    return out


def _block_numel(u: Use) -> int:
    p = u.param
    if u.block is None:
        return p.numel()
    return (u.block[1] - u.block[0]) * math.prod(p.shape[1:])


_BOUNDS: dict[int, tuple] = {}  # id -> (weak reference, version, min, max) of checked indices


def _index_bounds(ix: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of the CPU index ``ix``, read once per version (a rule forms its index once
    per configuration; an inference tensor, which has no version counter, is read every time)."""
    k = id(ix)
    ver, hit = None if ix.is_inference() else ix._version, _BOUNDS.get(k)
    if ver is None or hit is None or hit[0]() is not ix or hit[1] != ver:
        ref = weakref.ref(ix, lambda _: _BOUNDS.pop(k, None))
        hit = _BOUNDS[k] = (ref, ver, int(ix.min()), int(ix.max()))
    return hit[2], hit[3]


def _fits(t: Term, u: Use) -> bool:
    """Whether ``t`` is shaped as a per-unit gradient of the parameter block of ``u``."""
    if isinstance(t, Rows):  # any rows of a (V, d) table
        return u.param.dim() == 2 and t.Qe.shape[-1] == u.param.shape[1]
    if isinstance(t, Outer):
        if t.P.dim() == 5:  # groups: (M, N, T, g, O/g) against (N, T, g, I/g)
            size = t.P.shape[3] * t.P.shape[4] * t.Q.shape[-1]
        else:
            size = t.P.shape[-1] * t.Q.shape[-1]
        if t.index is not None:  # some entries of the block, anywhere in it
            ix = t.index
            if ix.dtype != torch.int64 or ix.numel() != size:
                return False
            # the bounds where reading them costs no device synchronisation
            return ix.device.type != "cpu" or size == 0 or (
                (b := _index_bounds(ix))[0] >= 0 and b[1] < _block_numel(u))
    else:
        size = math.prod(t.V.shape[2:])
    return size == _block_numel(u)


def check_terms(rule: Rule, call: Call, out: list) -> list:
    """Raise a ``TypeError`` naming ``rule`` when ``out`` is not one term per use of ``call``, of
    the use's kind and the size of its parameter block."""
    name = type(rule).__qualname__
    if not isinstance(out, (list, tuple)) or len(out) != len(call.uses):
        got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
        raise TypeError(
            f"rule {name}: terms must return a list of one term per use ({len(call.uses)}); "
            f"got {got}"
        )
    for i, (u, t) in enumerate(zip(call.uses, out)):
        if t is None:
            continue
        want = TERM_OF_KIND.get(u.kind)
        if want is None or not isinstance(t, want):
            raise TypeError(
                f"rule {name}: use {i} (kind {str(u.kind)!r}, parameter of shape "
                f"{tuple(u.param.shape)}) needs a term of type "
                f"{getattr(want, '__name__', 'Outer, Rows or Vec')}; got {type(t).__name__}"
            )
        if not _fits(t, u):
            raise TypeError(
                f"rule {name}: use {i} ({type(t).__name__} term) does not fit its parameter "
                f"block of shape {tuple(u.param.shape)}"
                + ("" if u.block is None else f" rows {u.block[0]}:{u.block[1]}")
                + " (see fimfast.rules.base for the shapes of each term)"
            )
    return out


def _checked(terms: Callable) -> Callable:
    @wraps(terms)
    def checked_terms(self, call, grads):
        return check_terms(self, call, terms(self, call, grads))

    checked_terms._fimfast_checked = True
    return checked_terms


# --------------------------------------------------------------------------------------------- #
# the base class
# --------------------------------------------------------------------------------------------- #
class Rule:
    """A rule for one kind of module: what to record in the forward, and its terms.

    Subclass it and register an instance with :func:`fimfast.register_rule`. A subclass
    implements two methods (docs/rules.md has a worked example):

    * :meth:`capture`, called after the module's ``forward`` on every call of the module during
      the estimator's forward (fimfast/rules/forwards.py, or :meth:`install`'s hook), must

      1. list the parameters it will give terms for: ``trainable(cap, p1, p2, ...)``, and one
         :class:`~fimfast.hooks.Use` per parameter, ``Use(p, UseKind.OUTER | ROWS | VEC)``
         (optional ``block=(start, stop)``: the rows of the parameter's first dim this use fills;
         ``transposed=True``: an OUTER weight stored ``(I, O)``). The module's forward must
         consume each listed parameter exactly once (one autograd edge): the engine counts the
         edges and sends a parameter used elsewhere too to the generic path;
      2. tap each output whose gradient :meth:`terms` needs: ``tap, out = cap.tap(y, lead=...,
         key=(id(module), 0))``, ``lead`` being the number of leading dims (batch and positions)
         before the feature dims, ``key`` naming this output of this module across steps (pass
         ``batch_first=True`` when dim 0 is the batch by construction);
      3. record the call: ``cap.record(Call(module, self, [tap], uses, data))``, ``data`` holding
         what :meth:`terms` needs from the forward (inputs, **detached**);
      4. return ``out`` (it replaces the module's output), or ``None`` without recording to leave
         the call alone (its parameters then take the generic path).

    * :meth:`terms`, called once per chunk of ``M`` backward columns, gets ``grads[i]``, the
      gradient at ``call.taps[i]`` shaped ``(M, *tap.shape)`` (``None`` when nothing reaches it
      in this chunk), and returns one term per ``call.uses`` entry, in order: :class:`Outer` for
      an OUTER use, :class:`Rows` for ROWS, :class:`Vec` for VEC (``None`` for no gradient).
      ``tap.bdim`` is the batch dim the engine found among the tap's leading dims (move it to the
      front with :func:`front`). ``call.data`` persists across the chunks of one step: cache
      there what does not depend on the column. The returned list is checked (one term per use,
      of the use's kind and the size of its parameter block): a mismatch raises ``TypeError``.

    Attributes:
        name: a short name, shown in plans and logs.
        closed_form_head: when this rule's module produces the logits, its weight and bias may be
            estimated in closed form with no backward column (``F_W = S^T x^2``, ``F_b = sum S``,
            ``S = diag I(z)`` per row), which reads ``call.data["x"]`` as the input of
            ``F.linear(x, weight, bias)`` (or ``x @ W + b`` for a ``transposed`` weight). True
            only for :class:`~fimfast.rules.LinearRule` and its subclasses; a subclass that
            computes anything else must set it to ``False``.
        takes_functions: whether the rule may be given a module whose parameter attribute is an
            elementwise function of a parameter made before its forward (``torch.nn.utils.prune``:
            ``weight = weight_orig * weight_mask``): its uses then name the parameter and its
            terms are for that function (the engine applies the derivative). Set it only on a
            rule whose :meth:`terms` tells its uses apart by position or kind, never by comparing
            ``use.param`` with the module's attributes; a call of a rule without it sends such
            parameters to the generic path.
    """

    name = "rule"
    closed_form_head = False
    takes_functions = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every rule's terms are checked against its uses (kind, size): a wrong term would
        # otherwise be dropped or misread by the engine
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("terms")
        if own is not None and not getattr(own, "_fimfast_checked", False):
            cls.terms = _checked(own)

    def accepts(self, module: nn.Module) -> bool:
        """Whether this rule can handle ``module`` as configured (default: always)."""
        return True

    def install(self, module: nn.Module, cap: Capture) -> Callable[[], None]:
        """Register the forward hook, ahead of the module's own forward hooks (a user's hook that
        rescales or masks the output then acts after the tap, whose gradient stays the gradient at
        the layer's own output); returns the function that removes it. The hook also records
        the module's calls made with gradients disabled (:meth:`fimfast.hooks.Capture.
        without_grad`; the module is added to ``cap.noting``, so the capture does not watch it
        otherwise)."""
        hook, grad_enabled = self._hook, torch.is_grad_enabled

        def entry(module, args, kwargs, output):
            if not grad_enabled():
                cap.without_grad(module)
                return None
            return hook(cap, module, args, kwargs, output)

        handle = module.register_forward_hook(entry, with_kwargs=True, prepend=True)
        cap.noting.add(id(module))
        return handle.remove

    def _hook(self, cap: Capture, module, args, kwargs, output):
        if "forward" in module.__dict__:
            # a forward set on the instance after the rule was chosen (fimfast.rules.registry):
            # left uncaptured, its parameters take the generic path
            return None
        return self._take(cap, module, args, kwargs, output)

    def _take(self, cap: Capture, module, args, kwargs, output):
        """The call of ``module`` the class's own ``forward`` made (from the forward hook, or the
        capturing forward of :mod:`fimfast.rules.forwards`): recorded by :meth:`capture`."""
        if not cap.active or not torch.is_grad_enabled() or not _usable(output):
            return None
        if torch._C._current_graph_task_id() != -1:
            # a forward run by a backward: torch.utils.checkpoint (non-reentrant) recomputing a
            # segment for its saved tensors. The graph differentiated is the first forward's,
            # tapped there (a tap saves no tensor, so the recomputation saves the same ones)
            return None
        x = self.inputs(args, kwargs)
        if x is None:
            return None
        return self.capture(cap, module, x, output)

    def inputs(self, args: tuple, kwargs: dict) -> Any:
        """What :meth:`capture` receives as ``x`` from the call's arguments: its first input if it
        is a tensor; ``None`` leaves the call uncaptured."""
        x = args[0] if args else kwargs.get("input")
        return x if isinstance(x, torch.Tensor) else None

    def capture(
        self, cap: Capture, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Record one call of ``module`` with first input ``x`` and output ``y``; returns the
        tapped output (or ``None`` to leave the call untouched). See the class docstring."""
        raise NotImplementedError

    def terms(self, call: Call, grads: list[torch.Tensor | None]) -> list[Term | None]:
        """One term per use of ``call`` for a chunk of ``M`` columns (``None``: no gradient).
        See the class docstring."""
        raise NotImplementedError


def patch_forward(module: nn.Module, fn) -> Callable[[], None]:
    """Replace ``module.forward`` by ``fn``; returns the function that puts it back. A forward
    already set on the instance (after the rule was chosen, see fimfast.rules.registry) is left
    to run, uncaptured: its parameters take the generic path."""
    if "forward" in module.__dict__:
        return lambda: None
    module.forward = fn

    def undo() -> None:
        del module.forward

    return undo
