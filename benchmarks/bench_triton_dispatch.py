"""Host-side cost of the Triton kernels' custom ops (fimfast/ops/triton/library.py) per call.

The kernel launch itself is replaced by a no-op (``JITFunction.run``, as
:func:`fimfast.ops.triton.aot.record_launches` does), so what is timed is the Python and dispatcher
work around it, on tiny CPU inputs; this needs neither a GPU nor the interpreter (run it with
``TRITON_INTERPRET`` unset). Per op, in interleaved rounds (1 torch thread, the order rotating):

Times are the thread's CPU time per call (not wall clock: a shared machine would add the time
spent waiting for a core).

* ``body``: the op's body called as a plain function, ``wrap_triton`` off: the host work of a
  direct ``kernel[grid](...)`` launch, which is what the launchers did before the ops existed;
* ``op``: ``torch.ops.fimfast_triton.<op>(...)``: the dispatcher, ``triton_op``'s wrapper, the body;
* ``launcher``: ``<op>_triton(...)``, the ``triton`` entry of the registry (detaches, calls the op);
* ``hop``: the body called as a plain function with ``wrap_triton`` on, outside any op: each launch
  then goes through the ``triton_kernel_wrapper_mutation`` higher-order op (what calling
  ``wrap_triton`` kernels outside a ``triton_op`` costs in eager mode).

A no-op ``triton_op`` (one tensor in, an empty tensor out) gives the dispatcher's own cost. Triton's
launch overhead on a GPU (argument binding, the cache lookup, the driver call; tens of
microseconds) comes on top of every variant and cannot be measured here::

    python benchmarks/bench_triton_dispatch.py [--rounds 15] [--calls 200] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _stub_launches() -> None:
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        return None

    JITFunction.run = run


def _cases() -> dict:
    """op -> (body, op, launcher, args of the op, args of the launcher)."""
    from fimfast.ops.triton import (
        accumulate,
        core_topk,
        lm_head_probe,
        probe_logit_grad,
        shared_sq,
        sq_matmul,
    )
    from fimfast.ops.triton.library import BODIES

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    F = torch.ops.fimfast_triton
    z, p = rnd(4, 9), torch.softmax(rnd(2, 9), -1)
    ga, aa, G, A = rnd(8, 4), rnd(8, 5), rnd(2, 3, 4), rnd(2, 3, 5)
    h, W, b = rnd(5, 8), rnd(11, 8), rnd(11)
    states, grads = [rnd(5), rnd(2, 3), rnd(7), rnd(4)], [rnd(5), rnd(2, 3), rnd(7), rnd(4)]
    return {
        "sq_matmul": (BODIES["sq_matmul"], F.sq_matmul, sq_matmul.sq_matmul_triton,
                      (ga, aa), (ga, aa)),
        "shared_sq": (BODIES["shared_sq"], F.shared_sq, shared_sq.shared_sq_triton,
                      (G, A), (G, A)),
        "core_topk": (BODIES["core_topk"], F.core_topk, core_topk.core_topk_triton,
                      (p, 2, "exact", 30), (p, 2, "exact", 30)),
        "probe_logit_grad": (BODIES["probe_logit_grad"], F.probe_logit_grad,
                             probe_logit_grad.probe_logit_grad_triton,
                             (z, "hutchinson", 1, 2, 1, None, None, None, 1.0),
                             (z, "hutchinson", 1, 2, 1)),
        "lm_head_probe": (BODIES["lm_head_probe"], F.lm_head_probe,
                          lm_head_probe.lm_head_probe_triton,
                          (h, W, b, "hutchinson", 1, 2), (h, W, b, "hutchinson", 1, 2, None)),
        "accumulate_": (BODIES["accumulate_"], F.accumulate_, accumulate.accumulate_triton_,
                        (states, grads, "sum", 0.0, 1.0), (states, grads, "sum", 0.0, 1.0)),
    }  # fmt: skip


def _noop_case():
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _noop_kernel(X_ptr, N, BLOCK: tl.constexpr):
        pass

    def body(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        wrap_triton(_noop_kernel)[(1,)](x, x.numel(), BLOCK=16)
        return out

    op = triton_op("fimfast_bench::noop", mutates_args=())(body)
    x = torch.zeros(4)
    return body, op, None, (x,), (x,)


def _time(fn, args, calls: int) -> float:
    """Microseconds of this thread's CPU time per call (the machine may be shared: wall-clock
    time would count the time the thread waits for a core)."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn(*args)
    return (time.thread_time() - t0) / calls * 1e6


def measure(rounds: int, calls: int) -> dict:
    from torch._library.triton import set_wrap_triton_enabled

    def plain(body):
        def call(*args):
            with set_wrap_triton_enabled(False):
                return body(*args)

        return call

    cases = {**_cases(), "noop (dispatcher only)": _noop_case()}
    results = {}
    for name, (body, op, launcher, op_args, launcher_args) in cases.items():
        variants = {"body": (plain(body), op_args), "op": (op, op_args), "hop": (body, op_args)}
        if launcher is not None:
            variants["launcher"] = (launcher, launcher_args)
        for fn, args in variants.values():  # warm up (imports, caches)
            for _ in range(20):
                fn(*args)
        times: dict[str, list[float]] = {v: [] for v in variants}
        order = list(variants)
        for r in range(rounds):
            for v in order[r % len(order):] + order[: r % len(order)]:
                fn, args = variants[v]
                n = max(1, calls // 20) if v == "hop" else calls
                times[v].append(_time(fn, args, n))
        med = {v: statistics.median(t) for v, t in times.items()}
        results[name] = {
            "us_per_call": med,
            "op_minus_body_us": med["op"] - med["body"],
            "op_over_body": med["op"] / med["body"],
        }
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset: launches are stubbed, not interpreted")
    torch.set_num_threads(1)
    _stub_launches()
    results = measure(args.rounds, args.calls)
    print(f"{'op':24s} {'body':>8s} {'op':>8s} {'launcher':>9s} {'hop':>8s} {'op-body':>8s}  (us)")
    for name, r in results.items():
        m = r["us_per_call"]
        print(f"{name:24s} {m['body']:8.1f} {m['op']:8.1f} {m.get('launcher', float('nan')):9.1f} "
              f"{m['hop']:8.1f} {r['op_minus_body_us']:8.1f}")  # fmt: skip
    if args.out:
        import triton

        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
        prov = {"git_sha": sha, "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "machine": platform.processor() or
                platform.machine(), "threads": 1, "rounds": args.rounds, "calls": args.calls,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"provenance": prov, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
