"""The forward pass of one batch and the output-side cotangents of every estimator.

Every structured Fisher is assembled from vectors ``g = J^T u`` (parameter gradients, or gradients
at a layer output) of output-side columns ``u`` whose outer products average to the core FIM
(docs/math.md §3, §5):

* EXACT: the ``C`` columns ``a_c`` of a factor of ``I(z)`` per row (``sum_c a_c a_c^T = I(z)``);
* EMPIRICAL: the observed score ``e_y - p`` (a different matrix: the empirical Fisher);
* MONTE_CARLO: the sampled scores ``e_yhat - p`` of ``num_probes`` draws, scaled ``1/sqrt(S)``
  (``E[u u^T] = I(z)``);
* HUTCHINSON family: one probe vector per row and probe, scaled ``1/sqrt(S)``, *summed over the
  rows of the batch* in one backward (``E[u u^T] = I(z)`` for HUTCHINSON and HUTCHINSON_SQRT;
  ``diag(p)`` for HUTCHINSON_DG, the top-``k`` part of ``I`` for RANKK).

Per-row columns must reach the parameters one row at a time (cross-row products do not vanish);
probe columns may be summed over rows because independent probes make cross-row terms vanish in
expectation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fimfast import batch as batchlib
from fimfast import likelihoods
from fimfast.forward import _holds_mapping, _is_causal_lm, _is_encoder_decoder
from fimfast.grad_mode import inference_hint
from fimfast.guard import retained_graphs
from fimfast.hutchinson import _ENGINE, _plain
from fimfast.layout import of_output
from fimfast.ops.softmax_rest import mix_at
from fimfast.types import FIMType, Options, UnsupportedModelError


@dataclass
class Forward:
    """One batch after the forward: the valid rows and the attention mask (if any)."""

    rows: batchlib.Rows
    mask: torch.Tensor | None


def forward(model: torch.nn.Module, batch: Any, fim_type: FIMType, opts: Options) -> Forward:
    """Run the model on ``batch`` and select the valid rows (same rules as ``DiagFisher``)."""
    # an encoder-decoder's mapping batch as DiagFisher reads it: the labels also go to the model
    # (its decoder inputs), the mask of the logits is the decoder's (before, the labels were
    # taken out of the inputs and the encoder's attention_mask was the logits' mask)
    enc_dec = _holds_mapping(batch) and _is_encoder_decoder(model)
    try:
        if opts.forward_fn is not None:
            labels, mask = batchlib.labels_of(batch, enc_dec)
            output = opts.forward_fn(model, batch)
        else:
            inputs, labels, mask = batchlib.split(batch, enc_dec)
            output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    except RuntimeError as exc:
        hint = inference_hint(exc)
        if not hint:
            raise
        raise RuntimeError(f"batch: the model's forward failed{hint} (RuntimeError: {exc})") \
            from exc
    raw = batchlib.logits_of(output)
    logits, labels, mask = of_output(output, raw, labels, mask, opts)
    if logits is not raw:
        raise UnsupportedModelError(
            f"structured representations take (N, C) or (N, T, C) logits as the model returns "
            f"them; got shape {tuple(raw.shape)} with class_dim={opts.class_dim}, "
            f"batch_dim={opts.batch_dim} (use fimfast.DiagFisher for the diagonal of other "
            "layouts)"
        )
    shift = opts.shift_labels is True or (
        opts.shift_labels == "auto" and logits.dim() == 3 and _is_causal_lm(model)
    )
    rows = batchlib.rows(
        logits, labels, mask, opts.likelihood, opts.ignore_index,
        fim_type == FIMType.EMPIRICAL, shift=shift,
    )
    likelihoods.check_top_k(fim_type, opts, rows.num_classes)
    # the mask weights KFAC's layer inputs of its (N, T) shape for (N, C) logits too (a sequence
    # classifier's padded positions are left out of A, docs/structured.md "KFAC")
    return Forward(rows, mask)


def per_row_columns(
    rows: batchlib.Rows, fim_type: FIMType, opts: Options, seed: int, offset: int
) -> Iterator[torch.Tensor]:
    """``(K, R, C)`` blocks of per-row columns (EXACT, EMPIRICAL, MONTE_CARLO)."""
    flat = rows.flat
    if fim_type == FIMType.EXACT:
        yield from likelihoods.exact_columns(flat, opts, max(1, min(rows.num_classes, 64)))
    else:
        yield likelihoods.score_columns(flat, rows.labels, fim_type, opts, seed, offset)


def probe_columns(
    rows: batchlib.Rows, fim_type: FIMType, opts: Options, seed: int, offset: int
) -> torch.Tensor:
    """``(S, R, C)`` probe cotangents ``u`` of the HUTCHINSON family, scaled ``1/sqrt(S)``.

    HUTCHINSON_SQRT's coefficients ``w`` of ``log_softmax`` become the cotangent at the logits,
    ``u = w - p sum_c w_c`` (the same vector HUTCHINSON draws for the same signs).
    """
    flat = rows.flat
    u = likelihoods.probe_factor(flat, fim_type, opts, seed, offset)
    if fim_type == FIMType.HUTCHINSON_SQRT:  # exact at a confident row's leading class
        u = mix_at(u, flat)
    S = u.shape[0]
    return u if S == 1 else u / math.sqrt(S)


def one_row_each(cols: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Cotangents with a single non-zero row: every ``(k, r)`` pair of ``cols`` (K, R, C) whose
    column is non-zero, ``chunk`` pairs per ``(M, R, C)`` block."""
    K, R, C = cols.shape
    ks, rs = (cols.abs().sum(-1) != 0).nonzero(as_tuple=True)
    for s in range(0, ks.numel(), chunk):
        k, r = ks[s : s + chunk], rs[s : s + chunk]
        cot = cols.new_zeros(k.numel(), R, C)
        cot[torch.arange(k.numel(), device=cols.device), r] = cols[k, r]
        yield cot


def one_row_per_sample(
    cols: torch.Tensor, sample: torch.Tensor, chunk: int, single: bool = False
) -> Iterator[torch.Tensor]:
    """Cotangents with at most one non-zero row *per sample* (``(M, R, C)`` blocks).

    Samples never share a layer output, so a backward of such a cotangent gives every sample the
    gradient of its own single row: the ``j``-th valid row of every sample travels in slot ``j``.
    With one row per sample (``(N, C)`` logits; ``single=True`` says so without counting) the
    blocks are the columns themselves.
    """
    K, R, C = cols.shape
    counts = None if single else torch.bincount(sample)
    slots = 1 if single else int(counts.max())
    if slots == 1:
        if K <= chunk:  # one block: the columns themselves
            yield cols
            return
        for s in range(0, K, chunk):
            yield cols[s : s + chunk]
        return
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(R, device=cols.device) - starts[sample]
    pairs = [(k, j) for k in range(K) for j in range(slots)]
    for s in range(0, len(pairs), chunk):
        part = pairs[s : s + chunk]
        kk = torch.tensor([k for k, _ in part], device=cols.device)
        jj = torch.tensor([j for _, j in part], device=cols.device)
        keep = (rank.unsqueeze(0) == jj.unsqueeze(1)).to(cols.dtype)  # (M, R)
        yield cols[kk] * keep.unsqueeze(-1)


def batched_grad(
    out: torch.Tensor, inputs: list[torch.Tensor], cot: torch.Tensor
) -> list[torch.Tensor | None]:
    """``autograd.grad`` of ``out`` for a batch of cotangents ``cot`` (``(M, *out.shape)``):
    ``(M, *input.shape)`` per input (``None`` if unused). Falls back to a loop where vmap cannot
    batch an operation of the model. The graph is kept, compiled regions included
    (:func:`fimfast.guard.retained_graphs`)."""
    with retained_graphs():
        return _batched_grad(out, inputs, cot.to(out.dtype))


def _batched_grad(out, inputs, cot):
    if cot.shape[0] == 1:
        c = cot[0]
        if _ENGINE is not None and _plain(out, [t for t in inputs if isinstance(t, torch.Tensor)],
                                          c):
            # what torch.autograd.grad runs, without its argument checks and conversions
            g = _ENGINE((out,), (c,), True, False, tuple(inputs), True, False)
        else:
            g = torch.autograd.grad(out, inputs, grad_outputs=c, retain_graph=True,
                                    allow_unused=True)
        return [None if x is None else x.unsqueeze(0) for x in g]
    try:
        return list(torch.autograd.grad(out, inputs, grad_outputs=cot, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True))
    except RuntimeError:
        per = [torch.autograd.grad(out, inputs, grad_outputs=c, retain_graph=True,
                                   allow_unused=True) for c in cot]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per])
                for i in range(len(inputs))]
