"""The options of the ``fimfast`` subcommands, declared once (see :mod:`fimfast.cli`).

Each option is declared in :data:`_OPTIONS` (flags, argparse keywords and, for options whose default
is None, what None means); :data:`_DEFAULTS` gives the options that ``run`` and ``demo`` take and
their defaults, and :func:`_add_options` adds them to a parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fimfast.types import FIMType

_TYPES_HELP = ", ".join(t.value for t in FIMType)


def _fim_types(text: str) -> list[FIMType]:
    if text.strip().lower() == "all":
        return list(FIMType)
    items = [s for s in (p.strip() for p in text.split(",")) if s]
    if not items:
        raise argparse.ArgumentTypeError(f"give a comma-separated list of {_TYPES_HELP}, or all")
    try:
        return list(dict.fromkeys(FIMType.parse(s, "--fim-types") for s in items))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {v}")
    return v


TORCH_CHOICE = "torch's choice"

#: the estimator options the command line sets (``None``: fimfast's default)
ESTIMATOR_OPTIONS = (
    "num_probes",
    "top_k",
    "rankk_solver",
    "lr_power_itrs",
    "backend",
    "class_chunk",
)
_ESTIMATOR_GROUP = "estimator options"

# Every option of the subcommands, declared once: dest -> flags, argparse keywords and, for options
# whose default is None, what None means. A command picks the options it takes and their defaults
# in _COMMANDS; where `run` and `demo` differ in a default, both help texts say so.
_OPTIONS: dict[str, dict] = {
    "fim_types": dict(
        flags=("--fim-types",),
        type=_fim_types,
        metavar="T1,T2,...",
        help="estimators, comma-separated, or 'all'",
    ),
    "num_batches": dict(
        flags=("--num-batches",),
        type=_positive_int,
        metavar="NB",
        help="batches per estimator",
        none="the experiment's, else 128",
    ),
    "batch_size": dict(
        flags=("--batch-size",),
        type=_positive_int,
        metavar="BS",
        help="samples per batch",
        none="the experiment's, else 64",
    ),
    "seed": dict(
        flags=("--seed",),
        type=_seed,
        metavar="SEED",
        help="seeds training, the batches and the estimators",
    ),
    "reduction": dict(
        flags=("--reduction",),
        choices=("sum", "mean"),
        help="sum the Fisher over samples, or take the mean",
    ),
    "out": dict(flags=("--out",), type=Path, metavar="DIR", help="output folder"),
    "resume": dict(
        flags=("--resume",),
        action="store_true",
        help="skip estimators whose file exists and was computed with the options that change "
        "its estimate (reduction; --num-probes, --top-k, --rankk-solver, --lr-power-itrs where "
        "the estimator uses them)",
    ),
    "retrain": dict(
        flags=("--retrain",),
        action="store_true",
        help="train the network even if cached weights exist in --out",
    ),
    "no_progress": dict(flags=("--no-progress",), action="store_true", help="no progress bars"),
    "threads": dict(
        flags=("--threads",),
        type=_positive_int,
        metavar="N",
        none=TORCH_CHOICE,
        help="torch CPU threads. Small networks on a busy machine run several times faster with "
        "1 thread (measured: the demo took 12 s with 1 thread, 28 s with 2, on a shared 2-core "
        "machine)",
    ),
    "num_probes": dict(
        flags=("--num-probes",),
        type=_positive_int,
        metavar="S",
        group=_ESTIMATOR_GROUP,
        none="1",
        help="probes per batch (HUTCHINSON family) or label draws (MONTE_CARLO)",
    ),
    "top_k": dict(
        flags=("--top-k",),
        type=_positive_int,
        metavar="K",
        group=_ESTIMATOR_GROUP,
        none="2",
        help="eigenpairs kept by hutchinson_rankk (at most C-1 for C classes)",
    ),
    "rankk_solver": dict(
        flags=("--rankk-solver",),
        choices=("exact", "power"),
        group=_ESTIMATOR_GROUP,
        none="exact",
        help="top-k eigenpairs by the secular equation (exact) or by power "
        "iteration as in the paper's code (power)",
    ),
    "lr_power_itrs": dict(
        flags=("--lr-power-itrs",),
        type=_positive_int,
        metavar="N",
        group=_ESTIMATOR_GROUP,
        none="30",
        help="power iterations of --rankk-solver power",
    ),
    "backend": dict(
        flags=("--backend",),
        choices=("auto", "torch", "triton", "cuda", "cpp"),
        group=_ESTIMATOR_GROUP,
        none="auto",
        help="kernel backend",
    ),
    "class_chunk": dict(
        flags=("--class-chunk",),
        type=_positive_int,
        metavar="K",
        group=_ESTIMATOR_GROUP,
        none="what a training step holds, at most FIMFAST_MEMORY_BUDGET_MB",
        help="output columns per batched backward of EXACT",
    ),
}

_ALL = list(FIMType)
_NO_ESTIMATOR_OPTS = {k: None for k in ESTIMATOR_OPTIONS}

# the options of `run` and `demo` and their defaults (flags of viz, metrics, bench: their own)
_DEFAULTS: dict[str, dict] = {
    "run": {
        "fim_types": _ALL,
        "num_batches": None,
        "batch_size": None,
        "seed": 42,
        "reduction": "sum",
        "out": Path("results"),
        "resume": False,
        "retrain": False,
        "no_progress": False,
        "threads": None,
        **_NO_ESTIMATOR_OPTS,
    },
    "demo": {
        "fim_types": _ALL,
        "num_batches": 128,
        "batch_size": 32,
        "seed": 42,
        "reduction": "mean",
        "out": Path("fimfast_out"),
        "retrain": False,
        "no_progress": False,
        "threads": 1,
        **_NO_ESTIMATOR_OPTS,
    },
}


def _show(value, spec: dict) -> str:
    if value is None:
        return spec.get("none", "none")
    if value == _ALL:
        return "all"
    if isinstance(value, Path):
        return f"{value}/"
    return str(value)


def _add_options(p: argparse.ArgumentParser, command: str) -> None:
    """Add the options of ``command`` from :data:`_OPTIONS` with its defaults."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    others = [c for c in _DEFAULTS if c != command]
    for dest, default in _DEFAULTS[command].items():
        spec = dict(_OPTIONS[dest])
        flags, group, _ = spec.pop("flags"), spec.pop("group", None), spec.pop("none", None)
        help_text = spec.pop("help")
        if spec.get("action") != "store_true":
            text = f"default {_show(default, _OPTIONS[dest])}"
            for other in others:
                theirs = _DEFAULTS[other].get(dest, default)
                if dest in _DEFAULTS[other] and theirs != default:
                    text += f"; `fimfast {other}`: {_show(theirs, _OPTIONS[dest])}"
            help_text = f"{help_text} ({text})"
        target = p
        if group is not None:
            if group not in groups:
                groups[group] = p.add_argument_group(group)
            target = groups[group]
        target.add_argument(*flags, dest=dest, default=default, help=help_text, **spec)
