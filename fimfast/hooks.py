"""Capture for the fast per-sample engine: taps on layer outputs during the estimator's forward.

While a :class:`Capture` is active, every module with a rule in :mod:`fimfast.layers` records one
:class:`Call` per invocation: what its rule needs from the forward (inputs, detached) and one
*tap* per output whose gradient the rule needs. By default a tap replaces the output ``y`` by
``y + z`` where ``z`` is a zero scalar expanded to ``y``'s shape: the gradient with respect to
``z`` is the gradient at the layer output, and it stays the gradient of the value the layer
produced even when later code modifies the output in place (``ReLU(inplace=True)``,
``out += residual``), which asking for the gradient of ``y`` itself would not. The add costs one
pass over the output (16 MB for a 512 x 8192 logits head), so once a step has shown that a
module's output is left alone (its version counter did not move), the engine taps that module
*directly* in later steps (``y`` itself is the gradient handle); a direct tap whose output was
modified in place after all is detected by its version counter, its parameters take the generic
path for that step and the module goes back to add-taps. An output that nothing else keeps alive
(a Linear output consumed by a ReLU, a residual sum) is gone before the check can read it: the
next step holds it until the check (``Capture.hold``), and the decision is made then.

Each call declares the trainable parameters its forward consumes (one autograd edge each: the
module forwards with rules use each parameter once). :func:`parameter_edges` counts the edges
into every parameter over the whole graph of the logits, so a parameter also used outside any
captured call (``p.sum()`` added to the logits, say; recognised functional calls such as
``F.linear(x, emb.weight)`` are captured by :mod:`fimfast.functional`), or not used where
declared, is detected and sent to the generic path instead of being estimated from part of its
gradient.
(A walk of each call's own subgraph in the forward hook cost ~60 us per call, as much as a small
layer's forward; one walk of the whole graph per step costs ~0.2 ms on a 2-layer encoder.)

Hooks and patched forwards are removed when the capture exits, also after an error.
"""

from __future__ import annotations

import operator
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.nn.modules import module as _module_mod


@dataclass
class Tap:
    """One tapped layer output.

    Attributes:
        handle: the tensor whose gradient is the output gradient (the expanded zero, or the
            output itself for a direct tap).
        shape: the output's shape.
        out: weak reference to the tensor the layer returned.
        version: that tensor's version counter when it was returned.
        key: identifies the module output across steps (for the direct-tap decision).
        direct: whether ``handle`` is the output itself.
        lead: number of leading dims (batch and positions) before the feature dims.
        batch_first: the batch is dim 0 by construction (otherwise any leading dim of size ``N``
            may be it, and the engine decides).
        bdim: the batch dimension, set by the engine once the batch size is known.
        cands: candidate batch dimensions (leading dims whose size is ``N``).
        keep: the returned output, held alive until the engine has read its version counter
            (for outputs that died before the check in an earlier step).
    """

    handle: torch.Tensor
    shape: torch.Size
    out: Callable[[], torch.Tensor | None]
    version: int
    key: Any
    direct: bool
    lead: int
    batch_first: bool = False
    bdim: int | None = None
    cands: tuple[int, ...] = ()
    keep: torch.Tensor | None = None

    def modified(self) -> bool | None:
        """Whether the returned output was modified in place (``None``: it no longer exists)."""
        o = self.out()
        return None if o is None else o._version != self.version


@dataclass
class Use:
    """How one call uses one trainable parameter.

    Attributes:
        param: the parameter.
        kind: ``outer`` (per-row gradient ``sum_t P_t (x) Q_t``), ``rows`` (embedding rows) or
            ``vec`` (per-row gradient given directly).
        block: ``(start, stop)`` rows of the parameter's first dim this use fills (``None``: all).
        groups: convolution groups of an ``outer`` use.
        transposed: an ``outer`` use of a weight stored ``(I, O)`` (Hugging Face ``Conv1D``).
        chain: ``None`` when the call uses ``param`` itself; for a call using ``s = f(param)``, an
            elementwise function of it made in the forward (a pruning mask ``param * mask``),
            ``ds/dparam`` shaped like ``param`` (detached), set by :meth:`Capture.record`. The
            per-row gradient of ``param`` is the term's times ``chain``: the engine scales the
            squares of a parameter whose uses all have this one chain by ``chain**2``
            (:meth:`fimfast.batch_sums.Sums.scale`); uses with different chains, or some of the
            parameter itself, send it to the generic path.
    """

    param: torch.Tensor
    kind: str
    block: tuple[int, int] | None = None
    groups: int = 1
    transposed: bool = False
    chain: torch.Tensor | None = None


@dataclass
class Call:
    """One invocation of a module with a rule, as recorded during the forward.

    ``chunks``: the number of chunks of backward columns of the step, each a call of the rule's
    ``terms`` (set by the per-sample engine before the first): what a rule caches in ``data``
    for the step is formed once however many, what it forms per chunk is formed ``chunks``
    times."""

    module: torch.nn.Module
    rule: Any
    taps: list[Tap]
    uses: list[Use]
    data: dict[str, Any] = field(default_factory=dict)
    internal: dict[int, int] | None = None
    ok: bool = True
    reason: str = ""
    chunks: int = 1
    uses_key: tuple | None = None  # :func:`use_key` of ``uses``, when the rule kept it


class Capture:
    """Records the calls of known modules during one forward (see the module docstring).

    Args:
        model: the network.
        params: its trainable parameters (only these are looked for in the graph).
        rule_for: ``rule_for(module) -> rule | None`` (see :func:`fimfast.layers.rule_for`).
        direct: keys of the outputs to tap directly (shared with the engine, which updates it).
        batch_size: the batch's leading size, for expanding lookups shared by the batch.
            ``samples`` (set after construction; the batch size by default) is the number of
            samples as the rows will count them, for layers on a folded batch
            (:func:`fimfast.rules.linear.folded`).
        expand_broadcast: whether such lookups are expanded (see
            :class:`fimfast.layers.EmbeddingRule`).
        hold: keys of the add-tapped outputs to keep alive until the engine has read their
            version counters (outputs that were gone by then in an earlier step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        rule_for: Callable[[torch.nn.Module], Any],
        direct: set | None = None,
        batch_size: int | None = None,
        expand_broadcast: bool = True,
        hold: set | None = None,
        expand_flat: bool = False,
    ):
        self.direct = set() if direct is None else direct
        self.hold = set() if hold is None else hold
        self.batch_size = self.samples = batch_size
        self.expand_broadcast = expand_broadcast
        self.expanded = 0  # broadcast outputs expanded to the batch in this forward
        self.expand_flat = expand_broadcast and expand_flat
        self.expanded_flat = 0  # of which lookups without a batch dimension (ids (T,))
        self.model = model
        self.params = params
        self.param_ids = {id(p) for p in params}
        self.rule_for = rule_for
        self.calls: list[Call] = []
        self.active = False
        # t -> (param, chain) of a tensor made from a trainable parameter for a module's forward
        # (set while a functional mode records: fimfast.functional.FunctionalMode.derived)
        self.derived: Callable[[torch.Tensor], tuple | None] | None = None
        # modules owning trainable parameters (id -> qualified name): those called with
        # gradients disabled inside the forward are recorded (see :meth:`installed`)
        self.owners: dict[int, str] = {}
        self.nograd: list[str] = []
        # modules whose rule hook records their calls without gradients (see :meth:`installed`)
        self.noting: set[int] = set()
        # a global forward hook (register_module_forward_hook) runs before every module's own
        # hooks, so the taps would see the output it returns, not the layer's
        self.global_hooks = bool(_module_mod._global_forward_hooks)
        # what a rule derives from a module and the parameter set alone (its uses), by module id,
        # kept by the caller across the forwards of one parameter set (see :meth:`uses_of`)
        self.memo: dict[int, tuple] = {}

    # -- installation ---------------------------------------------------------------------- #
    @contextmanager
    def installed(self, *args: Any, **kwargs: Any) -> Iterator[Capture]:
        """:meth:`install` on entry (same arguments), :meth:`uninstall` on exit."""
        undo = self.install(*args, **kwargs)
        try:
            yield self
        finally:
            self.uninstall(undo)

    def install(
        self,
        modules: list[tuple[torch.nn.Module, Any]] | None = None,
        owned: dict[int, str] | None = None,
        watch: Any = None,
        forwards: Any = None,
    ) -> list[Callable[[], None]]:
        """Install hooks (and patched forwards) on ``modules`` (default: :func:`targets`), and
        record the modules of ``owned`` (default: :func:`owners`) called with gradients disabled
        (``torch.no_grad`` or a reentrant ``torch.utils.checkpoint`` inside the forward: autograd
        never sees their parameters) in :attr:`nograd` (:meth:`uninstall` removes everything).

        A rule whose install adds its module to :attr:`noting` records those calls in its own
        forward hook (:meth:`without_grad`); the other owners are watched by ``watch`` (a
        :class:`fimfast.nograd.NogradWatch`, kept across steps by the caller so that its
        wrappers are made once), which wraps only them: a global forward pre-hook would send
        every module call of the forward through torch's hooked call path. ``forwards`` (a
        :class:`fimfast.rules.forwards.Forwards` of ``modules``) records the calls of those
        modules it can without hooks. Returns what to pass to :meth:`uninstall`; on a failure,
        what was installed is removed first."""
        if modules is None:
            modules = targets(self.model, self.params, self.rule_for)
        self.owners = owned if owned is not None else owners(self.model, self.params)
        if watch is None:
            from fimfast.nograd import NogradWatch  # it imports this module

            watch = NogradWatch()
        undo: list[Callable[[], None]] = []
        try:
            if forwards is not None:
                undo.append(forwards.exit)
                modules = forwards.enter(self, modules)
            for m, rule in modules:
                undo.append(rule.install(m, self))
            w = watch.watching(self.model, self.params, frozenset(self.noting))
            self.nograd = w.__enter__()
            undo.append(w.__exit__)
        except BaseException:
            self.uninstall(undo)
            raise
        self.active = True
        return undo

    def uninstall(self, undo: list[Callable[[], None]]) -> None:
        """Remove what :meth:`install` installed (``undo``, its result), last first."""
        self.active = False
        for u in reversed(undo):
            u()

    def without_grad(self, module: torch.nn.Module) -> None:
        """Record a call of ``module`` made with gradients disabled (from the forward hook of a
        rule that added ``module`` to :attr:`noting`)."""
        name = self.owners.get(id(module))
        if name is not None and name not in self.nograd:
            self.nograd.append(name)

    # -- helpers for the rules ------------------------------------------------------------- #
    def tap(
        self, y: torch.Tensor, lead: int, key: Any, batch_first: bool = False
    ) -> tuple[Tap, torch.Tensor]:
        """A tap on ``y``: returns the tap and the tensor to use in place of ``y``.

        ``key`` names this output across steps (module and output index); outputs that a
        previous step showed to be left alone are tapped directly, the others by ``y + z``.
        """
        direct = key in self.direct
        if direct:
            out = handle = y
        else:
            handle = torch.zeros((), dtype=y.dtype, device=y.device, requires_grad=True)
            handle = handle.expand(y.shape)
            out = y + handle
        tap = Tap(handle, y.shape, weakref.ref(out), out._version, key, direct, lead, batch_first)
        if not direct and key in self.hold:
            tap.keep = out
        return tap, out

    def uses_of(
        self, module: torch.nn.Module, rule: Any, tensors: tuple, build: Callable[[], list[Use]]
    ) -> tuple[list[Use], dict[int, int] | None, tuple | None]:
        """``(uses, internal edges, key of the uses)`` of a call of ``module`` whose uses
        ``build()`` derives from ``tensors`` (its parameters as the call found them) and this
        capture's parameter set only: built once and reused by later forwards while the module
        holds the same tensors and is handled by the same rule (shared: never modified). Pass
        the last two to :meth:`record` (``None``, ``None`` when a use is not of a parameter
        itself: :meth:`record` resolves it in every forward)."""
        hit = self.memo.get(id(module))
        if (
            hit is None or hit[0] is not module or hit[1] is not rule
            or len(hit[2]) != len(tensors) or not all(map(operator.is_, hit[2], tensors))
        ):
            uses = build()
            own = all(id(u.param) in self.param_ids for u in uses)
            internal = {id(u.param): 1 for u in uses} if own else None
            hit = (module, rule, tensors, uses, internal, uses_key(uses) if own else None)
            self.memo[id(module)] = hit
        return hit[3], hit[4], hit[5]

    def record(
        self, call: Call, internal: dict[int, int] | None = None, key: tuple | None = None
    ) -> None:
        """Register ``call``. The forward of every module with a rule consumes each of its
        parameters once (one autograd edge); :func:`parameter_edges` must find exactly the
        edges the calls declare, or the parameter takes the generic path. ``internal`` and
        ``key``: those edges by parameter id and :func:`uses_key` of the call's uses, when the
        caller has them (:meth:`uses_of`: then every use is of a parameter itself). A use of a
        tensor made from a parameter for this call (see :meth:`derived_param`) is listed as a use
        of the parameter, with its derivative."""
        if key is None and any(id(u.param) not in self.param_ids for u in call.uses):
            call.uses = [self._resolved(u) for u in call.uses]  # a new list: uses may be shared
            internal = key = None  # made anew for each forward: nothing to reuse
            if not getattr(call.rule, "takes_functions", False):
                call.ok, call.reason = False, (
                    "a parameter reaches it through a function (a pruned module) and its rule "
                    "does not declare takes_functions")
        call.internal = {id(u.param): 1 for u in call.uses} if internal is None else internal
        call.uses_key = key
        self.calls.append(call)

    def _resolved(self, u: Use) -> Use:
        if id(u.param) in self.param_ids:
            return u
        p, chain = self.derived_param(u.param)
        return replace(u, param=p, chain=chain)

    def derived_param(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(param, ds/dparam)`` of ``t = s``, an elementwise function of a trainable parameter
        made again for the call that uses it (:meth:`fimfast.functional.FunctionalMode.enter`);
        ``ds/dparam`` is ``None`` for the parameter itself in another tensor."""
        found = None if self.derived is None else self.derived(t)
        if found is None:
            raise TypeError("a rule listed a tensor that is not a trainable parameter")
        return found


def uses_key(uses: list[Use]) -> tuple:
    """What a plan reads of a call's uses, as a key (:func:`fimfast.persample.plan._structure`)."""
    return tuple((id(u.param), u.kind, u.block, u.groups, u.transposed, u.chain is None)
                 for u in uses)


def saved_tensor_hooks_active() -> bool:
    """Whether the forward runs under saved-tensor hooks (``torch.utils.checkpoint`` without
    reentrance, activation offloading): the backward then recomputes or unpacks what this
    forward saves, so the capture must not change it."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def owners(model: torch.nn.Module, params: list[torch.Tensor]) -> dict[int, str]:
    """``{id(module): qualified name}`` of the modules of ``model`` owning a trainable parameter
    of ``params`` directly."""
    ids = {id(p) for p in params}
    return {
        id(m): name or type(m).__name__
        for name, m in model.named_modules()
        if any(id(p) in ids for p in m.parameters(recurse=False))
    }


def targets(
    model: torch.nn.Module, params: list[torch.Tensor], rule_for: Callable[[torch.nn.Module], Any]
) -> list[tuple[torch.nn.Module, Any]]:
    """``(module, rule)`` for every module of ``model`` that has a rule and a trainable parameter
    of its own."""
    ids = {id(p) for p in params}
    out = []
    for m in model.modules():
        if any(id(p) in ids for p in m.parameters(recurse=False)):
            rule = rule_for(m)
            if rule is not None:
                out.append((m, rule))
    return out


@dataclass
class Graph:
    """One walk of the autograd graph of the logits.

    Attributes:
        edges: edges into the AccumulateGrad node of each wanted parameter (by ``id``).
        nodes: every node reached.
        reentrant: the graph holds a reentrant ``torch.utils.checkpoint`` segment, whose
            parameters autograd reaches only through ``.backward()`` (never ``autograd.grad``).
    """

    edges: Counter
    nodes: set
    reentrant: bool = False

    def reaches(self, t: torch.Tensor) -> bool:
        """Whether the gradient of the logits flows back to ``t`` (a tap handle)."""
        fn = t.grad_fn
        if fn is None:  # a leaf: reached when its AccumulateGrad node is
            return t.requires_grad and any(
                getattr(n, "variable", None) is t for n in self.nodes
            )
        return fn in self.nodes


# autograd node type -> whether it is the backward of a reentrant checkpoint (is_reentrant_node)
REENTRANT_TYPES: dict[type, bool] = {}


def is_reentrant_node(node: Any) -> bool:
    """Whether an autograd node is the backward of a reentrant ``torch.utils.checkpoint``
    segment (any ``CheckpointFunction``, torch's or a library's copy of it)."""
    ty = type(node)
    r = REENTRANT_TYPES.get(ty)
    if r is None:
        r = REENTRANT_TYPES[ty] = ty.__name__ == "CheckpointFunctionBackward"
    return r


_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def walk(flat: torch.Tensor, params: list[torch.Tensor]) -> Graph:
    """Walk the whole graph of ``flat``: parameter edges, nodes, reentrant checkpoints (each node
    visited once; leaves' accumulators told by type, not by a failing ``getattr``)."""
    wanted = {id(p) for p in params}
    counts: Counter = Counter()
    fn = flat.grad_fn
    if fn is None:
        return Graph(counts, set(), False)
    reentrant = False
    seen, stack = {fn}, [fn]
    known, pop, push, add = REENTRANT_TYPES, stack.pop, stack.append, seen.add
    acc = _ACCUMULATE_GRAD
    while stack:
        node = pop()
        if not reentrant:
            r = known.get(type(node))
            if r or (r is None and is_reentrant_node(node)):
                reentrant = True
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt) is acc:  # a leaf: every edge into a wanted parameter counts
                add(nxt)
                if (v := id(nxt.variable)) in wanted:
                    counts[v] = counts.get(v, 0) + 1  # (no Counter.__missing__ call)
            elif nxt not in seen:
                add(nxt)
                push(nxt)
    return Graph(counts, seen, reentrant)


def parameter_edges(flat: torch.Tensor, params: list[torch.Tensor]) -> Counter:
    """Edges into each parameter's AccumulateGrad node over the whole graph of ``flat``."""
    return walk(flat, params).edges
