"""HUTCHINSON steps through a Linear output head without the ``(tokens x V)`` logits.

With the option ``lm_head`` (a module name such as ``"lm_head"``, or the ``nn.Linear`` itself), the
head's forward is replaced for the duration of the estimator's forward (restored in ``finally``):
it records its input, the hidden states ``h``, and returns a placeholder shaped like the logits
that holds one row of ``V`` marks (a stride-0 view), which :func:`fimfast.batch.rows` uses for the
shape, the label shift and the valid rows. Each probe then runs :func:`fimfast.ops.lm_head_probe`
on the valid rows of ``h`` (the logits and the probe cotangent exist one row chunk at a time),
back-propagates the returned ``grad h`` from ``h`` to the other parameters in one
``torch.autograd.grad``, and adds the head's weight and bias gradients from the op (a weight tied
to the input embedding, as in GPT-2, gets the sum of both: it is one parameter). The signs are
those of the unfused step with the same seed, so the estimate is the same to float32 rounding. A
weight or bias computed by a parametrization (``weight_norm``, ``spectral_norm``) is formed once
per step and the op's gradient pulled back through it to the parameters behind it (the graph kept
for that where the weight shares it with the rest of the model).

The model must return the head's output as its logits unchanged (Hugging Face causal LMs do when no
``labels`` reach the model, which fimfast never passes), or a copy of it made outside autograd
(OPT's ``.contiguous()`` after the head, a ``.clone()``): a copy equal to the placeholder
everywhere, its marks being values that any offset, clamp, scale, soft cap or float16 / bfloat16
round trip moves. A model that transforms the logits after the head (soft-capping, scaling, a bf16
head upcast with ``.float()``, an in-place temperature or vocabulary mask), or whose head runs
another forward than ``nn.Linear``'s (a subclass, a forward set on the instance), is refused with
an error naming ``lm_head`` rather than silently computed on the placeholder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fimfast import hutchinson, ops
from fimfast.dtypes import compute_dtype
from fimfast.step import Step
from fimfast.types import FIMType, Options

_MODES = {
    FIMType.HUTCHINSON: "hutchinson",
    FIMType.HUTCHINSON_SQRT: "sqrt",
    FIMType.HUTCHINSON_DG: "dg",
}


def resolve(model: torch.nn.Module, fim_type: FIMType, opts: Options) -> torch.nn.Linear | None:
    """The ``nn.Linear`` named by ``opts.lm_head`` in ``model`` (``None`` without the option).

    Raises:
        ValueError: the option names no submodule, a module that is not an ``nn.Linear`` or not
            part of ``model``, or is used with a type other than HUTCHINSON, HUTCHINSON_SQRT and
            HUTCHINSON_DG or a likelihood other than categorical.
    """
    spec = opts.lm_head
    if spec is None:
        return None
    if fim_type not in _MODES:
        raise ValueError(
            f"fim_opts['lm_head'] works with fim_type 'hutchinson', 'hutchinson_sqrt' or "
            f"'hutchinson_dg'; got fim_type={fim_type.value!r}"
        )
    if opts.likelihood != "categorical":
        raise ValueError(
            "fim_opts['lm_head'] needs likelihood='categorical' (a softmax over the vocabulary); "
            f"got likelihood={opts.likelihood!r}"
        )
    if isinstance(spec, str):
        head = None
        for root in (model, getattr(model, "module", None)):  # DDP/FSDP wrappers: also inside
            if root is None:
                continue
            try:
                head = root.get_submodule(spec)
                break
            except AttributeError:
                continue
        if head is None:
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            shown = ", ".join(repr(n) for n in linears[-5:]) or "none"
            raise ValueError(
                f"fim_opts['lm_head']={spec!r} names no submodule of the model "
                f"(its last Linear modules: {shown})"
            )
        where = repr(spec)
    else:
        head = spec
        if not any(m is head for m in model.modules()):
            raise ValueError(
                "fim_opts['lm_head'] must be a module of the model (or its name); got a "
                f"{type(head).__name__} that is not part of it"
            )
        where = type(head).__name__
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"fim_opts['lm_head'] must name an nn.Linear; {where} is a {type(head).__name__}"
        )
    _check_plain(head, where)
    return head


def _check_plain(head: torch.nn.Linear, where: str) -> None:
    """Refuse a head whose forward is not ``nn.Linear``'s (a subclass that overrides it, or a
    forward set on the instance): the fused path computes ``h W^T + b`` and nothing else."""
    if type(head).forward is not torch.nn.Linear.forward or "forward" in head.__dict__:
        raise ValueError(
            f"fim_opts['lm_head']: {where} ({type(head).__name__}) runs a forward other than "
            "nn.Linear's (overridden by its class or set on the instance); the fused path "
            "computes h W^T + b only: leave lm_head unset for this model"
        )


class HeadCapture:
    """The head's input of one forward, and the placeholder it returned."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self.hidden: torch.Tensor | None = None
        self.placeholder: torch.Tensor | None = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden is not None:
            raise ValueError(
                "fim_opts['lm_head']: the head was called more than once in one forward; the fused "
                "path needs one call whose output is the logits"
            )
        V = self.head.out_features
        self.hidden = x
        # float32 (float64 for float64 models): a model's `logits.float()` is then the
        # placeholder itself; one row of marks, expanded to the logits' shape without storage
        dt = compute_dtype(x.dtype)
        row = torch.tensor(_MARKS, dtype=dt, device=x.device).repeat((V + 1) // 2)[:V]
        self.placeholder = row.expand(*x.shape[:-1], V)
        return self.placeholder

    def check_output(self, logits: torch.Tensor) -> None:
        """Raise unless ``logits`` is the head's output, unchanged."""
        if self.placeholder is None:
            raise ValueError(
                "fim_opts['lm_head']: the head was not called in the model's forward; name the "
                "module that computes the logits"
            )
        ph = self.placeholder
        same = logits is ph or (
            logits.shape == ph.shape
            and logits.dtype == ph.dtype
            and (logits.untyped_storage().data_ptr() == ph.untyped_storage().data_ptr()
                 or _copied(logits, ph))
        )
        if not same:
            raise ValueError(
                "fim_opts['lm_head']: the model's logits are not the head's output (the model "
                "transforms them after the head, e.g. scaling, soft-capping or slicing); the fused "
                "path cannot reproduce that: leave lm_head unset for this model"
            )


# the placeholder's values, alternating along the classes: a value that float16 and bfloat16
# round and any offset moves, and one that any clamp, scale or soft cap moves
_MARKS = (1234.5678, -2.5e38)


def _copied(logits: torch.Tensor, ph: torch.Tensor) -> bool:
    """Whether ``logits`` is a copy of the placeholder ``ph`` made outside autograd (a model's
    ``.contiguous()`` or ``.clone()`` after the head, as OPT's): every value the same, so the
    model did nothing to the head's output but copy it."""
    return logits.grad_fn is None and not logits.requires_grad and torch.equal(logits, ph)


@contextlib.contextmanager
def capture(head: torch.nn.Linear | None) -> Iterator[HeadCapture | None]:
    """Replace ``head.forward`` by the recording placeholder for the block (restored after)."""
    if head is None:
        yield None
        return
    _check_plain(head, "the head")  # its forward may have been replaced since resolve()
    cap = HeadCapture(head)
    head.forward = cap._forward
    try:
        yield cap
    except RuntimeError as exc:
        if cap.placeholder is None:
            raise
        # the head ran: its output is a one-element placeholder, which an in-place write fails on
        raise ValueError(
            "fim_opts['lm_head']: the model's forward failed after the head ran; a forward that "
            "writes into the logits in place (a temperature, a vocabulary mask) cannot run on the "
            f"fused path: leave lm_head unset for this model ({exc})"
        ) from exc
    finally:
        del head.forward


def estimate(step: Step, cap: HeadCapture) -> list[torch.Tensor]:
    """This batch's estimate, as :func:`fimfast.hutchinson.estimate`, through ``lm_head_probe``.

    The estimate path of the HUTCHINSON types with the ``lm_head`` option (the contract:
    :mod:`fimfast.step`).

    Args:
        step: the step; ``step.rows`` are the valid rows of the placeholder logits.
        cap: the head's captured input.
    """
    rows, params, opts, dtypes = step.rows, step.params, step.opts, step.dtypes
    hidden = cap.hidden
    head = cap.head
    d = hidden.shape[-1]
    R, V = rows.count, rows.num_classes
    flat = hidden.reshape(-1, d)
    h = flat.detach() if rows.all_valid else flat.detach().index_select(0, rows.index)
    _check_finite(h)
    with torch.enable_grad():  # a computed weight (a parametrization): its graph, once
        Wg, bg = head.weight, head.bias
    W = Wg.detach()
    b = None if bg is None else bg.detach()
    # the head's parameters, found by identity (a tied weight is one entry of params)
    iw = next((i for i, p in enumerate(params) if p is Wg), None)
    ib = next((i for i, p in enumerate(params) if bg is not None and p is bg), None)
    computed = [(j, t) for j, (t, i) in enumerate(((Wg, iw), (bg, ib)))
                if i is None and t is not None and t.grad_fn is not None]
    backprop = hidden.requires_grad
    reentrant = backprop and hutchinson.has_reentrant_checkpoint(hidden)
    mode = _MODES[step.fim_type]
    S = opts.num_probes
    acc: list[torch.Tensor | None] = [None] * len(params)
    for s in range(S):
        off = step.offset + s * R * V  # probe s of row r: counters offset + (s*R + r)*V, as unfused
        gh, gw, gb = ops.lm_head_probe(h, W, b, mode, step.seed, off, backend=opts.backend)
        if rows.all_valid:
            cot = gh.view(hidden.shape)
        else:
            cot = torch.zeros(flat.shape, dtype=gh.dtype, device=gh.device)
            cot.index_copy_(0, rows.index, gh)
            cot = cot.view(hidden.shape)
        del gh
        if backprop:
            # a computed head weight may share the graph (normalized embeddings, tied): kept
            # for its pullback below
            keep = step.retain_graph or s < S - 1 or bool(computed)
            grads = hutchinson.vjp(hidden, params, cot, keep, reentrant)
        else:  # only the head is trained
            grads = [None] * len(params)
        for i, g_head in ((iw, gw), (ib, gb)):
            if i is not None:
                grads[i] = g_head if grads[i] is None else g_head.add_(grads[i])
        _pull_back(computed, (gw, gb), params, grads, keep=s < S - 1 or step.retain_graph)
        hutchinson.accumulate_squares(acc, grads, dtypes, 1.0 / S, cot, opts.backend)
        del grads, cot
    return step.filled(acc)


def _pull_back(computed: list, cots: tuple, params: list, grads: list, keep: bool) -> None:
    """Add to ``grads`` the gradients of the head's weight or bias ``(j, tensor)`` computed from
    the parameters (``weight_norm``, ``spectral_norm`` or another parametrization of the head):
    the op's gradient ``cots[j]`` back through that computation (before: never added, so those
    parameters got 0 from the fused path)."""
    if not computed:
        return
    ts = [t for _, t in computed]
    gs = [cots[j].to(t.dtype) for j, t in computed]
    for i, e in enumerate(torch.autograd.grad(ts, params, gs, retain_graph=keep,
                                              allow_unused=True)):
        if e is not None:
            grads[i] = e if grads[i] is None else grads[i] + e


def _check_finite(h: torch.Tensor) -> None:
    """Raise when a valid row of the head's input holds NaN/Inf (its logits would)."""
    with torch.no_grad():
        if bool(torch.isfinite(h.sum(-1)).all()):
            return
        nbad = int((~torch.isfinite(h)).sum())
    raise ValueError(
        f"the input of lm_head contains {nbad} non-finite value(s) (NaN/Inf) among the valid "
        "rows; the step was not taken"
    )
