"""The forward of one batch: unpack it, call the model, lay out the logits and their rows.

:class:`Forward` is what the estimator hands the per-sample engine
(:meth:`fimfast.persample.Engine.forward`): :meth:`Forward.run` is the forward as the step runs
it, :meth:`Forward.plain` the model's own forward that the engine may run once more to check a
capture against (outside DistributedDataParallel's training bookkeeping), :meth:`Forward.logits`
reads the logits back from a result. Also here: the default training loss of
:meth:`fimfast.DiagFisher.train_step` and the detection of Hugging Face causal LMs behind
``shift_labels="auto"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fimfast import batch as batchlib
from fimfast import distributed, likelihoods
from fimfast.grad_mode import inference_hint
from fimfast.layout import of_output
from fimfast.types import FIMType, Options, UnsupportedModelError


class Forward:
    """The forward of ``batch`` through ``model`` as a step of ``fim_type`` with ``opts`` runs it.

    Args:
        model: the estimator's model.
        fim_type: the estimator's type (per-sample types run a ``torch.compile`` wrapper's
            module eagerly, and EMPIRICAL needs labels).
        opts: validated options (``forward_fn``, ``class_dim``, ``batch_dim``, ``likelihood``,
            ``ignore_index``, ``shift_labels``).
        batch: the batch as the user passed it.
        train: a training step (runs the model itself, DistributedDataParallel's reducer
            included; otherwise the module inside it).
        head: the placeholder of an ``lm_head`` step, whose output the logits must be.
        on_rows: called with the rows of every forward that succeeds (the estimator announces the
            cost of EXACT there).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fim_type: FIMType,
        opts: Options,
        batch: Any,
        train: bool = False,
        head: Any = None,
        on_rows: Callable[[batchlib.Rows], None] | None = None,
    ):
        self.model, self.fim_type, self.opts, self.batch = model, fim_type, opts, batch
        self.train, self.head, self.on_rows = train, head, on_rows

    def run(self) -> tuple[Any, batchlib.Rows]:
        """The forward as the step runs it: ``(model output, rows)``."""
        return self._forward(self.train, self.head)

    def plain(self) -> tuple[Any, batchlib.Rows]:
        """The model's own forward (not the training one, no ``lm_head`` placeholder)."""
        return self._forward(False, None)

    @staticmethod
    def logits(result: tuple[Any, batchlib.Rows]) -> torch.Tensor:
        """The logits of a result of :meth:`run` or :meth:`plain`."""
        return result[1].logits

    def _forward(self, train: bool, head: Any) -> tuple[Any, batchlib.Rows]:
        # which attention mask a batch's logits take matters for mappings only
        enc_dec = _holds_mapping(self.batch) and _is_encoder_decoder(self.model)
        if self.opts.forward_fn is None:  # clear errors for bad structure
            inputs, labels, mask = batchlib.split(self.batch, enc_dec)
        else:
            inputs = None
            labels, mask = batchlib.labels_of(self.batch, enc_dec)
        output = self._call(train, inputs)
        return output, self.rows_of(output, labels, mask, head)

    def rows_of(self, output: Any, labels: Any, mask: Any, head: Any = None) -> batchlib.Rows:
        """The rows of a model ``output`` with the batch's ``labels`` and ``mask`` (checked)."""
        logits = batchlib.logits_of(output)
        if head is not None:
            head.check_output(logits)
        elif not logits.requires_grad and torch.is_grad_enabled():
            raise UnsupportedModelError(
                "the model's output is detached from its parameters (a stop-gradient such as "
                "model(x).detach(), or logits built outside autograd): autograd sees no "
                "parameter, so no Fisher can be formed; return logits attached to the graph"
            )
        rows = self._rows(output, logits, labels, mask)
        likelihoods.check_top_k(self.fim_type, self.opts, rows.num_classes)
        if self.on_rows is not None:
            self.on_rows(rows)
        return rows

    def _call(self, train: bool, inputs: Any) -> Any:
        """The model's output on ``inputs`` (an error naming the batch if the call fails)."""
        fwd, batch = self.opts.forward_fn, self.batch
        # a Fisher-only step runs DDP's wrapped module: no reducer bookkeeping, no collective
        module = self.model if train else distributed.forward_module(self.model)
        if self.fim_type.is_per_sample:
            # a torch.compile'd module runs eagerly: the layer capture needs module calls (the
            # graph check refuses taps inside a compiled region anyway)
            module = _eager(module)
        try:
            if fwd is not None:
                return fwd(self.model, batch)
            if isinstance(inputs, dict):
                return module(**inputs)
            return module(inputs)
        except CALL_ERRORS as exc:
            raise call_failed(exc, inputs, fwd) from exc

    def _rows(self, output: Any, logits: torch.Tensor, labels, mask) -> batchlib.Rows:
        """The valid rows of the logits (masks, ``ignore_index``, shifted labels)."""
        o = self.opts
        logits, labels, mask = of_output(output, logits, labels, mask, o)
        need = self.fim_type == FIMType.EMPIRICAL
        return batchlib.rows(
            logits, labels, mask, o.likelihood, o.ignore_index, need,
            shift=shift_labels(self.model, o, logits),
        )


# the exceptions of a model's forward that :func:`call_failed` explains
CALL_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, AssertionError)


def call_failed(exc: Exception, inputs: Any, fwd: Callable | None) -> Exception:
    """The error of a forward that raised ``exc`` (one of :data:`CALL_ERRORS`) on ``inputs``
    (``fwd``: the ``forward_fn`` option), naming the batch and how the model was called."""
    how = (
        "inputs as a tensor via model(x)" if not isinstance(inputs, dict) and fwd is None
        else "a mapping via model(**batch)" if fwd is None else "forward_fn"
    )
    hint = "" if fwd is not None else (
        f"; fimfast called it with {how}: pass fim_opts['forward_fn'] = "
        "lambda model, batch: model(...) for a forward that takes other arguments "
        "(keyword inputs, several tensors)"
    )
    hint = inference_hint(exc) or hint
    return _with_context(exc, f"batch: the model's forward failed on this batch{hint}")


def shift_labels(model: torch.nn.Module, opts: Options, logits: torch.Tensor) -> bool:
    """``shift_labels`` resolved: ``"auto"`` shifts token-level logits of causal LMs."""
    opt = opts.shift_labels
    if opt == "auto":
        return logits.dim() == 3 and _is_causal_lm(model)
    return bool(opt)


def _eager(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``module``."""
    if "torch._dynamo" not in sys.modules:
        return module
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def _with_context(exc: Exception, context: str) -> Exception:
    try:
        return type(exc)(f"{context} ({type(exc).__name__}: {exc})")
    except Exception:  # an exception class with a different constructor
        return exc


def _is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the module it wraps) is a Hugging Face causal-LM class."""
    if "transformers" not in sys.modules:
        return False
    names = _causal_lm_names()
    for m in (model, _attr(model, "module"), _attr(model, "_orig_mod")):
        if m is not None and any(c.__name__ in names for c in type(m).__mro__):
            return True
    return False


def _holds_mapping(batch: Any) -> bool:
    """Whether ``batch`` is a mapping or a tuple/list whose inputs are (the batches whose mask
    :func:`fimfast.batch.split` reads); a tensor or ``(tensor, ...)`` is told without an
    ``isinstance`` of an abstract class."""
    if isinstance(batch, (tuple, list)):
        if not batch or isinstance(batch[0], torch.Tensor):
            return False
        batch = batch[0]
    return not isinstance(batch, torch.Tensor) and isinstance(batch, Mapping)


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the module it wraps) has a Hugging Face config that says
    ``is_encoder_decoder`` (its batch's ``attention_mask`` is the encoder's: fimfast.batch)."""
    for m in (model, _attr(model, "module"), _attr(model, "_orig_mod")):
        if m is None:  # nothing wrapped (getattr of None would raise and catch)
            continue
        config = _attr(m, "config")
        if config is not None and getattr(config, "is_encoder_decoder", False) is True:
            return True
    return False


_MODULE_GETATTR = torch.nn.Module.__getattr__


def _attr(m: Any, name: str) -> Any:
    """``getattr(m, name, None)``, without the ``AttributeError`` that ``nn.Module`` raises (and
    formats) for a missing name: a module whose class keeps torch's ``__getattr__`` is looked up
    where that ``__getattr__`` looks (a step asks a plain model for three names it lacks)."""
    ty = type(m)
    if (
        isinstance(m, torch.nn.Module)
        and ty.__getattr__ is _MODULE_GETATTR
        # not a class attribute (hasattr of the class would raise and catch for every miss)
        and not any(name in k.__dict__ for k in ty.__mro__)
    ):
        d = m.__dict__
        if name in d:
            return d[name]
        for store in ("_parameters", "_buffers", "_modules"):
            table = d.get(store)
            if table is not None and name in table:
                return table[name]
        return None
    return getattr(m, name, None)


_CAUSAL_LM_NAMES: frozenset[str] | None = None


def _causal_lm_names() -> frozenset[str]:
    global _CAUSAL_LM_NAMES
    if _CAUSAL_LM_NAMES is None:
        try:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        except Exception:  # transformers too old or broken: nothing is a causal LM
            _CAUSAL_LM_NAMES = frozenset()
        else:
            names: set[str] = set()
            for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                names.update([v] if isinstance(v, str) else v)
            _CAUSAL_LM_NAMES = frozenset(names)
    return _CAUSAL_LM_NAMES


def default_loss(opts: Options) -> Callable:
    """The default training loss ``loss(logits, labels)`` of the likelihood (mean over rows)."""
    if opts.likelihood == "categorical":
        return lambda z, y: torch.nn.functional.cross_entropy(z, y)
    if opts.likelihood == "bernoulli":
        return lambda z, y: torch.nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype))
    return lambda z, y: torch.nn.functional.mse_loss(z, y.to(z.dtype)) / (2 * opts.sigma2)


def default_loss_all_rows(opts: Options, rows: batchlib.Rows) -> torch.Tensor:
    """The default loss over the valid rows, without a copy of them for categorical logits.

    Cross-entropy runs on every row with ``ignore_index`` on the rows left out, which is the mean
    over the valid rows (and, with ``shift_labels``, a causal LM's own loss).
    """
    if opts.likelihood != "categorical" or rows.all_valid:
        return default_loss(opts)(rows.flat, rows.labels)
    labels = torch.full(
        (rows.flat_all.shape[0],), opts.ignore_index, dtype=torch.int64, device=rows.index.device
    )
    labels.index_copy_(0, rows.index, rows.labels.to(torch.int64))
    return torch.nn.functional.cross_entropy(rows.flat_all, labels, ignore_index=opts.ignore_index)
