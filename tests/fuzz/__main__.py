"""Long fuzzing runs from the command line (run in ``tests/``, or with ``PYTHONPATH=tests``).

Examples::

    python -m fuzz --count 5000                 # seeds 0..4999, a summary at the end
    python -m fuzz --start 5000 --count 1000 --jsonl runs.jsonl
    python -m fuzz --seed 123 --shrink          # replay one seed and shrink its failure
    python -m fuzz --count 2000 --skip hook:out,hook:pre,ckpt:reentrant=True
                                                # leave out models with these constructs

Every failing model is printed with its seed and one-line description as it happens; the
summary groups the failures by category (``exact:value``, ``monte_carlo:state:buffer``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict

from fuzz.grammar import describe, features, plan
from fuzz.runner import TYPES, check_seed, check_spec, shrink


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--count", type=int, default=200, help="number of seeds (default 200)")
    ap.add_argument("--seed", type=int, action="append",
                    help="check this seed only (repeatable); overrides --start/--count")
    ap.add_argument("--types", default=",".join(TYPES),
                    help="comma-separated per-sample types (default: all three)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="compile with aot_eager where a seed draws inductor")
    ap.add_argument("--shrink", action="store_true",
                    help="shrink every failing model to a smaller one that fails the same way")
    ap.add_argument("--skip", default="",
                    help="comma-separated construct tags (fuzz.grammar.features, e.g. hook:out, "
                         "ckpt:reentrant=True, op:mix, compile:aot_eager, sizes:T==N): models "
                         "with any of them are not checked")
    ap.add_argument("--jsonl", help="append one JSON line per model to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    args = ap.parse_args(argv)
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    seeds = args.seed if args.seed else range(args.start, args.start + args.count)
    skip = {t.strip() for t in args.skip.split(",") if t.strip()}
    status: Counter = Counter()
    groups: dict[str, list[int]] = defaultdict(list)
    t0 = time.perf_counter()
    out_file = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115 - closed below
    try:
        for seed in seeds:
            if skip and features(plan(seed, not args.no_inductor)) & skip:
                status["skipped"] += 1
                continue
            o = check_seed(seed, allow_inductor=not args.no_inductor, types=types)
            status[o.status] += 1
            for cat in sorted(o.signature):
                groups[cat].append(seed)
            if not o.ok:
                print(o.report(), flush=True)
                if args.shrink:
                    sig = o.signature
                    spec = plan(seed, not args.no_inductor)
                    small = shrink(
                        spec, lambda s, sig=sig: bool(check_spec(s, types).signature & sig))
                    print(f"  shrunk: {describe(small)}", flush=True)
            elif not args.quiet:
                print(f"seed {seed}: {o.status} ({o.seconds:.2f} s)", flush=True)
            if out_file is not None:
                out_file.write(json.dumps({
                    "seed": seed, "status": o.status, "desc": o.desc, "failures": o.failures,
                    "refusals": o.refusals, "errors": o.errors, "seconds": o.seconds,
                }) + "\n")
                out_file.flush()
    finally:
        if out_file is not None:
            out_file.close()
    n = sum(status.values())
    print(f"\n{n} models in {time.perf_counter() - t0:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(status.items())))
    for cat, ss in sorted(groups.items()):
        print(f"  {cat}: {len(ss)} models, e.g. seeds {ss[:8]}")
    return 1 if status["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
