"""The checks of a batch that read the device: the range of the labels and the finiteness of the
logits (:func:`fimfast.batch.rows`).

A step reads as little as it can on the host. On the CPU, with the compiled extension, the common
case (categorical labels, every row valid) is one call that reads the labels and the logits once
(``label_range_finite`` of csrc/cpu/label_range_finite.cpp: the ends of the labels' range and
whether every logit is finite, decided on the bits); elsewhere it costs two kernels, ``aminmax``
of the labels and one sum of the logits, and one host read (:func:`label_range_and_finite`). Only
logits found not finite (or a sum that is not) make :func:`check_finite` count the entries that
are not, for its message.
"""

from __future__ import annotations

import math

import torch

from fimfast import _ext
from fimfast.dtypes import compute_dtype

__all__ = [
    "all_finite", "check_finite", "gram_finite", "grams_finite", "is_square_dense",
    "label_range_and_finite", "rows_all_valid",
]


# the integer dtype of each accumulation dtype's bits, and the exponent field of those bits
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
_EXPONENT = {torch.float32: (23, 0xFF), torch.float64: (52, 0x7FF)}


# the extension's (label_range_finite, all_finite, rows_all_valid), () without them; found at the
# first check
_HOST: tuple | None = None
_TENSOR = torch.Tensor


def _host() -> tuple:
    """The extension's row checks (:data:`_HOST`), looked up once."""
    global _HOST
    if _HOST is None:
        fns = tuple(map(_ext.host_function, ("label_range_finite", "all_finite", "rows_all_valid")))
        _HOST = fns if None not in fns else ()
    return _HOST


def rows_all_valid(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> bool:
    """Whether the extension finds every row of plain CPU logits valid with these categorical
    labels, in one call (csrc/cpu/label_range_finite.cpp: 2-D or 3-D floating logits of ``C >=
    2`` classes, labels of their leading shape in ``[0, C)`` and none equal to ``ignore_index``,
    every logit finite). ``False`` leaves the decision, and its messages, to the Python checks
    (:func:`fimfast.batch.rows`); always ``False`` without the extension."""
    return (
        type(logits) is _TENSOR and type(labels) is _TENSOR and logits.is_cpu
        and bool(_HOST or _host()) and _HOST[2](logits, labels, ignore_index)
    )


def _on_host(t: torch.Tensor) -> bool:
    """Whether the extension's checks can read ``t``: a plain CPU tensor (no subclass, whose
    data may live elsewhere)."""
    return t.is_cpu and type(t) is _TENSOR


def label_range_and_finite(
    labels: torch.Tensor, logits: torch.Tensor, one_read: bool | None = None, host: bool = True
) -> tuple[int, int, bool]:
    """``(min label, max label, whether the logits are finite)``.

    On the CPU with the extension (and ``host``): one call reading each tensor once, exact (every
    logit is finite). Otherwise two kernels (``aminmax``, ``sum``) and, off the CPU, one host
    read (``one_read``, the default there): the sum of the logits is finite.

    The one read is a ``tolist()`` of the two ends of the range and the bits of the sum, stacked
    into one integer tensor (one more kernel; ``aminmax`` and the float's bits promote to the same
    integer dtype). On the CPU a read costs no synchronisation and the three scalars are read as
    they are (the stack alone costs more than the three reads there). The sum is accumulated in
    float32 (float64 for float64 logits) and is finite when every logit is (and nothing
    overflows).
    """
    if host and _on_host(logits) and _on_host(labels) and labels.numel() and (_HOST or _host()):
        return _HOST[0](labels, logits)
    total = _total(logits.detach() if logits.requires_grad else logits)
    lo, hi = torch.aminmax(labels)
    if one_read is None:
        one_read = logits.device.type != "cpu"
    if not one_read:
        return int(lo), int(hi), math.isfinite(float(total))
    lo, hi, bits = torch.stack([lo, hi, total.view(_BITS[total.dtype])]).tolist()
    return lo, hi, _finite_bits(bits, total.dtype)


def _finite_bits(bits: int, dtype: torch.dtype) -> bool:
    """Whether the float of ``dtype`` whose bits read as the integer ``bits`` (sign-extended
    when promoted to a wider integer) is finite: its exponent field is not all ones."""
    shift, ones = _EXPONENT[dtype]
    return (bits >> shift) & ones != ones


def _total(flat: torch.Tensor) -> torch.Tensor:
    """The sum of every entry, in float32 (float64 for float64 logits): finite when every entry
    is (and no sum overflows; :func:`check_finite` tells the two apart)."""
    if flat.dtype in (torch.float32, torch.float64):  # already its accumulation dtype
        return flat.sum()
    return flat.sum(dtype=torch.float32)


def check_finite(flat_all: torch.Tensor, index: torch.Tensor, all_valid: bool) -> None:
    """Raise when a valid row holds NaN/Inf, without a (rows x C) temporary.

    On the CPU with the extension, one read of every row says whether all are finite (valid or
    not); elsewhere one float32 (float64 for float64 logits) sum over the valid rows is finite
    when every entry is. Only when not (a NaN/Inf, or an overflow that would need entries near
    1e32) are the entries counted, row by row, and the step refused only if one of a valid row is
    not finite.
    """
    flat = flat_all.detach()  # nothing below is recorded
    if _on_host(flat) and (_HOST or _host()) and _HOST[1](flat):
        return
    acc = compute_dtype(flat.dtype)
    if all_valid:
        total = _total(flat)
    else:
        total = flat.sum(-1, dtype=acc).index_select(0, index).sum()
    if math.isfinite(float(total)):
        return
    sums = flat.sum(-1, dtype=acc)
    if not all_valid:
        sums = sums.index_select(0, index)
    bad = ~torch.isfinite(sums)
    bad_rows = index[bad] if not all_valid else bad.nonzero().reshape(-1)
    nbad = sum(int((~torch.isfinite(flat[int(r)])).sum()) for r in bad_rows)
    if nbad == 0:
        return  # only the sums overflowed
    raise ValueError(
        f"logits contain {nbad} non-finite value(s) (NaN/Inf) among the valid rows; "
        "the step was not taken"
    )


def all_finite(tensors) -> bool:
    """Whether every entry of every floating tensor of ``tensors`` is finite (a sparse tensor: its
    values), exactly. A plain CPU tensor is read once by the extension's check on the bits; the
    others cost one sum each and one host read, and only a sum that is not finite (a NaN/Inf, or
    finite entries whose sum overflows) makes the entries be counted."""
    rest = []
    for t in tensors:
        t = t._values() if t.is_sparse else t.detach()
        if not t.is_floating_point() or not t.numel():
            continue
        if _on_host(t) and (_HOST or _host()):
            if not _HOST[1](t):
                return False
        else:
            rest.append(t)
    if not rest or bool(torch.isfinite(torch.stack([_total(t) for t in rest])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in rest)


def is_square_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is a dense floating square matrix (a Gram matrix :func:`grams_finite` can
    read from its diagonal)."""
    return (t.dim() == 2 and t.shape[0] == t.shape[1] and not t.is_sparse
            and t.is_floating_point())


def grams_finite(ts: list[torch.Tensor]) -> bool | None:
    """Whether sums of outer products ``sum_n w_n a_n a_n^T`` (``w_n >= 0``; any positive
    semi-definite sums, dense square matrices of :func:`is_square_dense`) are all finite, read
    from their diagonals alone (one gather) when that settles it: a NaN/Inf in some ``a_n`` makes
    its diagonal entry NaN/Inf, and ``|M_ij| <= sqrt(M_ii M_jj)``, so a diagonal below
    ``finfo.max / 1024`` leaves no room for an entry off it to overflow (rounding adds a factor
    ``1 + n eps``). ``None`` where the diagonals do not settle it (larger entries, or a matrix
    that is not square): read every entry then."""
    diags, top = [], float("inf")
    for t in ts:
        if not is_square_dense(t):
            return None
        if t.numel():
            diags.append(t.diagonal())
            top = min(top, torch.finfo(t.dtype).max / 1024)
    if not diags:
        return True
    big = float(torch.cat(diags).abs().amax())  # NaN when some entry is
    if not math.isfinite(big):
        return False
    return True if big <= top else None


def gram_finite(t: torch.Tensor) -> bool | None:
    """:func:`grams_finite` of one matrix."""
    return grams_finite([t])


def left_out_checked(rows, estimate, names: list[str], hidden: torch.Tensor | None = None):
    """``estimate`` (a step's batch estimate, before :meth:`fimfast.state.State.commit`),
    refused when it is not finite because of the rows left out of the Fisher.

    Only the valid rows' logits are checked by :func:`check_finite`; a row left out (its label
    ``ignore_index``, its ``attention_mask`` 0) may hold NaN/Inf, as a padded query whose every
    key is masked does. Its cotangent is zero, but the backward multiplies that zero by what the
    forward saved (0 x NaN = NaN), so the gradients of every parameter upstream are NaN. With
    every row valid (the common step) nothing is read; otherwise one sum over the logits (the
    head's input with ``lm_head``), and the estimate is read only when that sum is not finite.
    Returns the estimate to commit (a :class:`fimfast.batch_sums.Sums` formed into tensors when it
    was read)."""
    if rows.all_valid:
        return estimate
    flat = (rows.logits if hidden is None else hidden).detach()
    flat = flat.reshape(-1, flat.shape[-1])
    if _on_host(flat) and (_HOST or _host()) and _HOST[1](flat):
        return estimate
    if math.isfinite(float(_total(flat))):
        return estimate
    if hasattr(estimate, "fold_into"):  # a Sums: its kept products formed
        estimate = estimate.tensors()
    tensors = getattr(estimate, "factors", estimate)  # a Squares: finite with its factors
    bad = [n for n, t in zip(names, tensors) if t is not None
           and not bool(torch.isfinite(t._values() if t.is_sparse else t).all())]
    if not bad:
        return estimate
    nbad = int((~torch.isfinite(flat)).sum())
    what = "logit(s)" if hidden is None else "entries of the lm_head input"
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise ValueError(
        f"the rows left out of the Fisher (labels equal to ignore_index, attention_mask 0) hold "
        f"{nbad} non-finite {what} (NaN/Inf), and the backward multiplies their zero cotangent "
        f"by them (0 x NaN = NaN): the diagonal of {shown} is not finite. Make those rows "
        "finite (a finite fill value, torch.nan_to_num, or an attention mask that leaves every "
        "query a key); the step was not taken"
    )
