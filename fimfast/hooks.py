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
captured call (a functional ``F.linear(x, emb.weight)``, say), or not used where declared, is
detected and sent to the generic path instead of being estimated from part of its gradient.
(A walk of each call's own subgraph in the forward hook cost ~60 us per call, as much as a small
layer's forward; one walk of the whole graph per step costs ~0.2 ms on a 2-layer encoder.)

Hooks and patched forwards are removed when the capture exits, also after an error.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


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
    """

    param: torch.Tensor
    kind: str
    block: tuple[int, int] | None = None
    groups: int = 1
    transposed: bool = False


@dataclass
class Call:
    """One invocation of a module with a rule, as recorded during the forward."""

    module: torch.nn.Module
    rule: Any
    taps: list[Tap]
    uses: list[Use]
    data: dict[str, Any] = field(default_factory=dict)
    internal: dict[int, int] | None = None
    ok: bool = True
    reason: str = ""


class Capture:
    """Records the calls of known modules during one forward (see the module docstring).

    Args:
        model: the network.
        params: its trainable parameters (only these are looked for in the graph).
        rule_for: ``rule_for(module) -> rule | None`` (see :func:`fimfast.layers.rule_for`).
        direct: keys of the outputs to tap directly (shared with the engine, which updates it).
        batch_size: the batch's leading size, for expanding lookups shared by the batch.
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
        self.batch_size = batch_size
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

    # -- installation ---------------------------------------------------------------------- #
    @contextmanager
    def installed(self, modules: list[tuple[torch.nn.Module, Any]] | None = None
                  ) -> Iterator[Capture]:
        """Install hooks (and patched forwards) on ``modules`` (default: :func:`targets`);
        remove them on exit."""
        if modules is None:
            modules = targets(self.model, self.params, self.rule_for)
        undo: list[Callable[[], None]] = []
        try:
            for m, rule in modules:
                undo.append(rule.install(m, self))
            self.active = True
            yield self
        finally:
            self.active = False
            for u in reversed(undo):
                u()

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

    def record(self, call: Call) -> None:
        """Register ``call``. The forward of every module with a rule consumes each of its
        parameters once (one autograd edge); :func:`parameter_edges` must find exactly the
        edges the calls declare, or the parameter takes the generic path."""
        call.internal = {id(u.param): 1 for u in call.uses}
        self.calls.append(call)


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


def _edges(starts: Iterable[Any], stops: set, wanted: set[int]) -> Counter:
    """Edges into the AccumulateGrad nodes of ``wanted`` parameters reachable from ``starts``."""
    counts: Counter = Counter()
    seen: set = set()
    stack = [n for n in starts if n is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:  # AccumulateGrad of a leaf
                if id(var) in wanted:
                    counts[id(var)] += 1
                continue
            stack.append(nxt)
    return counts


def parameter_edges(flat: torch.Tensor, params: list[torch.Tensor]) -> Counter:
    """Edges into each parameter's AccumulateGrad node over the whole graph of ``flat``."""
    return _edges([flat.grad_fn], set(), {id(p) for p in params})
