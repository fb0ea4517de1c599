"""``python -m benchmarks``: run the suite, or ``--quick`` parity on the tiny sizes."""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.workloads import WORKLOADS


def _parser() -> argparse.ArgumentParser:
    from benchmarks.suite import DEFAULTS

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time, peak memory and accuracy of diagonal-Fisher estimators (fimfast and "
        "peers) against one training step, with parity checked before timing.",
    )
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS),
                    metavar="W", help=f"workloads to run, of {' '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--methods", nargs="+", default=None, metavar="M",
                    help="methods to run (a trailing * matches a prefix, e.g. 'fimfast_*'); the "
                    "floor is always included; --list shows them")
    ap.add_argument("--list", action="store_true", help="list the methods and exit")
    ap.add_argument("--quick", action="store_true",
                    help="parity only, in-process, tiny sizes (seconds); exit 1 on a parity "
                    "failure of a fimfast method")
    ap.add_argument("--size", choices=["tiny", "full"], default=DEFAULTS["size"])
    ap.add_argument("--device", default=DEFAULTS["device"], help="cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                    help="torch.set_num_threads in every worker")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                    help="interleaved timed calls per method (median reported)")
    ap.add_argument("--max-call-s", type=float, default=DEFAULTS["max_call_s"],
                    help="per-call limit; slower calls are stopped and extrapolated")
    ap.add_argument("--budget-s", type=float, default=DEFAULTS["budget_s"],
                    help="time budget of one method's timed calls")
    ap.add_argument("--draws", type=int, default=DEFAULTS["draws"],
                    help="draws averaged for the error of random methods")
    ap.add_argument("--mem-limit-gb", type=float, default=DEFAULTS["mem_limit_gb"],
                    help="address-space limit of each CPU worker (0: none)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/"
                    "<time>_<device>_<size>.json)")
    ap.add_argument("--no-report", action="store_true",
                    help="do not write the markdown table and PNG chart next to the JSON")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from benchmarks import suite

    if args._worker:
        suite.worker_main(args._worker)
        return 0
    if args.list:
        from benchmarks.methods import all_methods

        for m in all_methods(args.device).values():
            print(f"{m.name:42s} {m.family:11s} {m.label}")
        return 0
    if args.quick:
        res = suite.run_quick(args.workloads, args.methods, seed=args.seed, threads=args.threads)
        bad = 0
        for key, rows in res.items():
            for name, r in rows.items():
                err = r.get("err_1")
                ops = r.get("ops_per_call")
                print(f"{key} {name:42s} {r['status']:12s} "
                      f"{'' if ops is None else f'ops {ops:5d}'} "
                      f"{'' if err is None else f'rel.err {err:.2e}'} {r.get('error', '')[:100]}")
                bad += r["status"] == "parity_fail" and name.startswith("fimfast")
        return 1 if bad else 0
    cfg = {"size": args.size, "device": args.device, "threads": args.threads, "seed": args.seed,
           "repeats": args.repeats, "max_call_s": args.max_call_s, "budget_s": args.budget_s,
           "draws": args.draws, "mem_limit_gb": args.mem_limit_gb}
    path = suite.run(args.workloads, args.methods, cfg, ["python", "-m", "benchmarks", *argv],
                     args.out)
    print(json.dumps({"results": path}))
    if not args.no_report:
        from benchmarks import report

        md, png = report.write(path)
        print(json.dumps({"markdown": md, "png": png}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
