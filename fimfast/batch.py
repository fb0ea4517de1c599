"""Batch unpacking, the forward pass, and the rows (samples or tokens) of the logits.

Accepted batches: ``(inputs, labels)``, ``(inputs,)``, a bare tensor, or a mapping (Hugging Face
style: ``labels``/``label`` is taken out and the rest goes to ``model(**batch)``). A
``forward_fn(model, batch) -> output`` option handles anything else (labels are still read from a
tuple's second element or a mapping's ``labels``/``label`` key).

Outputs may be a tensor, a tuple/list (first element) or an object with ``.logits`` (a Hugging Face
``ModelOutput``). Logits are ``(N, C)`` (one sample per row) or ``(N, T, C)`` (token level): tokens
whose label equals ``ignore_index`` or whose ``attention_mask`` is 0 are left out of the Fisher and
of the count.

**Causal language models** (``shift_labels``). A Hugging Face causal LM returns logits aligned
with its inputs and shifts the labels inside its own loss: the logits at position ``t`` predict the
label at ``t + 1``. With ``shift_labels=True`` the row of position ``t`` is paired with
``labels[:, t + 1]`` exactly as the model's loss does; the last position has no label and is left
out, and a pair counts only when ``labels[:, t + 1] != ignore_index`` and, with an
``attention_mask``, both positions ``t`` and ``t + 1`` are real tokens. (With right padding and
``-100`` labels on the padding, as Hugging Face's collators build them, this is exactly the set of
terms of the model's loss. With left padding, the model's loss also keeps the pair whose input is
the last padding position; fimfast leaves it out, since its logits are not a prediction of the
model on real text.) ``shift_labels="auto"`` (the default) shifts for the classes Hugging Face
lists as causal LMs (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, e.g. ``GPT2LMHeadModel``,
``LlamaForCausalLM``) and for no other model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fimfast._lazy import once
from fimfast.dtypes import compute_dtype
from fimfast.finite import check_finite, label_range_and_finite, rows_all_valid

_LABEL_KEYS = ("labels", "label")
# inputs of a Hugging Face encoder-decoder: the batch's attention_mask is then the encoder's
_DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def _mask_of(batch: Mapping, encoder_decoder: bool) -> Any:
    """The attention mask of the logits' tokens in a mapping batch: ``attention_mask``, except
    for an encoder-decoder (decoder inputs in the batch, or ``encoder_decoder``: a model whose
    config says ``is_encoder_decoder``), whose ``attention_mask`` masks the encoder's tokens and
    whose decoder logits take ``decoder_attention_mask`` (or no mask: the labels'
    ``ignore_index`` marks padding, as in the model's own loss)."""
    if encoder_decoder or any(k in batch for k in _DECODER_KEYS):
        return batch.get("decoder_attention_mask")
    return batch.get("attention_mask")


@dataclass
class Rows:
    """The valid rows of one batch's logits.

    Attributes:
        logits: ``(N, C)`` or ``(N, T, C)`` model output (still attached to the graph).
        labels: ``(R,)`` (categorical) or ``(R, C)`` labels of the valid rows (with
            ``shift_labels``, the label of row ``(n, t)`` is ``labels[n, t + 1]``), or ``None``.
        index: ``(R,)`` int64 row indices into ``logits.reshape(-1, C)``.
        sample: ``(R,)`` int64 sample (batch) index of every row.
        num_samples: ``N``.
        all_valid: every row of ``logits`` is valid (then :attr:`flat` is a view, not a copy).
    """

    logits: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor
    sample: torch.Tensor
    num_samples: int
    all_valid: bool

    @property
    def num_classes(self) -> int:
        """``C``, the last dimension of the logits."""
        return int(self.logits.shape[-1])

    @property
    def count(self) -> int:
        """Number of valid rows (samples or unmasked tokens)."""
        return int(self.index.numel())

    @property
    def flat_all(self) -> torch.Tensor:
        """``(N*T, C)`` view of every row of the logits, valid or not (attached to the graph): the
        logits themselves when they are ``(N, C)``."""
        if self.logits.dim() == 2:
            return self.logits
        return self.logits.reshape(-1, self.num_classes)

    @once
    def flat(self) -> torch.Tensor:
        """``(R, C)`` valid rows of ``logits`` (attached to the graph).

        A view when every row is valid; otherwise a copy made on first use (the one-backward
        estimators never ask for it, so masked token batches cost no extra (tokens x C) tensor).
        """
        if self.all_valid:
            return self.flat_all
        return self.flat_all.index_select(0, self.index)

    @once
    def detached(self) -> torch.Tensor:
        """``logits.detach()``, made once (the row checks may have made it already)."""
        return self.logits.detach()

    def rows_chunk(self, start: int, stop: int) -> torch.Tensor:
        """Valid rows ``start:stop`` as ``(stop - start, C)``, attached (a view if all valid)."""
        if self.all_valid:
            return self.flat_all[start:stop]
        return self.flat_all.index_select(0, self.index[start:stop])


def _type_name(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}"
    return type(x).__name__


def split(
    batch: Any, encoder_decoder: bool = False
) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
    """``(model_input, labels, attention_mask)`` of a batch (the mask of the logits' tokens:
    :func:`_mask_of`).

    ``model_input`` is a tensor (called as ``model(x)``) or a dict (called as ``model(**d)``).
    """
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if type(batch) not in (tuple, list) and isinstance(batch, Mapping):  # (ABC check last)
        rest = dict(batch)
        labels = None
        for k in _LABEL_KEYS:
            if k in rest:
                labels = rest.pop(k)
                if encoder_decoder and not any(d in rest for d in _DECODER_KEYS):
                    # a Hugging Face encoder-decoder makes its decoder inputs from the labels
                    # (shifted right), as in training; without them it would decode something else
                    rest[k] = labels
                break
        return rest, labels, _mask_of(rest, encoder_decoder)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("batch must not be an empty tuple/list")
        if len(batch) > 2:
            raise ValueError(
                "batch must be (inputs, labels), (inputs,), a tensor or a mapping; got a "
                f"{type(batch).__name__} of {len(batch)} elements "
                f"({', '.join(_type_name(b) for b in batch)}); pass forward_fn= for other layouts"
            )
        inputs = batch[0]
        labels = batch[1] if len(batch) == 2 else None
        if type(inputs) is not torch.Tensor and isinstance(inputs, Mapping):
            return dict(inputs), labels, _mask_of(inputs, encoder_decoder)
        return inputs, labels, None
    raise TypeError(
        "batch must be (inputs, labels), (inputs,), a tensor or a mapping; got "
        f"{type(batch).__name__}; pass forward_fn= for other layouts"
    )


def labels_of(
    batch: Any, encoder_decoder: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(labels, attention_mask)`` of a batch whose forward is done by ``forward_fn``."""
    if type(batch) not in (tuple, list) and isinstance(batch, Mapping):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return labels, _mask_of(batch, encoder_decoder)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1], None
    return None, None


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (tensor, tuple/list, or ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        if output[0].dim() == 0:
            raise ValueError(
                "the model returned a tuple whose first element, which fimfast reads as the "
                "logits, is a scalar (a loss?): return (logits, ...), or pass "
                "fim_opts['forward_fn'] = lambda model, batch: model(...)[i]"
            )
        return output[0]
    raise TypeError(
        "the model output must be a tensor, a tuple whose first element is the logits, or an "
        f"object with a .logits tensor; got {type(output).__name__}"
    )


def batch_size(batch: Any, dim: int = 0) -> int | None:
    """Size of dim ``dim`` (the batch axis) of the first tensor found in a batch (``None`` if
    none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[dim]) if batch.dim() > dim else None
    vals = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(vals, (tuple, list)) or isinstance(batch, Mapping):
        for v in vals:
            n = batch_size(v, dim) if isinstance(v, (torch.Tensor, Mapping, tuple, list)) else None
            if n is not None:
                return n
    return None


def slice_batch(batch: Any, start: int, stop: int, n: int) -> Any:
    """Samples ``start:stop`` of a batch: tensors whose leading dimension is ``n`` are sliced."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop, n) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(v, start, stop, n) for v in batch)
    if isinstance(batch, list):
        return [slice_batch(v, start, stop, n) for v in batch]
    return batch


def _checked_labels(
    labels, logits: torch.Tensor, likelihood: str, ignore_index: int, shift: bool, valid
) -> torch.Tensor:
    """Check ``labels`` against the logits; clears the rows of ``ignore_index`` in ``valid`` and
    returns the labels on the logits' device (shifted if ``shift``)."""
    N, C = int(logits.shape[0]), int(logits.shape[-1])
    lead = tuple(logits.shape[:-1])
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor; got {type(labels).__name__}")
    labels = labels.to(logits.device)
    if likelihood == "categorical":
        if not _class_indices(labels):
            raise ValueError(
                f"labels must be integer class indices for a categorical likelihood; got dtype "
                f"{labels.dtype}"
            )
        if tuple(labels.shape) != lead:
            raise ValueError(
                f"labels must have shape {lead} to match logits {tuple(logits.shape)}; "
                f"got {tuple(labels.shape)}"
            )
        if shift:  # row t takes the label of t + 1; the last row gets ignore_index
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        keep = labels != ignore_index
        bad = keep & ((labels < 0) | (labels >= C))
        if bool(bad.any()):
            v = labels[bad].flatten()[:5].tolist()
            raise ValueError(
                f"labels must be in [0, {C - 1}] (or ignore_index={ignore_index}); got {v}"
            )
        valid &= keep
    else:
        if labels.shape != logits.shape and not (
            labels.dim() == 1 and C == 1 and labels.shape[0] == N
        ):
            raise ValueError(
                f"labels must have shape {tuple(logits.shape)} for a {likelihood} likelihood; "
                f"got {tuple(labels.shape)}"
            )
        labels = labels.reshape(logits.shape).to(compute_dtype(logits.dtype))
        if shift:
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 0, 0, 1))
    return labels


def _real_tokens(mask, logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """The rows ``attention_mask`` marks as real tokens (both ends of a pair when ``shift``)."""
    lead = tuple(logits.shape[:-1])
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must have shape {lead} to match the logits; got {got}")
    real = mask.to(logits.device) != 0
    if shift:  # both the input position t and the predicted position t + 1 are real tokens
        real = torch.nn.functional.pad(real[:, :-1] & real[:, 1:], (0, 1), value=False)
    return real


def rows(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    likelihood: str,
    ignore_index: int,
    need_labels: bool,
    shift: bool = False,
) -> Rows:
    """Validate the logits (and labels) and select the valid rows.

    Args:
        logits: ``(N, C)`` or ``(N, T, C)`` model output.
        labels: ``(N,)``/``(N, T)`` class indices (categorical) or tensors shaped like the logits
            (bernoulli, gaussian), or ``None``.
        mask: ``(N, T)`` attention mask (0 = padding), or ``None``; ignored for 2-D logits.
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
        ignore_index: label value of the rows left out (categorical).
        need_labels: raise when ``labels`` is ``None`` (EMPIRICAL, ``train_step``).
        shift: pair the logits at position ``t`` with the label at ``t + 1`` (causal LMs; see the
            module docstring). Needs 3-D logits.

    Raises:
        ValueError: logits not 2-D/3-D, empty, non-finite; labels of the wrong shape, dtype or range
            (each message names the argument and shows what came).
    """
    if (  # the common case decided in one call of the extension, on the CPU
        labels is not None and likelihood == "categorical" and not shift
        and rows_all_valid(logits, labels, ignore_index)  # plain tensors, checked first
        and (mask is None or logits.dim() == 2)
    ):
        return _every_row(logits, labels)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor; got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(
            "logits must be 2-D (N, C) or 3-D (N, T, C); got shape "
            f"{tuple(logits.shape)} from the model"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got dtype {logits.dtype}")
    if shift and logits.dim() != 3:
        raise ValueError(
            f"shift_labels=True needs token-level logits (N, T, C); got shape {tuple(logits.shape)}"
        )
    N, C = int(logits.shape[0]), int(logits.shape[-1])
    if N == 0 or logits.numel() == 0:
        raise ValueError(
            f"batch is empty: the model returned logits of shape {tuple(logits.shape)}"
        )
    if likelihood == "categorical" and C < 2:
        raise ValueError(f"logits must have C >= 2 classes for a categorical likelihood; got C={C}")
    lead = tuple(logits.shape[:-1])
    if labels is not None or not need_labels:
        fast = _rows_all_valid(logits, labels, mask, likelihood, ignore_index, shift, lead)
        if fast is not None:
            return fast
    valid = torch.ones(lead, dtype=torch.bool, device=logits.device)
    if shift:
        valid[:, -1] = False  # the last position predicts a token beyond the sequence
    if labels is not None:
        labels = _checked_labels(labels, logits, likelihood, ignore_index, shift, valid)
    elif need_labels:
        raise ValueError("labels are required for fim_type='empirical'; the batch has none")
    if mask is not None and logits.dim() == 3:
        valid &= _real_tokens(mask, logits, shift)
    index = valid.reshape(-1).nonzero().squeeze(-1)
    if index.numel() == 0:
        raise ValueError("batch is empty: every token is masked (attention_mask / ignore_index)")
    all_valid = index.numel() == valid.numel()
    if labels is not None:
        labels = labels.reshape(-1) if likelihood == "categorical" else labels.reshape(-1, C)
    return _selected(logits, labels, index, all_valid)


def _class_indices(labels: torch.Tensor) -> bool:
    """Whether ``labels`` has a dtype of class indices (integer, not bool)."""
    return not (labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex())


def _selected(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    index: torch.Tensor,
    all_valid: bool,
    finite: bool = False,
) -> Rows:
    """:class:`Rows` of the rows ``index`` of ``logits`` (flat ``labels`` of every row), after
    checking that those rows are finite (``finite=True``: the caller checked already)."""
    if not finite:
        check_finite(logits.reshape(-1, logits.shape[-1]), index, all_valid)
    if labels is not None and not all_valid:
        labels = labels.index_select(0, index)
    per = 1 if logits.dim() == 2 else int(logits.shape[1])
    return Rows(
        logits=logits,
        labels=labels,
        index=index,
        sample=index if per == 1 else torch.div(index, per, rounding_mode="floor"),
        num_samples=int(logits.shape[0]),
        all_valid=all_valid,
    )


def _rows_all_valid(logits, labels, mask, likelihood, ignore_index, shift, lead) -> Rows | None:
    """The common case in a few operations: categorical labels (or none), no padding mask to
    apply, no shift, every label in ``[0, C)``. ``None`` when the general path must decide."""
    if likelihood != "categorical" or shift or (mask is not None and logits.dim() == 3):
        return None
    if labels is not None:
        if (
            not isinstance(labels, torch.Tensor)
            or not _class_indices(labels)
            or tuple(labels.shape) != lead
            or labels.device != logits.device
        ):
            return None  # the general path converts, or raises with the full message
        # a non-finite sum of the logits sends the batch to the general path, which tells a
        # NaN/Inf from an overflow
        detached = logits.detach()
        lo, hi, finite = label_range_and_finite(labels, detached)
        if not finite or lo < 0 or hi >= int(logits.shape[-1]) or lo <= ignore_index <= hi:
            return None
        if labels.dim() != 1:
            labels = labels.reshape(-1)
    index = _arange(math.prod(lead), logits.device)
    out = _selected(logits, labels, index, True, finite=labels is not None)
    if labels is not None:
        out.detached = detached
    return out


def _every_row(logits: torch.Tensor, labels: torch.Tensor) -> Rows:
    """:class:`Rows` of CPU logits whose rows are all valid with these labels (checked)."""
    shape = logits.shape
    n = shape[0]
    if len(shape) == 2:
        index = _arange(n, _CPU)
        return Rows(logits, labels, index, index, n, True)
    index = _arange(n * shape[1], _CPU)
    return Rows(logits, labels.reshape(-1), index, _sample_of(index, shape[1]), n, True)


def _sample_of(index: torch.Tensor, per: int) -> torch.Tensor:
    """The sample of each row of ``index`` (an ``arange`` on the CPU), ``per`` rows per sample."""
    if per == 1:
        return index
    return _kept((index.numel(), per), lambda: torch.div(index, per, rounding_mode="floor"))


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` on ``device``."""
    return _kept((n, device), lambda: torch.arange(n, device=device))


def _kept(key: tuple, make) -> torch.Tensor:
    """``make()``, kept under ``key`` for the next steps (read-only row indices)."""
    t = _ARANGES.get(key)
    if t is None:
        if len(_ARANGES) >= 16:
            _ARANGES.clear()
        t = _ARANGES[key] = make()
    return t


_CPU = torch.device("cpu")
_ARANGES: dict[tuple, torch.Tensor] = {}
