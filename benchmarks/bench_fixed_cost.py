"""Fixed cost of a step: fimfast against the same arithmetic written by hand.

For workloads of :mod:`benchmarks.workloads` (default (a) and (e)), one torch thread, the medians
of interleaved rounds of:

- ``floor``: a training step (forward, cross-entropy, backward, grads dropped);
- ``bare``: a one-probe Hutchinson step written in ten lines (forward; softmax probe with
  Rademacher signs, ``u = s*e - p*(s.e)`` with ``s = sqrt(p)``; ``autograd.grad``; one
  ``_foreach_addcmul_`` into float32 accumulators), the arithmetic a HUTCHINSON step cannot avoid;
- ``bare:fused``: the same step with fimfast's fused probe kernel
  (:func:`fimfast.ops.probe_logit_grad`, one operator) in place of the probe's seven: the
  operators a HUTCHINSON step runs, so its gap to this one is Python and dispatch alone;
- ``bare:empirical``: an EMPIRICAL step written in ten lines, for models whose parameters all
  belong to ``nn.Linear`` layers fed ``(N, I)`` rows (workload (a); absent elsewhere): forward
  hooks keep each layer's input and output, one ``autograd.grad`` of the logits to the layer
  outputs with the cotangent ``softmax - onehot``, then per layer ``addmm_((G*G).T, A*A)`` and
  the bias's ``(G*G).sum(0)``: the arithmetic an EMPIRICAL step cannot avoid (it squares the
  logits layer's cotangent as any output gradient);
- ``step:<type>``: ``DiagFisher(model, type).step(batch)`` for HUTCHINSON, EMPIRICAL and each
  type of ``--types`` (the state accumulates, as in a loop);
- ``cycle:<type>``: the seed API's per-batch cycle ``zero_diag_fim`` + ``diag_fim_step`` +
  ``get_diag_fim``, for HUTCHINSON, EMPIRICAL and each type of ``--types``.

Reported: each as a ratio to ``floor``, the HUTCHINSON step's gap to ``bare`` and to
``bare:fused`` in microseconds (its fixed cost: validation, bookkeeping, dispatch), the EMPIRICAL
step's to ``bare:empirical`` where there is one, each cycle over its step (median of the
rounds' medians, and their range), and the ATen
operators one call dispatches (each a kernel launch on a GPU, views and host reads aside; counted
once, under a ``TorchDispatchMode``) for a training step, a step and a cycle of each type of
``OP_TYPES`` (the extension's host functions, its finiteness checks among them, are not ATen
operators: not counted).
Times are CPU time of the process (``time.process_time``): on a machine shared with other work,
the time a step spends waiting for a core is not counted.

``python benchmarks/bench_fixed_cost.py --trees A B --rounds 5`` compares source trees: every
round runs one child process per tree in shuffled order; ``--child`` runs one measurement and
prints JSON. ``--out PATH`` writes the table and the raw figures (``PATH.json``, ``PATH.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

TYPES = ("hutchinson", "empirical")  # the types of the cycles, always measured
OP_TYPES = ("hutchinson", "empirical", "monte_carlo", "exact")


def _op_counts(m, batch, y) -> dict:
    """ATen operators of one call of a training step and of a step and a cycle of each of
    ``OP_TYPES``."""
    import torch.nn.functional as F

    import fimfast
    from benchmarks.opcount import OpCounter

    def train():
        out = m(batch[0])
        out = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(out.flatten(0, -2), y.flatten()).backward()
        for p in m.parameters():
            p.grad = None

    fns = {"train": train}
    for t in OP_TYPES:
        est = fimfast.DiagFisher(m, t, seed=0)
        fns[t] = lambda est=est: est.step(batch)
    for t in OP_TYPES:

        def cycle(t=t):
            fimfast.zero_diag_fim(m, t)
            fimfast.diag_fim_step(m, batch, t, fim_opts={"seed": 0})
            fimfast.get_diag_fim(m, t)

        fns[f"cycle:{t}"] = cycle
    out = {}
    for k, f in fns.items():
        f()
        f()  # warm: plans, caches, first-step state
        with OpCounter() as c:
            f()
        views = sum(v for op, v in c.calls.items() if op.split(".")[1] in _NOT_KERNELS)
        out[k] = {"all": c.total, "kernels": c.total - views}
    return out


# operators that launch no kernel: views, aliases and the reads of a scalar on the host
_NOT_KERNELS = ("t", "view", "detach", "select", "slice", "_unsafe_view", "expand", "permute",
                "unsqueeze", "squeeze", "alias", "_local_scalar_dense", "_reshape_alias",
                "as_strided", "transpose", "reshape", "unbind", "split", "narrow")


def _child(
    workload: str, steps: int, size: str = "full", ops: bool = False, types: tuple = TYPES
) -> dict:
    import torch
    import torch.nn.functional as F

    import fimfast
    from benchmarks.workloads import build

    torch.set_num_threads(1)
    wl = build(workload, size, 0)
    m, x, y = wl.model, wl.inputs, wl.labels
    batch = (x, y)
    params = [p for p in m.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def logits():
        out = m(x)
        return out.logits if hasattr(out, "logits") else out

    def floor():
        F.cross_entropy(logits().flatten(0, -2), y.flatten()).backward()
        for p in params:
            p.grad = None

    def bare():
        z = logits()
        with torch.no_grad():
            p = torch.softmax(z.float(), -1)
            s = p.sqrt()
            e = torch.randint(0, 2, z.shape, dtype=p.dtype).mul_(2).sub_(1)
            w = s * e
            u = (w - p * w.sum(-1, keepdim=True)).to(z.dtype)
        g = torch.autograd.grad(z, params, u)
        torch._foreach_addcmul_(acc, g, g)

    acc_fused = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    offset = [0]

    def bare_fused():
        z = logits()
        zd = z.detach().flatten(0, -2)
        u = fimfast.ops.probe_logit_grad(zd, "hutchinson", 0, offset[0], 1)[0]
        offset[0] += 2 * zd.numel()
        g = torch.autograd.grad(z, params, u.to(z.dtype).view(z.shape))
        torch._foreach_addcmul_(acc_fused, g, g)

    fns = {"floor": floor, "bare": bare, "bare:fused": bare_fused}
    empirical = _bare_empirical(m, x, y, params)
    if empirical is not None:
        fns["bare:empirical"] = empirical[0]
    for t in dict.fromkeys((*TYPES, *types)):  # HUTCHINSON and EMPIRICAL always
        est = fimfast.DiagFisher(m, t, seed=0)
        fns[f"step:{t}"] = lambda est=est: est.step(batch)
    for t in dict.fromkeys((*TYPES, *types)):  # a cycle per step type

        def cycle(t=t):
            fimfast.zero_diag_fim(m, t)
            fimfast.diag_fim_step(m, batch, t, fim_opts={"seed": 0})
            fimfast.get_diag_fim(m, t)

        fns[f"cycle:{t}"] = cycle
    for f in fns.values():  # warm up: plans, caches, allocator
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    res: dict = {k: statistics.median(v) for k, v in times.items()}
    if ops:
        res["ops"] = _op_counts(m, batch, y)
    return res


def _bare_empirical(m, x, y, params):
    """The ten-line EMPIRICAL step of ``m`` (see the module docstring) and its float32 sums by
    parameter id, or ``None`` when a parameter belongs to anything but an ``nn.Linear`` or a layer
    is fed other than ``(N, I)``."""
    import torch

    lins = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    owners = [mod for mod in m.modules() if any(p.requires_grad for p in mod.parameters(False))]
    if not lins or owners != lins:
        return None
    acc = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    saved: dict = {}

    def keep(mod, args, out):
        saved[mod] = (args[0], out)

    def step():
        hooks = [mod.register_forward_hook(keep) for mod in lins]
        try:
            z = m(x)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            u = torch.softmax(z, -1)
            u[torch.arange(len(y)), y] -= 1
        gs = torch.autograd.grad(z, [saved[mod][1] for mod in lins], u)
        with torch.no_grad():
            for mod, G in zip(lins, gs):
                G2, A = G * G, saved[mod][0]
                acc[id(mod.weight)].addmm_(G2.T, A * A)
                if mod.bias is not None:
                    acc[id(mod.bias)].add_(G2.sum(0))
        saved.clear()

    hooks = [mod.register_forward_hook(keep) for mod in lins]
    try:
        m(x)
        ok = all(a.dim() == 2 and o.dim() == 2 for a, o in saved.values())
    finally:
        for h in hooks:
            h.remove()
        saved.clear()
    return (step, acc) if ok else None


def _summary(meds: dict[str, list[dict]]) -> dict:
    out = {}
    for tree, runs in meds.items():
        keys = [k for k in runs[0] if k != "ops"]
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        spread = {
            k: [min(r[k] / r["floor"] for r in runs), max(r[k] / r["floor"] for r in runs)]
            for k in keys
        }
        out[tree] = {
            "floor_ms": med["floor"] * 1e3,
            "ratio": {k: med[k] / med["floor"] for k in keys},
            "ratio_range": spread,
            "hutchinson_gap_us": (med["step:hutchinson"] - med["bare"]) * 1e6,
            "hutchinson_fused_gap_us": (med["step:hutchinson"] - med["bare:fused"]) * 1e6
            if "bare:fused" in med else None,
            "empirical_gap_us": (med["step:empirical"] - med["bare:empirical"]) * 1e6
            if "bare:empirical" in med else None,
            "cycle_over_step": {k[6:]: med[k] / med[f"step:{k[6:]}"] for k in keys
                                if k.startswith("cycle:")},
            "cycle_over_step_range": {
                k[6:]: [min(r[k] / r[f"step:{k[6:]}"] for r in runs),
                        max(r[k] / r[f"step:{k[6:]}"] for r in runs)]
                for k in keys if k.startswith("cycle:")},
            "ops": runs[0].get("ops"),
        }
    return out


def _markdown(summary: dict, workload: str) -> str:
    lines = [f"### workload ({workload})", ""]
    keys = list(next(iter(summary.values()))["ratio"])
    lines.append("| tree | floor ms | " + " | ".join(keys)
                 + " | HUTCHINSON gap µs (to bare / bare:fused) | EMPIRICAL gap µs | cycle/step |")
    lines.append("|" + "---|" * (len(keys) + 5))
    for tree, s in summary.items():
        cells = [
            f"{s['ratio'][k]:.3f} ({s['ratio_range'][k][0]:.2f}–{s['ratio_range'][k][1]:.2f})"
            for k in keys
        ]
        rng = s.get("cycle_over_step_range", {})
        cyc = ", ".join(f"{t} {v:.3f}" + (f" ({rng[t][0]:.3f}–{rng[t][1]:.3f})" if t in rng else "")
                        for t, v in s["cycle_over_step"].items())
        emp, fused = s.get("empirical_gap_us"), s.get("hutchinson_fused_gap_us")
        lines.append(
            f"| {tree} | {s['floor_ms']:.2f} | " + " | ".join(cells)
            + f" | {s['hutchinson_gap_us']:.0f} / {'—' if fused is None else f'{fused:.0f}'}"
            + f" | {'—' if emp is None else f'{emp:.0f}'} | {cyc} |"
        )
    ops = [(tree, s["ops"]) for tree, s in summary.items() if s.get("ops")]
    if ops:
        kinds = list(ops[0][1])
        lines += ["", "ATen operators per call (kernels, i.e. without views and host reads / all):",
                  "", "| tree | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
        for tree, o in ops:
            lines.append(f"| {tree} | " + " | ".join(
                f"{o[k]['kernels']} / {o[k]['all']}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def _label(tree: str) -> str:
    """A source tree by its commit (``+`` when it has changes), else by its folder name."""
    try:
        sha = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.path.basename(os.path.abspath(tree))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="a,e")
    ap.add_argument("--trees", nargs="+", default=[os.getcwd()])
    ap.add_argument("--rounds", type=int, default=3, help="child processes per tree")
    ap.add_argument("--steps", type=int, default=21, help="interleaved steps per child")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--types", default=",".join(TYPES),
                    help="types of more step:<type> rows (comma-separated)")
    ap.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ops", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.steps, a.size, a.ops, tuple(a.types.split(",")))))
        return 0
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": _cpu_name(),
        "torch": _torch_version(),
        "load": os.getloadavg(),
        "threads": 1,
        "rounds": a.rounds,
        "steps": a.steps,
        "size": a.size,
        "trees": a.trees,
        "workloads": {},
    }
    labels = {t: _label(t) for t in a.trees}
    report["trees"] = list(labels.values())
    md = []
    for w in a.workloads.split(","):
        meds: dict[str, list[dict]] = {labels[t]: [] for t in a.trees}
        for r in range(a.rounds):
            for tree in random.sample(a.trees, len(a.trees)):
                env = dict(os.environ, PYTHONPATH=tree)
                # this file, run against the tree's fimfast and workloads (a tree may predate it)
                cmd = [sys.executable, os.path.abspath(__file__), "--child", w,
                       "--steps", str(a.steps), "--size", a.size, "--types", a.types]
                cmd += ["--ops"] if r == 0 else []
                res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True,
                                     check=True)
                meds[labels[tree]].append(json.loads(res.stdout.strip().splitlines()[-1]))
        summary = _summary(meds)
        report["workloads"][w] = {"summary": summary, "runs": meds}
        md.append(_markdown(summary, w))
        print(md[-1], flush=True)
    report["load_after"] = os.getloadavg()
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(f"Fixed cost per step, {report['date']}, {report['machine']}, torch "
                    f"{report['torch']}, load {report['load']} (after: {report['load_after']}), "
                    f"1 thread, CPU time, {a.rounds} rounds x {a.steps} steps, trees "
                    f"{', '.join(report['trees'])}\n\n" + "\n".join(md))
    return 0


def _cpu_name() -> str:
    try:
        from benchmarks.suite import cpu_name
    except ImportError:
        return platform.processor() or platform.machine()
    return cpu_name()


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
