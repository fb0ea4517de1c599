"""``fimfast run``: estimate the diagonal Fisher of an experiment with several estimators.

Every type sees the same batches (drawn from the run's seed), in the same order; each type's random
stream has its own seed derived from the run's seed and the type's name, so a resumed run gives the
same files as an uninterrupted one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fimfast
from fimfast.experiments.registry import Setup, get_experiment
from fimfast.experiments.store import ResultFileError, load_result, result_name, save_result
from fimfast.ops import registry
from fimfast.types import FIMType, Options

__all__ = [
    "Estimate",
    "OptionError",
    "RunConfig",
    "check_options",
    "estimate",
    "estimate_options",
    "option_tag",
    "run",
    "type_seed",
]

#: option names the command line can set (the rest keep fimfast's defaults)
CLI_OPTIONS = ("num_probes", "top_k", "lr_power_itrs", "rankk_solver", "backend", "class_chunk")

_PROBED = (
    FIMType.MONTE_CARLO,
    FIMType.HUTCHINSON,
    FIMType.HUTCHINSON_SQRT,
    FIMType.HUTCHINSON_DG,
    FIMType.HUTCHINSON_RANKK,
    FIMType.HUTCHINSON_RANK1,
)
_TOPK = (FIMType.HUTCHINSON_RANKK, FIMType.HUTCHINSON_RANK1)


class OptionError(ValueError):
    """An estimator option that cannot work for this run; ``option`` names it."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def estimate_options(fim_type: FIMType | str, opts: dict[str, Any] | Options) -> dict[str, Any]:
    """The options that change what ``fim_type`` estimates, with their values.

    ``num_probes`` for MONTE_CARLO and the HUTCHINSON family; ``top_k`` for HUTCHINSON_RANKK;
    ``rankk_solver`` (and ``lr_power_itrs`` with the power solver) for RANKK and RANK1. EXACT and
    EMPIRICAL depend on none; ``backend`` and ``class_chunk`` change only rounding.
    """
    t = FIMType.parse(fim_type)
    o = opts if isinstance(opts, Options) else Options.from_dict(opts)
    out: dict[str, Any] = {}
    if t in _PROBED:
        out["num_probes"] = o.num_probes
    if t == FIMType.HUTCHINSON_RANKK:
        out["top_k"] = o.top_k
    if t in _TOPK:
        out["rankk_solver"] = o.rankk_solver
        if o.rankk_solver == "power":
            out["lr_power_itrs"] = o.lr_power_itrs
    return out


def option_tag(fim_type: FIMType | str, opts: dict[str, Any] | Options) -> str:
    """The file-name tag of the options of :func:`estimate_options` that differ from fimfast's
    defaults: ``probes<S>``, ``k<K>``, ``power<N>``, joined by ``_`` (``""`` for the defaults)."""
    eo, d = estimate_options(fim_type, opts), Options()
    parts = []
    if eo.get("num_probes", d.num_probes) != d.num_probes:
        parts.append(f"probes{eo['num_probes']}")
    if eo.get("top_k", d.top_k) != d.top_k:
        parts.append(f"k{eo['top_k']}")
    if eo.get("rankk_solver") == "power":
        parts.append(f"power{eo['lr_power_itrs']}")
    return "_".join(parts)


def check_options(
    experiment: str, fim_types: list[FIMType], opts: dict[str, Any], num_classes: int | None
) -> None:
    """Raise :class:`OptionError` for an option that cannot work here: a ``backend`` that cannot
    run on the CPU, ``top_k`` above ``C - 1`` with HUTCHINSON_RANKK (not checked while ``C`` is
    unknown)."""
    try:
        registry.check_backend(opts.get("backend"), torch.device("cpu"))
    except (ValueError, registry.BackendUnavailableError) as exc:
        raise OptionError("backend", str(exc)) from exc
    if num_classes is None or FIMType.HUTCHINSON_RANKK not in fim_types:
        return
    k = Options.from_dict(opts).top_k
    if k > num_classes - 1:
        raise OptionError(
            "top_k",
            f"hutchinson_rankk keeps at most C-1 = {num_classes - 1} eigenpairs for "
            f"{experiment}'s {num_classes} classes; got {k}",
        )


def type_seed(seed: int, fim_type: FIMType | str) -> int:
    """The estimator seed of one type in a run with ``seed`` (62 bits, from SHA-256)."""
    t = FIMType.parse(fim_type).value
    digest = hashlib.sha256(f"fimfast-run:{seed}:{t}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass
class Estimate:
    """What :func:`estimate` returns.

    Attributes:
        fim: the final :class:`fimfast.DiagFIM`.
        seconds: wall time of every step (one per batch).
        batch_traces: trace of every batch's own estimate (a sum over its rows), for paired
            comparisons between estimators on the same batches.
        batch_param_traces: the same per parameter tensor: one ``{name: trace}`` per batch.
        estimator_seed: the seed of the type's random stream.
    """

    fim: fimfast.DiagFIM
    seconds: list[float]
    batch_traces: list[float] = field(default_factory=list)
    batch_param_traces: list[dict[str, float]] = field(default_factory=list)
    estimator_seed: int = 0


def estimate(
    setup: Setup,
    fim_type: FIMType | str,
    num_batches: int,
    batch_size: int,
    seed: int,
    reduction: str = "sum",
    opts: dict[str, Any] | None = None,
    progress: bool = True,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
    desc: str | None = None,
) -> Estimate:
    """Accumulate one estimator over the run's batches with :class:`fimfast.DiagFisher`.

    Args:
        setup: a prepared experiment.
        fim_type: the estimator.
        num_batches, batch_size, seed: the batches (``setup.batches(num_batches, batch_size,
            seed)``); ``seed`` also derives the estimator's seed (:func:`type_seed`).
        reduction: ``"sum"`` or ``"mean"``.
        opts: estimator options (``num_probes``, ``top_k``, ...).
        progress: show a tqdm progress bar (on stderr).
        on_batch: ``on_batch(i, v)`` after batch ``i`` (from 1), with ``v`` the float64 flat
            vector of that batch's own estimate summed over its rows (whatever ``reduction``).
        desc: progress bar label.
    """
    from tqdm.auto import tqdm

    fim_type = FIMType.parse(fim_type)
    est_seed = type_seed(seed, fim_type)
    options = {**setup.fisher_opts, **(opts or {}), "seed": est_seed}
    est = fimfast.DiagFisher(setup.model, fim_type, reduction=reduction, **options)
    out = Estimate(fim=None, seconds=[], estimator_seed=est_seed)  # type: ignore[arg-type]
    prev_trace, prev_vec, prev_param = 0.0, None, {}
    bar = tqdm(
        total=num_batches,
        desc=desc or fim_type.value,
        unit="batch",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    try:
        for i, batch in enumerate(setup.batches(num_batches, batch_size, seed), start=1):
            t0 = time.perf_counter()
            est.step(batch)
            out.seconds.append(time.perf_counter() - t0)
            fim = est.result()
            scale = fim.meta["count"] if reduction == "mean" else 1  # back to sums over rows
            total = fim.trace() * scale
            out.batch_traces.append(total - prev_trace)
            prev_trace = total
            param = {k: float(fim[k].double().sum()) * scale for k in fim}
            out.batch_param_traces.append({k: v - prev_param.get(k, 0.0) for k, v in param.items()})
            prev_param = param
            if on_batch is not None:
                vec = fim.to_vector().detach().double().cpu().numpy() * scale
                on_batch(i, vec if prev_vec is None else vec - prev_vec)
                prev_vec = vec
            bar.update(1)
    finally:
        bar.close()
    if not out.seconds:
        raise RuntimeError(f"{desc or fim_type.value}: the experiment produced no batches")
    out.fim = est.result()
    return out


@dataclass
class RunConfig:
    """The arguments of ``fimfast run``.

    Attributes:
        experiment: a registered experiment name.
        fim_types: the estimators, in order (:class:`FIMType` or their names).
        num_batches, batch_size: ``None`` takes the experiment's defaults (else 128 and 64).
        seed: seeds the network's initialisation and training, the batches and the estimators.
        reduction: ``"sum"`` or ``"mean"``.
        opts: estimator options (subset of :data:`CLI_OPTIONS`).
        out_dir: where result files (and the trained weights' cache) go.
        resume: skip types whose result file exists and matches this configuration.
        progress: show progress bars.
        retrain: train the network even if cached weights exist.
    """

    experiment: str
    fim_types: list[FIMType | str]
    num_batches: int | None = None
    batch_size: int | None = None
    seed: int = 42
    reduction: str = "sum"
    opts: dict[str, Any] = field(default_factory=dict)
    out_dir: Path = Path("results")
    resume: bool = False
    progress: bool = True
    retrain: bool = False

    def resolved(self) -> RunConfig:
        """A copy with the sizes filled in from the experiment's defaults and checked."""
        exp = get_experiment(self.experiment)
        nb = self.num_batches or exp.defaults.get("num_batches", 128)
        bs = self.batch_size or exp.defaults.get("batch_size", 64)
        for name, v in (("num_batches", nb), ("batch_size", bs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        types = list(dict.fromkeys(FIMType.parse(t, "fim_types") for t in self.fim_types))
        Options.from_dict(self.opts)  # unknown or bad options fail before any work
        check_options(self.experiment, types, self.opts, exp.num_classes)
        return RunConfig(
            **{
                **self.__dict__,
                "fim_types": types,
                "num_batches": nb,
                "batch_size": bs,
                "out_dir": Path(self.out_dir),
            }
        )


def _options_meta(setup: Setup, fim_type: FIMType, opts: dict[str, Any], seed: int) -> dict:
    o = Options.from_dict({**setup.fisher_opts, **opts, "seed": seed}).to_dict()
    if fim_type == FIMType.HUTCHINSON_RANK1:
        o["top_k"] = 1
    return o


def metadata(cfg: RunConfig, setup: Setup, fim_type: FIMType, result: Estimate) -> dict[str, Any]:
    """The JSON metadata of one result file."""
    secs = result.seconds
    return {
        "experiment": cfg.experiment,
        "fim_type": fim_type.value,
        "reduction": cfg.reduction,
        "options": _options_meta(setup, fim_type, cfg.opts, result.estimator_seed),
        "cli_options": dict(cfg.opts),
        "estimate_options": estimate_options(fim_type, {**setup.fisher_opts, **cfg.opts}),
        "model": setup.model_desc,
        "dataset": setup.dataset_desc,
        "num_classes": setup.num_classes,
        "num_batches": cfg.num_batches,
        "batch_size": cfg.batch_size,
        "rows": int(result.fim.meta["count"]),
        "seed": cfg.seed,
        "estimator_seed": result.estimator_seed,
        "seconds_per_batch": float(np.mean(secs)),
        "seconds_per_batch_median": float(np.median(secs)),
        "seconds_total": float(np.sum(secs)),
        "training": setup.info,
        "fimfast_version": fimfast.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def result_path(cfg: RunConfig, fim_type: FIMType) -> Path:
    """``<out_dir>/<result_name>`` of one type, tagged with the options that change its
    estimate."""
    return cfg.out_dir / result_name(
        cfg.experiment,
        fim_type.value,
        cfg.num_batches,
        cfg.batch_size,
        cfg.seed,
        cfg.reduction,
        option_tag(fim_type, cfg.opts),
    )


def write(cfg: RunConfig, setup: Setup, fim_type: FIMType, result: Estimate) -> Path:
    """Save one type's estimate as :func:`result_path` (atomically)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in result.fim.items()}
    return save_result(result_path(cfg, fim_type), arrays, metadata(cfg, setup, fim_type, result))


def finished(cfg: RunConfig, fim_type: FIMType) -> tuple[bool, str]:
    """Whether a valid result file for this configuration and type exists, and why not.

    The file must match the experiment, type, batches, seed, reduction and the options that
    change this type's estimate (:func:`estimate_options`); others (``backend``,
    ``class_chunk``, options the type does not use) do not make it stale.
    """
    path = result_path(cfg, fim_type)
    if not path.exists():
        return False, "no file"
    try:
        f = load_result(path)
    except ResultFileError as exc:
        return False, f"unreadable ({exc})"
    m = f.meta
    same = (
        m.get("experiment") == cfg.experiment
        and m.get("fim_type") == fim_type.value
        and m.get("reduction") == cfg.reduction
        and m.get("estimate_options") == _json(estimate_options(fim_type, cfg.opts))
        and (m.get("num_batches"), m.get("batch_size"), m.get("seed"))
        == (cfg.num_batches, cfg.batch_size, cfg.seed)
    )
    return (True, "done") if same else (False, "written with other options")


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Run ``cfg`` and return the result files (written or, with ``resume``, kept).

    The network is prepared (trained, or loaded from ``<out_dir>``'s cache) only if a type is left
    to compute. A type that fails or is interrupted leaves no file; files already written stay.
    """
    cfg = cfg.resolved()
    exp = get_experiment(cfg.experiment)
    todo, paths = [], []
    for t in cfg.fim_types:
        path = result_path(cfg, t)
        paths.append(path)
        if cfg.resume:
            ok, why = finished(cfg, t)
            if ok:
                log(f"skip  {path} (finished)")
                continue
            if why != "no file":
                log(f"redo  {path}: {why}")
        todo.append(t)
    if not todo:
        return paths
    t0 = time.perf_counter()
    setup = exp.prepare(cfg.seed, cfg.out_dir, cfg.retrain)
    check_options(cfg.experiment, todo, cfg.opts, setup.num_classes)  # C known only now
    how = "loaded from cache" if setup.info.get("from_cache") else "trained"
    acc = setup.info.get("test_accuracy")
    log(
        f"{cfg.experiment}: {setup.model_desc}; {how} in {time.perf_counter() - t0:.1f} s"
        + (f", test accuracy {acc:.3f}" if acc is not None else "")
    )
    for t in todo:
        res = estimate(
            setup,
            t,
            cfg.num_batches,
            cfg.batch_size,
            cfg.seed,
            cfg.reduction,
            cfg.opts,
            progress=cfg.progress,
            desc=f"{cfg.experiment} {t.value}",
        )
        path = write(cfg, setup, t, res)
        log(f"wrote {path} ({sum(res.seconds):.1f} s, {np.mean(res.seconds) * 1e3:.1f} ms/batch)")
    return paths
