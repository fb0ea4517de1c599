"""The seed-compatible functional API: ``diag_fim_step``, ``get_diag_fim``, ``zero_diag_fim``.

State lives in fimfast (a ``weakref.WeakKeyDictionary`` from model to one :class:`DiagFisher` per
type), never on ``param.grad`` and never as attributes of the parameters. Several types can be
accumulated side by side on one model.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from fimfast.estimator import DiagFisher
from fimfast.grad_mode import autograd_on
from fimfast.types import FIMType, check_ema, check_reduction

_STATES: weakref.WeakKeyDictionary[torch.nn.Module, dict[FIMType, DiagFisher]] = (
    weakref.WeakKeyDictionary()
)


def _model_states(model: torch.nn.Module) -> dict[FIMType, DiagFisher]:
    """The estimators of ``model`` by type (its entry of :data:`_STATES`, made on first use).

    The last model asked for is kept by a weak reference with its entry (:data:`_LAST`): the
    three calls of a per-batch cycle (``zero_diag_fim``, ``diag_fim_step``, ``get_diag_fim``)
    then make no weak reference each (``WeakKeyDictionary.setdefault`` does, with its callback).
    An entry is never replaced while its model lives, so the kept one is the one in
    :data:`_STATES`."""
    global _LAST
    last = _LAST  # (read once: another thread may replace it)
    if model is not None and last[0]() is model:  # (a dead reference gives None)
        return last[1]
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    states = _STATES.setdefault(model, {})
    _LAST = (weakref.ref(model), states)
    return states


def _nothing() -> None:
    return None


# (weak reference to the last model _model_states was asked for, its entry of _STATES)
_LAST: tuple = (_nothing, None)


def zero_diag_fim(model: torch.nn.Module, fim_type: FIMType | str | None = None) -> None:
    """Reset this model's accumulated Fisher for ``fim_type`` (every type when ``None``)."""
    states = _model_states(model)
    which = None if fim_type is None else FIMType.parse(fim_type)
    # the estimators stay (their per-structure caches survive); the next step restarts them as
    # new ones: fresh state, options, reduction, ema and random stream
    for t, est in states.items():
        if which is None or t == which:
            est.reset()
            est._restart = True


@autograd_on
def diag_fim_step(
    model: torch.nn.Module,
    batch: Any,
    fim_type: FIMType | str = FIMType.HUTCHINSON,
    fim_opts: Mapping[str, Any] | None = None,
    ema: float | None = None,
    reduction: str = "sum",
) -> None:
    """Estimate the diagonal Fisher on ``batch`` and accumulate it for ``(model, fim_type)``.

    Args:
        model: the network (its ``.grad``, mode and parameters are left untouched).
        batch: ``(inputs, labels)``, ``(inputs,)``, a tensor or a mapping
            (see :mod:`fimfast.batch`).
        fim_type: a :class:`FIMType` or its string value.
        fim_opts: ``num_probes``, ``lr_power_itrs``, ``top_k``, ``seed``, ``backend``,
            ``class_chunk``, ``rankk_solver``, ``likelihood``, ``sigma2``, ``ignore_index``,
            ``forward_fn``, ``shift_labels``, ``class_dim``, ``batch_dim``, ``sequence_rows``,
            ``lm_head``, ``distributed``, ``process_group`` (see :class:`fimfast.Options`;
            unknown keys raise ``ValueError``).
        ema: ``None`` or a decay in ``(0, 1)``; must stay the same between resets.
        reduction: ``"sum"`` or ``"mean"``; must stay the same between resets.

    A step that raises leaves the accumulated state exactly as it was (after
    :func:`zero_diag_fim`: still reset, the next step choosing ``reduction``, ``ema`` and the
    options as the first one).
    """
    fim_type = FIMType.parse(fim_type)
    reduction = check_reduction(reduction)
    ema = check_ema(ema)
    states = _model_states(model)
    est = states.get(fim_type)
    opts = dict(fim_opts or {})
    if est is None:
        est = DiagFisher(model, fim_type, reduction=reduction, ema=ema, **opts)
    elif getattr(est, "_restart", False):
        est.restart(reduction, ema, opts)  # _restart stays set until a step succeeds: a
        # failed first step leaves the state reset, its reduction and ema not yet chosen
    else:
        if est.reduction != reduction or est.ema != ema:
            raise ValueError(
                f"reduction/ema: this model's {fim_type.value!r} state was accumulated with "
                f"reduction={est.reduction!r}, ema={est.ema!r}; got reduction={reduction!r}, "
                f"ema={ema!r} (call zero_diag_fim first to change them)"
            )
        est.set_options(opts)
    est.step(batch)
    est._restart = False
    states[fim_type] = est


def get_diag_fim(
    model: torch.nn.Module, fim_type: FIMType | str = FIMType.HUTCHINSON, local: bool = False
) -> dict[str, torch.Tensor]:
    """The accumulated diagonal: ``{param_name: tensor shaped like the parameter}``.

    With ``torch.distributed`` initialised (more than one rank) and the option
    ``distributed="auto"`` (the default), the states and counts of all ranks are summed, so every
    rank gets the estimate over the union of the shards. This is a collective: every rank must call
    it. The accumulated state itself is not modified (calling twice never double-counts).

    Args:
        model: the network the steps were taken on.
        fim_type: which accumulated type to read.
        local: read this rank's shard only, without any communication.

    Raises:
        RuntimeError: no step was taken for this model and type since the last reset.
    """
    fim_type = FIMType.parse(fim_type)
    est = _model_states(model).get(fim_type)
    if est is not None and getattr(est, "_restart", False):
        est = None  # reset by zero_diag_fim, no step since
    if est is None or est.state.steps == 0:
        if est is not None and not local and _reduces(est):
            return dict(est.result())  # other ranks may have steps: take part in the collective
        raise RuntimeError(
            f"get_diag_fim: no {fim_type.value!r} step has been taken for this model; call "
            "diag_fim_step first"
        )
    return dict(zip(est.names, est._read(local)[1]))


def _reduces(est: DiagFisher) -> bool:
    from fimfast import distributed

    return distributed.active(est.opts.distributed, est.opts.process_group)


def get_estimator(model: torch.nn.Module, fim_type: FIMType | str) -> DiagFisher | None:
    """The :class:`DiagFisher` behind the functional API for ``(model, fim_type)``, if any."""
    return _model_states(model).get(FIMType.parse(fim_type))
