"""The captured forward: lookup expansion, the check of ``(T,)`` lookups, and the re-runs.

The estimator's forward runs under a :class:`fimfast.hooks.Capture` that taps the outputs of
every module with a rule. Lookups shared by the batch are expanded to the batch during the
capture; a forward that fails with them expanded, or whose ``(T,)`` lookups change its logits, is
run again without, with the running statistics and random state it started from.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from fimfast import batch as batchlib
from fimfast import derived_weights as dw
from fimfast import functional, hooks, inner_grad, layers
from fimfast.nograd import NogradWatch, nograd_error
from fimfast.persample import held
from fimfast.persample.flat_check import ops_key
from fimfast.rules.forwards import Forwards
from fimfast.types import UnsupportedModelError

if TYPE_CHECKING:
    from fimfast.forward import Forward

log = logging.getLogger("fimfast.persample")


class Replay:
    """The forward half of :class:`fimfast.persample.Engine`: its capture and lookup expansion.

    Attributes:
        use_rules: ``False`` captures nothing (every parameter takes the generic path).
        expand_broadcast: expand lookups shared by the batch during the capture (turned off
            after a forward that fails with them expanded).
        expand_flat: also expand lookups with ids of shape ``(T,)`` (turned off when the checked
            forward's logits differ from the model's own; see :meth:`forward`).
        functional: record functional calls on parameters (:mod:`fimfast.functional`); a
            forward in which there was none turns the recording off until the model or its set
            of trainable parameters changes. ``False`` leaves such parameters to the generic
            path.
        hooked: record the calls by forward hooks only (default ``False``: by the capturing
            forwards of :mod:`fimfast.rules.forwards` where they apply).
    """

    def __init__(self) -> None:
        self.use_rules = True
        self.hooked = False
        self.expand_broadcast = True
        self.expand_flat = True  # lookups with ids (T,) too, once a forward showed it is safe
        self._flat_checked = False
        self._flat_seen: set[int] = set()  # the forwards checked with them (flat_check.ops_key)
        # per model and set of trainable parameters: the modules to hook, whether it has a
        # lookup, and the norm layers to restore if a forward reruns (see _modules)
        self._mods: tuple[Any, list, bool, list, bool] | None = None
        self._classes: list[type] = []  # the class of each module of self._mods[1]
        self.weights = dw.Weights()  # weights computed from parameters (fimfast.derived_weights)
        self._forwards: Forwards | None = None  # the capturing forwards of those modules
        self._direct: set = set()  # module outputs seen unmodified: tapped directly
        # the next forward taps every output by an add (see Engine._fast: one column per
        # backward, squares formed as the gradients arrive)
        self.add_taps = False
        # backward columns of the last step: a captured cell takes the step of
        # fimfast.rules.cell_steps where several are batched, torch's cell for one
        self.columns = 1
        self._hold: set = set()  # outputs gone before the check: held alive in the next step
        self._modified: set = set()  # outputs seen modified in place: never held again
        self._owned: dict[int, str] = {}
        self._watch = NogradWatch()  # wraps the owners no rule hook watches (hooks.Capture)
        self.functional = True
        self._quiet = False  # the last captured forward had no functional call
        self._sites: dict = {}  # functional call sites (fimfast.functional), kept across steps
        self._fowners: dict[int, tuple[int, ...]] = {}
        self._memo: dict[int, tuple] = {}  # Capture.memo across the forwards of one parameter set
        self._samples: int | None = None  # this forward's samples as its rows count them

    def forward(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        batch_size: int | None,
        fwd: Forward,
    ) -> tuple[hooks.Capture | None, Any]:
        """``fwd.run()`` (the step's forward) under a capture: ``(capture, result)``.

        Lookups shared by the batch are expanded to ``batch_size`` during the capture (see
        :class:`fimfast.layers.EmbeddingRule`); a forward that fails with an expanded output is
        run once more without expansion, which this engine then keeps off. The running statistics
        that the failed forward's norm layers updated (train mode) are put back first, so the
        step updates them once.

        Lookups without a batch dimension (ids of shape ``(T,)``) gain one when expanded, so the
        first forward that expands one is checked: the model's own forward (``fwd.plain()``; for
        a training step the forward of the module inside DistributedDataParallel, whose reducer
        expects one forward per backward) is run once more, from the same random state, and its
        logits (``fwd.logits``) must equal the captured ones. If they do not, the step is run
        again with those lookups left as they are (their tables take the generic path), and this
        engine keeps them so.
        """
        cap = None
        stats: list = []
        lookups = False
        self._samples = _samples(fwd.batch, batch_size)
        mods = self._modules(model, params) if self.use_rules else None  # capture's too
        if self.expand_broadcast and mods is not None:
            _, lookups, norms = mods
            # F.embedding calls are expanded as nn.Embedding's (fimfast.functional_ops)
            lookups = lookups or (self.functional and not self._quiet)
            stats = _running_stats(norms) if lookups else []
        check = lookups and self.expand_flat and not self._flat_checked
        # checked for other forwards (flat_check): this one may be another
        again = lookups and self.expand_flat and self._flat_checked
        if check or again:  # the model's own forward from every buffer as it was (spectral_norm)
            stats = _buffers(model)
        rng = _rng_state() if check or again else None
        # (T,) lookups are expanded once checked, or in the forward that checks them
        flat = self.expand_flat and (self._flat_checked or check)
        try:
            with self.capture(model, params, batch_size, flat, mods) as cap:
                result = fwd.run()
            if rng is None or cap is None or not cap.expanded_flat:
                return cap, result
            seen = ops_key(fwd.logits(result))
            if seen in self._flat_seen:
                return cap, result
            plain = self._plain_from(fwd, stats, rng)
            self._flat_checked = True
            if plain is not None and _close(fwd.logits(result), plain):
                if len(self._flat_seen) > 64:
                    self._flat_seen.clear()
                self._flat_seen.add(seen)
                return cap, result
            failure, flat_only = "its logits differ from the model's own", True
        except Exception as exc:
            if cap is None or not cap.expanded:
                raise
            # the (T,) lookups first: (1, T) ones may still expand
            failure, flat_only, plain = f"{type(exc).__name__}: {exc}", cap.expanded_flat > 0, None
        if flat_only:
            log.info(
                "per-sample engine: running the step again without expanding lookups of ids "
                "(T,) to the batch (%s); those tables take the generic path", failure,
            )
            self.expand_flat, self._flat_checked = False, True
            _restore(stats, rng)
            out = self.forward(model, params, batch_size, fwd)
            if plain is not None and not _close(fwd.logits(out[1]), plain):
                raise _unrepeatable()
            return out
        return self._unexpanded(model, params, batch_size, fwd, stats, failure)

    def _unexpanded(self, model, params, batch_size, fwd: Forward, stats, failure: str):
        """The forward once more with no lookup expanded (kept off afterwards), the running
        statistics of the failed one put back first."""
        log.info(
            "per-sample engine: the forward failed with shared lookups expanded to the batch "
            "(%s); running it without expansion (those tables take the generic path)", failure,
        )
        _restore(stats, None)
        self.expand_broadcast = False
        try:
            with self.capture(model, params, batch_size) as cap:
                return cap, fwd.run()
        except Exception:
            self.expand_broadcast = True  # it fails either way: the expansion was not the cause
            raise

    def _plain_from(self, fwd: Forward, stats, rng) -> torch.Tensor | None:
        """The logits of the model's own forward from the random state and buffers the captured
        one started from (``None`` where it fails: no evidence either way, nothing expanded);
        the captured forward's state is kept afterwards (its buffers are swapped out for
        copies, not written: the captured graph may have saved them)."""
        after = _rng_state()
        _restore([], rng)
        kept = [(m, name, getattr(m, name)) for m, name, _ in stats]
        try:
            for m, name, saved in stats:
                setattr(m, name, saved.clone())
            return fwd.logits(fwd.plain())
        except Exception:  # noqa: BLE001 - no evidence either way: do not expand
            return None
        finally:
            for m, name, live in kept:
                setattr(m, name, live)
            _restore([], after)

    @contextmanager
    def capture(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        batch_size: int | None = None,
        flat: bool = False,
        mods: tuple | None = None,
    ):
        """Context for the forward: yields a :class:`~fimfast.hooks.Capture` (or ``None``);
        ``flat`` also expands lookups with ids of shape ``(T,)`` (see :meth:`forward`);
        ``mods``: ``self._modules(model, params)`` when the caller has it already."""
        if not self.use_rules:
            with nullcontext():
                yield None
            return
        # add taps only (nothing tapped directly, nothing held for the check): the learning of
        # direct taps goes on in the engine's sets for the steps that batch their columns
        direct, hold = (set(), set()) if self.add_taps else (self._direct, self._hold)
        cap = hooks.Capture(
            model, params, layers.rule_for, direct, batch_size, self.expand_broadcast, hold, flat,
        )
        cap.calls = held.Calls()  # notes the versions of what each call keeps
        if mods is None:
            mods = self._modules(model, params)
        cap.memo = self._memo  # the rules' uses, kept while the parameter set stays
        cap.columns = self.columns
        if self._samples is not None:
            cap.samples = self._samples
        forwards = None if self.hooked else self._forwards
        undo = cap.install(mods[0], self._owned, self._watch, forwards)  # cap.installed, inline
        undo.append(inner_grad.watch(cap))  # a backward building a graph in the forward
        modules = self._mods[4]  # the model may hand a layer a weight computed from parameters
        try:
            if not self.functional or self._quiet:
                if not modules and cap.derived is None:  # dw.computed would do nothing
                    yield cap
                    return
                with dw.computed(cap, self.weights, modules):
                    yield cap
                return
            with functional.capturing(cap, mods[0], self._sites, self._fowners) as mode, \
                    dw.computed(cap, self.weights, modules):
                yield cap
            # a forward with no functional call on a parameter runs later steps without the mode
            self._quiet = mode.recorded == 0
        finally:
            cap.uninstall(undo)

    def _modules(
        self, model: torch.nn.Module, params: list[torch.Tensor]
    ) -> tuple[list, bool, list]:
        """``(modules to hook, has a lookup, norm layers with running statistics)``, found once per
        model and set of trainable parameters (a stale list can only leave calls uncaptured,
        which the graph check sends to the generic path), and again when the class of a module
        on the list changed (``module.__class__ = ...``: its rule may no longer apply)."""
        key = (id(model), tuple(map(id, params)))
        if self._mods is None or self._mods[0] != key or _reclassed(self._mods[1], self._classes):
            targets = hooks.targets(model, params, layers.rule_for)
            derived = dw.model_has_derived(model)
            if derived:
                targets += dw.parametrized(model, params, layers.rule_for, targets)
            self._mods = (key, targets, *_stat_modules(model), derived)
            self._classes = [type(m) for m, _ in targets]
            self._forwards = Forwards(model, targets)
            self._owned = hooks.owners(model, params)
            self._fowners = functional.owners_of(targets)
            self._sites, self._quiet = {}, False
            self._memo = {}
        return self._mods[1:4]

def _samples(batch: Any, batch_size: int | None) -> int | None:
    """The samples of a batch as its rows will count them: one per label where the labels are
    1-D (``(R, C)`` logits, e.g. ``(N * T, C)`` of flattened tokens: a layer output ``(N * T, d)``
    is then one row per sample, not a folded batch), else the batch size."""
    try:
        labels, _ = batchlib.labels_of(batch)
    except Exception:  # noqa: BLE001 - the forward reports a bad batch itself
        return batch_size
    if isinstance(labels, torch.Tensor) and labels.dim() == 1:
        return int(labels.shape[0])
    return batch_size


def _refuse_hidden(cap: hooks.Capture | None, graph: hooks.Graph) -> None:
    """Refuse a forward whose parameters autograd cannot give per-row gradients of."""
    if graph.reentrant:
        raise UnsupportedModelError(
            "the model uses torch.utils.checkpoint with use_reentrant=True: its segments give "
            "gradients only through .backward(), never torch.autograd.grad, so the per-sample "
            "types (EXACT, EMPIRICAL, MONTE_CARLO) cannot form per-row gradients of the "
            "parameters inside. Pass use_reentrant=False to checkpoint (same memory saving), or "
            "use a HUTCHINSON type"
        )
    if cap is not None and cap.nograd:
        raise nograd_error(cap.nograd, " for the per-sample types")


def _reclassed(targets: list, classes: list) -> bool:
    """Whether a module of ``targets`` is no longer of the class in ``classes``."""
    for (m, _), cls in zip(targets, classes):
        if type(m) is not cls:
            return True
    return False


def _stat_modules(model: torch.nn.Module) -> tuple[bool, list[torch.nn.Module]]:
    """Whether ``model`` has an ``nn.Embedding`` the capture could expand (with a functional
    lookup, the only cases in which a forward is run again), and its norm layers with running
    statistics (BatchNorm, InstanceNorm with ``track_running_stats``)."""
    mods = list(model.modules())
    norms = [m for m in mods if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    return any(isinstance(m, torch.nn.Embedding) for m in mods), norms


def _running_stats(mods: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """``(module, buffer name, copy)`` of the running statistics a forward of ``mods`` in train
    mode updates."""
    out = []
    for m in mods:
        if m.training:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor):
                    out.append((m, name, b.detach().clone()))
    return out


def _buffers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """``(module, buffer name, copy)`` of every buffer of ``model``: what a forward may write
    (running statistics, ``spectral_norm``'s power iteration in training mode)."""
    return [(m, name, b.detach().clone()) for m in model.modules()
            for name, b in m._buffers.items() if isinstance(b, torch.Tensor)]


def _close(got: torch.Tensor, plain: torch.Tensor) -> bool:
    """Whether two forwards' logits agree (to 64 ulps of the largest)."""
    if got.shape != plain.shape:
        return False
    a, b = got.detach().double(), plain.detach().double()
    tol = 64 * torch.finfo(plain.dtype).eps * max(1.0, float(b.abs().max()))
    return bool(((a - b).abs() <= tol).all())


def _unrepeatable() -> Exception:
    return UnsupportedModelError(
        "the model's forward gives other logits when run again from the same buffers and random "
        "state (state kept in attributes across calls, e.g. a recurrent state carried from one "
        "forward to the next): the per-sample types' check of lookups of ids (T,) runs it more "
        "than once, so this step would not be the model's. Keep such state in a registered "
        "buffer (a step puts buffers back), or use a HUTCHINSON type (one forward)"
    )


def _rng_state() -> tuple:
    """The default generators' states (CPU, and CUDA once initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _restore(stats: list[tuple[torch.nn.Module, str, torch.Tensor]], rng: tuple | None) -> None:
    """Write saved running statistics back into the buffers, and set the generator states (if
    given)."""
    with torch.no_grad():
        for m, name, saved in stats:
            getattr(m, name).copy_(saved)
    if rng is not None:
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])

