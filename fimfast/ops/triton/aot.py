"""Ahead-of-time compilation of every Triton kernel of fimfast for CUDA targets, without a GPU.

The specialisations come from the launchers themselves: each launcher (``<op>_triton``) runs on
small CPU tensors while :func:`record_launches` replaces ``JITFunction.run``, so every
``kernel[grid](...)`` call is recorded (arguments, constexprs, ``num_warps``) instead of launched.
The inputs span what the launchers accept: every input dtype (float16, bfloat16, float32, float64),
every mode and solver, and sizes that reach each block-size regime (one register block, the
largest block, the column-block loop). Each distinct specialisation is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` exactly as
``JITFunction.run`` would on that GPU, and the cubin's resource usage is read with triton's
``cuobjdump`` and ``ptxas -v``'s log: registers per thread, bytes of spill stores and loads, stack
frame and local memory, shared memory (the dynamic size triton launches with plus the static size).
Each compilation runs in a forked child, so a compiler abort is reported as that kernel's failure.

A kernel fails the check when it does not compile, spills, or needs more shared memory per block
than the SM offers (sm_80: 163 KiB, sm_90: 227 KiB)::

    python -m fimfast.ops.triton.aot                       # sm_80 and sm_90, full matrix
    python -m fimfast.ops.triton.aot --subset --out a.json # every constexpr combination once

``--subset`` keeps, per kernel, one specialisation of every combination of constexpr values and
``num_warps`` (the widest inputs; :func:`covering_subset`): only the dtypes and alignment of the
arguments are left out.
Run it with ``TRITON_INTERPRET`` unset: under the interpreter ``triton.jit`` builds no compilable
kernels. Nothing here needs a GPU or a CUDA driver.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fimfast.ops.triton.aot_cases import cases as _cases

# maximum shared memory per block (opt-in), bytes: CUDA C programming guide, compute capabilities
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536
DEFAULT_CC = (80, 90)


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "fimfast.ops.triton.aot needs TRITON_INTERPRET unset: under the interpreter "
            "triton.jit builds no compilable kernels"
        )


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call of a launcher."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    cases: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.kernel.module}:{self.kernel.fn.__qualname__}"


@contextlib.contextmanager
def record_launches(cc: int | None = None) -> Iterator[list[Launch]]:
    """Inside the block, ``JITFunction`` launches are appended to the yielded list, not run.

    ``cc`` (e.g. 80) is the compute capability the launchers see
    (:data:`fimfast.ops.triton.arch.TARGET_CC`), so they pick what they would on that GPU.
    """
    _check_not_interpreted()
    from triton.runtime.jit import JITFunction

    from fimfast.ops import registry
    from fimfast.ops.triton import arch

    launches: list[Launch] = []
    original, original_cc = JITFunction.run, arch.TARGET_CC
    original_interpret = registry._triton_interpret

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid))
        return None

    JITFunction.run = run
    arch.TARGET_CC = None if cc is None else divmod(cc, 10)
    # composites that call an op with backend="triton" (lm_head_probe) reach its launcher on CPU
    # tensors too: the registry lets triton run on the CPU as under the interpreter
    registry._triton_interpret = lambda: True
    try:
        yield launches
    finally:
        JITFunction.run = original
        arch.TARGET_CC = original_cc
        registry._triton_interpret = original_interpret


@dataclass
class Spec:
    """One distinct specialisation of a kernel, as ``JITFunction.run`` would compile it."""

    launch: Launch
    key: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _bind(launch: Launch, backend) -> Spec:
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    kwargs = dict(launch.kwargs)
    # as JITFunction.run does before binding
    kwargs["debug"] = kwargs.get("debug", k.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = k._pack_args(
        backend, kwargs, bound, specialization, options
    )
    key = json.dumps(
        [launch.name, signature, _readable_constexprs(k, constexprs), repr(attrs),
         repr(sorted(options.__dict__.items()))],
        default=str,
    )  # fmt: skip
    return Spec(launch, key, signature, constexprs, attrs, options.__dict__)


def _readable_constexprs(kernel, constexprs: dict) -> dict:
    names = [p.name for p in kernel.params]
    out = {}
    for path, value in constexprs.items():
        name = names[path[0]] + "".join(f"[{i}]" for i in path[1:])
        out[name] = str(value)
    return out


def collect(cc: int = 90, cases=None) -> tuple[list[Spec], list[str], list[str]]:
    """Run every launcher case for ``sm_<cc>`` under :func:`record_launches`.

    Returns ``(specs, no_launch, errors)``: the distinct specs in recorded order, the cases that
    launched no kernel (the launcher chose another path there, e.g. the torch reference), and the
    cases that raised (an error, not a silent gap).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", cc, 32))
    specs: dict[str, Spec] = {}
    no_launch, errors = [], []
    for label, call in cases if cases is not None else _cases():
        with record_launches(cc) as launches:
            try:
                call()
            except Exception as exc:
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
        if not launches:
            no_launch.append(label)
        for launch in launches:
            spec = _bind(launch, backend)
            specs.setdefault(spec.key, spec).launch.cases.append(label)
    return list(specs.values()), no_launch, errors


def _size(spec: Spec) -> float:
    """How much a spec holds per program: the product of its integer constexprs (block sizes,
    modes), doubled for float64 accumulation; larger specs are the likelier to spill."""
    size = 1.0
    for v in spec.constexprs.values():
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:
            size *= v
        elif str(v) == "fp64":
            size *= 2
    return size * spec.options.get("num_warps", 4)


def _input_bytes(spec: Spec) -> int:
    """Bytes of one element of every pointer argument: between specs with the same constexprs,
    the wider inputs hold more registers (a float32 row against a float16 one)."""
    width = {"fp64": 8, "i64": 8, "u64": 8, "fp32": 4, "i32": 4, "u32": 4, "fp16": 2, "bf16": 2}
    return sum(width.get(t[1:], 1) for t in spec.signature.values() if str(t).startswith("*"))


def covering_subset(specs: list[Spec]) -> list[Spec]:
    """Per kernel, every distinct combination of constexpr values and ``num_warps`` once: the
    spec of the widest inputs among those that differ only in their arguments' dtypes and
    alignment. Every value alone is not enough: ``ptxas`` spilled in combinations whose values
    all compiled cleanly elsewhere (``mc`` over the column-block loop in float32, the ``dg``
    kernels of ``lm_head_probe`` without a bias at ``d = 32``), so each combination is compiled."""
    best: dict[tuple, Spec] = {}
    for s in specs:
        k = (s.launch.name, repr(_readable_constexprs(s.launch.kernel, s.constexprs)),
             s.options.get("num_warps"))  # fmt: skip
        if k not in best or (_size(s), _input_bytes(s)) > (_size(best[k]), _input_bytes(best[k])):
            best[k] = s
    keep = {s.key for s in best.values()}
    return [s for s in specs if s.key in keep]


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found (neither in triton's nvidia backend nor on PATH)")
    return found


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, static shared and local bytes of the single kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{out}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"n_regs": reg, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}


def problems(rec: dict) -> list[str]:
    """Why a compiled record fails the check (empty when it passes)."""
    if rec.get("error"):
        return [f"does not compile: {rec['error']}"]
    out = []
    if rec["n_spills"] > 0:
        out.append(
            f"spills registers to local memory ({rec['n_spills']} bytes of spill stores, "
            f"{rec.get('spill_loads', 0)} of loads per thread)"
        )
    limit = SHARED_LIMIT.get(rec["cc"])
    if limit is not None and rec["shared"] > limit:
        out.append(f"needs {rec['shared']} bytes of shared memory; sm_{rec['cc']} has {limit}")
    threads = rec["num_warps"] * 32
    if rec["n_regs"] * threads > REGISTERS_PER_SM:
        out.append(f"{rec['n_regs']} registers x {threads} threads exceed the register file")
    return out


_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def _compile_here(spec: Spec, cc: int) -> dict:
    """Compile in this process, ``ptxas -v``'s log captured (the spill counts come from it)."""
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v and prints its log
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(
            ASTSource(spec.launch.kernel, spec.signature, spec.constexprs, spec.attrs),
            target=GPUTarget("cuda", cc, 32),
            options=dict(spec.options),
        )
    usage = resource_usage(ck.asm["cubin"])
    usage["dynamic_shared"] = int(ck.metadata.shared)
    m = _SPILLS.search(log.getvalue())
    if m is None:
        raise RuntimeError(f"no spill figures in the ptxas log:\n{log.getvalue()[-2000:]}")
    usage["stack_frame"], usage["spill_stores"], usage["spill_loads"] = (int(x) for x in m.groups())
    return usage


def _compile_isolated(spec: Spec, cc: int, timeout: float) -> dict:
    """:func:`_compile_here` in a forked child: an LLVM abort or a hung ``ptxas`` becomes an
    error of this spec instead of ending the run. Returns the usage or ``{"error": ...}``."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryFile(mode="w+") as err:

        def child():
            os.dup2(err.fileno(), 2)
            try:
                send.send(_compile_here(spec, cc))
            except BaseException as exc:  # noqa: BLE001  (reported to the parent)
                send.send({"error": f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"})

        proc = ctx.Process(target=child)
        proc.start()
        send.close()
        out = None
        if recv.poll(timeout):
            try:
                out = recv.recv()
            except EOFError:
                out = None
        proc.join(5 if out is not None else 0.1)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if out is None:
            err.seek(0)
            tail = [ln for ln in err.read().splitlines() if "ERROR" in ln or "error" in ln]
            why = (f"timed out after {timeout:.0f} s" if proc.exitcode in (None, -9)
                   else f"the compiler aborted (exit code {proc.exitcode})")
            out = {"error": why + ("" if not tail else ": " + " | ".join(tail[-3:]))}
    return out


def compile_spec(spec: Spec, cc: int, timeout: float = 600.0) -> dict:
    """Compile ``spec`` for ``sm_<cc>`` (in a child process); a record with the resource usage
    (registers, spills, shared memory) or the error."""
    rec = {
        "kernel": spec.launch.name,
        "cc": cc,
        "constexprs": _readable_constexprs(spec.launch.kernel, spec.constexprs),
        "signature": {n: t for n, t in spec.signature.items() if t != "constexpr"},
        "num_warps": spec.options["num_warps"],
        "num_stages": spec.options["num_stages"],
        "cases": spec.launch.cases,
    }
    t0 = time.perf_counter()
    usage = _compile_isolated(spec, cc, timeout)
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    if "error" in usage:
        rec["error"] = usage["error"]
        return rec
    rec.update(usage)
    # bytes spilled per thread (ptxas -v); triton's own n_spills is the local size in words
    rec["n_spills"] = usage["spill_stores"]
    rec["shared"] = usage["dynamic_shared"] + usage["static_shared"]
    rec["shared_limit"] = SHARED_LIMIT.get(cc)
    rec["max_blocks_by_regs"] = REGISTERS_PER_SM // max(1, rec["n_regs"] * rec["num_warps"] * 32)
    return rec


def run(cc=DEFAULT_CC, subset: bool = False, log=None) -> dict:
    """Collect the specs of every target, compile them; the report (see :func:`main`)."""
    import triton

    _check_not_interpreted()
    t0 = time.perf_counter()
    records, per_target = [], {}
    for c in cc:
        specs, no_launch, errors = collect(c)
        full = len(specs)
        if subset:
            specs = covering_subset(specs)
        per_target[f"sm_{c}"] = {
            "specs_full_matrix": full,
            "specs_compiled": len(specs),
            "cases_without_launch": no_launch,
            "launcher_errors": errors,
        }
        for i, spec in enumerate(specs):
            rec = compile_spec(spec, c)
            rec["problems"] = problems(rec)
            records.append(rec)
            if log is not None:
                flag = "FAIL " + "; ".join(rec["problems"]) if rec["problems"] else "ok"
                print(
                    f"[sm_{c} {i + 1}/{len(specs)}] {rec['kernel'].split(':')[1]} "
                    f"{rec['cases'][0]!r} regs={rec.get('n_regs')} spills={rec.get('n_spills')} "
                    f"shared={rec.get('shared')} {rec['compile_s']}s {flag[:300]}",
                    file=log, flush=True,
                )
    return {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "targets": [f"sm_{c}" for c in cc],
        "subset": subset,
        "per_target": per_target,
        "launcher_errors": [e for t in per_target.values() for e in t["launcher_errors"]],
        "wall_s": round(time.perf_counter() - t0, 1),
        "failures": sum(bool(r["problems"]) for r in records),
        "records": records,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fimfast.ops.triton.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", type=int, nargs="+", default=list(DEFAULT_CC),
                    help="compute capabilities (default: 80 90)")
    ap.add_argument("--subset", action="store_true",
                    help="only the specs covering every constexpr value of every kernel")
    ap.add_argument("--out", default=None, help="JSON report (default: "
                    "benchmarks/results/triton_aot_<date>.json)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(
        "benchmarks", "results", f"triton_aot_{datetime.date.today().isoformat()}.json"
    )
    report = run(tuple(args.cc), args.subset, None if args.quiet else sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"{len(report['records'])} compilations ({', '.join(report['targets'])}) in "
        f"{report['wall_s']} s; {report['failures']} failing; launcher errors: "
        f"{len(report['launcher_errors'])}; report: {out}",
        file=sys.stderr,
    )
    return 1 if report["failures"] or report["launcher_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
