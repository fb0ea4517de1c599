"""Weights computed from parameters for a layer with a rule: ``W = f(theta)``.

``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``,
``orthogonal``, any parametrization module of one's own), the older
``torch.nn.utils.weight_norm`` (a forward pre-hook setting ``module.weight`` from ``weight_g`` and
``weight_v``) and any forward that hands a layer a weight made from parameters give the layer's
rule a tensor ``W`` that is not a parameter. When ``W`` does not depend on the batch (its autograd
graph reaches no leaf but trainable parameters: tensors without gradient are constants), the
rule's per-sample gradients of ``W`` are pulled back through ``f`` to each ``theta``
(:mod:`fimfast.pullback`, docs/math.md §4):
``grad_n theta = J_f^T grad_n W``, then squared and summed like any per-sample gradient.

Here, the bookkeeping around the per-sample engine:

* :class:`Weights` (one per engine): during the captured forward, :meth:`Weights.lookup` (the
  capture's ``derived``, :attr:`fimfast.hooks.Capture.derived`) gives each such ``W`` a *slot*, a
  placeholder tensor in ``W``'s shape kept across steps (the rules list it as the parameter they
  use, so plans are reused from step to step);
* :func:`walk`: the walk of the logits' graph that stops at each ``W``: edges into ``W`` count as
  edges into its slot, and a ``theta`` keeps only the edges that do not pass through a ``W``;
* :func:`settle`: the plan over the parameters and the slots is turned into one over the
  parameters: a ``theta`` reached only through fast ``W`` takes the pullback
  (:class:`Pullback`), a ``theta`` reached by any other path too (used directly elsewhere) or
  through a ``W`` the rules cannot take takes the generic path, exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fimfast import _env, hooks, parametrized_reads

_ACC = torch._C._functions.AccumulateGrad


@dataclass
class Pullback:
    """Parameters estimated through weights computed from them (a connected set).

    Attributes:
        groups: the groups of the slots (their ``index`` past the parameters).
        slots: slot index -> ``W`` of this step.
        thetas: indices of the parameters the pullback covers.
        units: (column, sample) pairs per pullback (the memory budget).
        origins: slot index -> the ``ParametrizationList`` that made ``W`` (``None``: not a
            parametrization), for the closed forms of :mod:`fimfast.pullback_closed`.
        closed: the sums of :func:`fimfast.pullback_closed.projected` over this step's chunks
            (``None`` before the first and after :func:`fimfast.pullback_closed.finish`).
    """

    groups: list
    slots: dict[int, torch.Tensor]
    thetas: list[int]
    units: int = 1
    origins: dict | None = None  # slot index -> the ParametrizationList that made W, or None
    closed: Any = None  # this step's sums of fimfast.pullback_closed.projected


def model_has_derived(model: torch.nn.Module) -> bool:
    """Whether ``model`` may hand a layer a weight computed from parameters: a parametrized
    module, or a module with a forward pre-hook (the older ``weight_norm``, a hook of one's
    own)."""
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) or m._forward_pre_hooks for m in model.modules())


def parametrized(model: torch.nn.Module, params: list[torch.Tensor],
                 rule_for: Callable[[torch.nn.Module], Any], have: list) -> list[tuple]:
    """``(module, rule)`` of the parametrized modules with a rule that :func:`fimfast.hooks.
    targets` left out (no trainable parameter of their own: ``nn.Linear(bias=False)`` whose
    weight is parametrized), when a parametrization of theirs holds a trainable parameter."""
    from torch.nn.utils import parametrize

    ids, done = {id(p) for p in params}, {id(m) for m, _ in have}
    out = []
    for m in model.modules():
        if id(m) in done or not parametrize.is_parametrized(m):
            continue
        if any(id(p) in ids for p in m.parametrizations.parameters()):
            rule = rule_for(m)
            if rule is not None:
                out.append((m, rule))
    return out


@contextmanager
def computed(cap: hooks.Capture, weights: Weights, modules: bool) -> Iterator[None]:
    """During the captured forward, the rules find the weights computed from parameters
    (``weights``): ``cap.derived`` also tries :meth:`Weights.lookup` where the model may hand a
    layer such a weight (``modules``: :func:`model_has_derived`) or where the functional mode
    records (``cap.derived`` set: a bias table added to the batch's scores,
    :mod:`fimfast.functional_computed`); with ``modules``, ``torch.nn.utils.parametrize``
    computes each parametrized tensor once (``parametrize.cached``), so that the weight a rule
    lists is the one its layer used (refused where computing it again would give another
    tensor: :mod:`fimfast.parametrized_reads`)."""
    before = cap.derived
    if not modules and before is None:
        yield
        return
    from torch.nn.utils import parametrize

    weights.begin(cap)
    cap.derived = weights.chain(before)
    try:
        if modules:
            with parametrize.cached(), parametrized_reads.watched(cap.model):
                yield
        else:
            yield
    finally:
        cap.derived = before


class Weights:
    """The slots of the computed weights of one model (see the module docstring)."""

    def __init__(self) -> None:
        self.slots: dict[tuple, torch.Tensor] = {}  # structural key -> placeholder
        self.step: dict[int, tuple] = {}  # id(W) -> (W, slot, leaves, node, version, origin)
        self.seen: Counter = Counter()
        self.cap: hooks.Capture | None = None

    def begin(self, cap: hooks.Capture) -> None:
        """Start a captured forward."""
        self.step, self.seen, self.cap = {}, Counter(), cap

    def chain(self, other):
        """A ``derived`` function trying ``other`` (the functional mode's) first, then
        :meth:`lookup` (its attribute ``weights``, this object, is read by
        :mod:`fimfast.functional_computed`)."""
        look = self.lookup

        def derived(t):
            return (other is not None and other(t)) or look(t)

        derived.weights = self
        return derived

    def made_from_parameters(self, t: Any) -> bool:
        """Whether ``t`` is computed from trainable parameters only (nothing registered)."""
        return (isinstance(t, torch.Tensor) and t.grad_fn is not None and self.cap is not None
                and _leaves(t.grad_fn, self.cap.param_ids) is not None)

    def lookup(self, t: Any) -> tuple | None:
        """``(slot, None)`` of a weight ``t`` computed from trainable parameters only, else
        ``None``."""
        hit = self.step.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1], None
        if (not isinstance(t, torch.Tensor) or isinstance(t, torch.nn.Parameter)
                or t.grad_fn is None or not t.is_floating_point() or self.cap is None):
            return None
        leaves = _leaves(t.grad_fn, self.cap.param_ids)
        if not leaves:
            return None
        base = (tuple(id(p) for p in leaves), tuple(t.shape), t.dtype, t.device)
        key = (*base, self.seen[base])
        self.seen[base] += 1
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) > 4096:
                self.slots.clear()
            slot = self.slots[key] = t.new_zeros(()).expand(t.shape)
        self.step[id(t)] = (t, slot, leaves, t.grad_fn, t._version, _origin(t, self.cap.model))
        return slot, None

    def take(self, cap: hooks.Capture | None) -> list[tuple]:
        """``(W, slot, leaves, node, origin)`` (``origin``: the ``ParametrizationList`` that made
        ``W``, or ``None``) of the weights of ``cap``'s forward that were not modified
        in place since a layer took them (``[]`` for another capture); forgets them."""
        found = [] if cap is None or cap is not self.cap else [
            (w, s, lv, node, o) for w, s, lv, node, v, o in self.step.values()
            if w._version == v]
        self.step, self.cap = {}, None
        return found


def _origin(t: torch.Tensor, model: torch.nn.Module) -> Any:
    """The ``ParametrizationList`` of ``model`` whose parametrization made ``t``, where a closed
    form of the pullback may apply (a single ``spectral_norm``: ``t = original / sigma``), or
    ``None``. Told by the graph (the division's first operand is the list's original), not by
    ``parametrize``'s cache, whose keys name the module a deep copy was made from."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _SpectralNorm

    fn = t.grad_fn
    if type(fn).__name__ != "DivBackward0":
        return None
    first = getattr(fn.next_functions[0][0], "variable", None)
    for m in model.modules():
        if first is not None and parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                if (len(plist) == 1 and isinstance(plist[0], _SpectralNorm)
                        and getattr(plist, "original", None) is first):
                    return plist
    return None


# nodes of a weight's graph walked at most (a parametrization is a few operations; a tensor of
# the batch's graph is refused as soon as the walk is this long)
MAX_NODES = 256


def _leaves(fn: Any, param_ids: set) -> tuple | None:
    """The trainable parameters the graph of ``fn`` reaches, in order of discovery; ``None``
    when it reaches any other leaf (the batch, a tap), a reentrant checkpoint, or more than
    :data:`MAX_NODES` nodes."""
    out: dict[int, torch.Tensor] = {}
    seen, stack = {fn}, [fn]
    while stack:
        if len(seen) > MAX_NODES:
            return None
        node = stack.pop()
        if hooks.is_reentrant_node(node):
            return None
        for nxt, _ in node.next_functions:
            if nxt is None or nxt in seen:
                continue
            seen.add(nxt)
            if type(nxt) is _ACC:
                v = nxt.variable
                if id(v) not in param_ids:
                    return None
                out[id(v)] = v
            else:
                stack.append(nxt)
    return tuple(out.values()) or None


def walk(flat: torch.Tensor, params: list[torch.Tensor], stops: dict) -> hooks.Graph:
    """:func:`fimfast.hooks.walk` that stops at the nodes of ``stops`` (node -> slot): an edge
    into one counts as an edge into its slot (by ``id``), and nothing behind it is walked (the
    parameters keep only the edges of other paths)."""
    wanted = {id(p) for p in params}
    counts: Counter = Counter()
    fn = flat.grad_fn
    if fn is None:
        return hooks.Graph(counts, set(), False)
    if fn in stops:
        counts[id(stops[fn])] += 1
        return hooks.Graph(counts, {fn}, False)
    reentrant = False
    seen, stack = {fn}, [fn]
    while stack:
        node = stack.pop()
        if not reentrant and hooks.is_reentrant_node(node):
            reentrant = True
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            s = stops.get(nxt)
            if s is not None:
                counts[id(s)] += 1
                seen.add(nxt)
            elif type(nxt) is _ACC:
                seen.add(nxt)
                if id(nxt.variable) in wanted:
                    counts[id(nxt.variable)] += 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return hooks.Graph(counts, seen, reentrant)


def unit_bytes(slots: list[torch.Tensor], thetas: list[torch.Tensor]) -> int:
    """Bytes one (column, sample) pair of a pullback holds: its gradient of every ``W`` (formed
    from the rules' terms, then cast) and of every ``theta`` (the pullback, then squared), in
    float32 or wider, twice (the temporaries of the batched backward through ``f``)."""
    e = max([4] + [t.element_size() for t in [*slots, *thetas]])
    return 2 * e * (2 * sum(s.numel() for s in slots) + 2 * sum(p.numel() for p in thetas))


def settle(plan, params: list[torch.Tensor], found: list[tuple], glob: Counter, head) -> None:
    """Turn ``plan``, built over ``params`` followed by the slots of ``found`` (:meth:`Weights.
    take`, in that order), into a plan over ``params``: the slots' groups become
    :class:`Pullback` s (``plan.pullbacks``), the parameters reached through a ``W`` take them
    or the generic path (see the module docstring)."""
    n = len(params)
    by_slot = {n + k: f for k, f in enumerate(found)}
    slot_groups: dict[int, list] = {}
    for g in plan.groups:
        if g.index >= n:
            slot_groups.setdefault(g.index, []).append(g)
    plan.groups = [g for g in plan.groups if g.index < n]
    pos = {id(p): i for i, p in enumerate(params)}
    reach: dict[int, list[int]] = {}  # theta index -> slot indices
    for j, (_, _, leaves, _, _) in by_slot.items():
        for p in leaves:
            if id(p) in pos:
                reach.setdefault(pos[id(p)], []).append(j)
    generic = set(i for i in plan.generic if i < n)
    pulled: set[int] = set()
    budget = _env.memory_budget_bytes()
    for i, js in reach.items():
        why = None
        if glob[id(params[i])]:
            why = "used through a computed weight and by another path too"
        else:
            bad = [j for j in js if j not in slot_groups]
            if bad:
                why = ("used through a computed weight that the rules cannot take: "
                       + plan.reasons.get(bad[0], "no rule for the layer using it"))
        if why is None:
            pulled.add(i)
            continue
        plan.groups = [g for g in plan.groups if g.index != i]
        generic.add(i)
        plan.reasons[i] = why
    comps = _components(pulled, reach, by_slot, slot_groups, params, budget)
    for comp, ok in comps:
        if ok:
            plan.pullbacks.append(comp)
            continue
        for i in comp.thetas:
            pulled.discard(i)
            generic.add(i)
            plan.reasons[i] = "one sample's pullback through its computed weight exceeds the " \
                "memory budget (FIMFAST_MEMORY_BUDGET_MB)"
    for j in list(plan.reasons):
        if j >= n:
            del plan.reasons[j]
    for i in pulled:
        plan.reasons.pop(i, None)
    plan.unused = [i for i in plan.unused if i < n and i not in pulled and i not in generic]
    plan.generic = sorted(generic)
    seen: dict[int, Any] = {}
    for g in [*plan.groups, *(g for pb in plan.pullbacks for g in pb.groups)]:
        if g.kind in ("head_w", "head_b") and g.index < n:
            continue
        for c, _ in g.members:
            if c is not head:
                seen.setdefault(id(c), c)
    plan.calls = list(seen.values())


def _components(pulled, reach, by_slot, slot_groups, params, budget) -> list[tuple]:
    """The pulled parameters and their slots in connected sets, each a ``(Pullback, fits)``."""
    from fimfast.persample.plan import GroupKind

    parent: dict[Any, Any] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for i in pulled:
        for j in reach[i]:
            parent[find(("t", i))] = find(("s", j))
    sets: dict[Any, tuple[list, list]] = {}
    for i in sorted(pulled):
        sets.setdefault(find(("t", i)), ([], []))[0].append(i)
        for j in reach[i]:
            js = sets[find(("t", i))][1]
            if j not in js:
                js.append(j)
    out = []
    for thetas, js in sets.values():
        groups = []
        for j in sorted(js):
            for g in slot_groups[j]:
                if g.kind == GroupKind.HEAD_W:
                    g.kind = GroupKind.OUTER
                elif g.kind == GroupKind.HEAD_B:
                    g.kind = GroupKind.VEC
                groups.append(g)
        Ws = {j: by_slot[j][0] for j in sorted(js)}
        origins = {j: by_slot[j][4] for j in sorted(js)}
        per = unit_bytes(list(Ws.values()), [params[i] for i in thetas])
        pb = Pullback(groups, Ws, thetas, max(1, budget // per), origins)
        out.append((pb, per <= budget or _closed(pb)))
    return out


def _closed(pb: Pullback) -> bool:
    """Whether ``pb`` takes a closed form that forms no per-unit gradient (one weight that
    normalizes its parameter per slice, or a spectral-normed one, whose layers give
    :class:`~fimfast.rules.Outer` terms of the whole weight:
    :func:`fimfast.pullback_closed.projected`), so that no unit's memory counts."""
    from fimfast import pullback_closed

    if len(pb.slots) != 1:
        return False
    (j, W), = pb.slots.items()
    uses = [c.uses[ui] for g in pb.groups for c, ui in g.members]
    return pullback_closed.closed(W, uses, (pb.origins or {}).get(j))
