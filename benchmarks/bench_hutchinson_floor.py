"""Where a one-probe HUTCHINSON step's cost above a training step goes, paired in one process.

Every round runs each variant below once, in a new random order, on one workload of
:mod:`benchmarks.workloads` (one torch thread, CPU time of the process, ``time.process_time_ns``);
a variant's figure is the median over the rounds of its time over the ``floor`` of the same round
(paired ratios), with the quartiles. The variants:

- ``floor``: a training step without the update: ``zero_grad(set_to_none=True)``, forward,
  cross-entropy, backward into ``.grad``;
- ``floor+sgd``: the same and SGD's update ``p -= lr g`` in torch's multi-tensor ``add_``
  (``lr = 0``, so the model stays the same), the arithmetic of ``torch.optim.SGD.step`` without
  its Python; ``floor+optim``: with ``torch.optim.SGD(lr=0).step()`` itself;
- ``step``: ``fimfast.DiagFisher(model, "hutchinson", seed=0).step(batch)``; ``step:addcmul``:
  the same step of a second estimator with its squares added by torch's multi-tensor ``addcmul``
  instead of the extension's loop (csrc/cpu/fold_squares.cpp; the two are the same arithmetic,
  bit for bit), as before that loop existed (absent without the extension);
- ``bare``: the arithmetic of that step written by hand: forward, fimfast's fused probe kernel,
  ``torch.autograd.grad`` of the logits to the parameters, one ``_foreach_addcmul_`` of the
  squares into float32 accumulators;
- ``bare:noacc``: ``bare`` without the accumulation (forward, probe, backward only);
- ``floor:lean``: ``floor`` with every ``nn.MultiheadAttention`` call through
  :func:`fimfast.lean_mha.forward` (the forward the HUTCHINSON steps run; torch's where it does
  not apply), so that ``floor:lean - floor`` is what that forward changes in a training step;
- ``bare:hook-fold``: ``bare`` with every square folded in the backward, as each gradient is
  produced (a tensor hook on every parameter, the gradient still hot in the caches), and no pass
  afterwards; ``bare:hook-noop``: the same hooks doing nothing and the pass afterwards (their
  own cost, so that the difference of the two is the fold's gain alone). The hooks stay
  registered for the whole run and act only while their variant runs.

The differences read: ``bare - bare:noacc`` the accumulation pass, ``bare:noacc - floor`` the
probe's backward seed against cross-entropy's, ``step - bare`` fimfast's own work per step (its
checks, bookkeeping and dispatch), ``bare:hook-noop - bare:hook-fold`` what folding in the
backward saves.

    PYTHONPATH=. python benchmarks/bench_hutchinson_floor.py --workload a --rounds 2000 \\
        [--variants step,step:addcmul] [--out benchmarks/results/NAME]   # writes NAME.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path


def run(workload: str, rounds: int, seed: int = 0, size: str = "full",
        only: tuple[str, ...] = ()) -> dict:
    """Paired times of the variants (see the module docstring), microseconds and ratios; of
    ``floor`` and those of ``only`` when given."""
    import torch
    import torch.nn.functional as F

    import fimfast
    from benchmarks.workloads import build

    torch.set_num_threads(1)
    wl = build(workload, size, 0)
    model, x, y = wl.model, wl.inputs, wl.labels
    params = [p for p in model.parameters() if p.requires_grad]
    est = fimfast.DiagFisher(model, "hutchinson", seed=0)
    opt = torch.optim.SGD(params, lr=0.0)

    def logits():
        out = model(x)
        return out.logits if hasattr(out, "logits") else out

    def floor():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits().flatten(0, -2), y.flatten()).backward()

    def floor_lean():
        from torch import nn

        from fimfast import lean_mha

        real = nn.MultiheadAttention.forward
        for m in mhas:
            m.forward = functools.partial(lean_mha.forward, m)
        try:
            floor()
        finally:
            for m in mhas:
                del m.forward
        assert nn.MultiheadAttention.forward is real

    mhas = [m for m in model.modules() if type(m) is torch.nn.MultiheadAttention]

    def floor_sgd():
        floor()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.0)

    def floor_optim():
        floor()
        opt.step()

    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    offset = [0]

    def backward():
        z = logits()
        zd = z.detach().flatten(0, -2)
        u = fimfast.ops.probe_logit_grad(zd, "hutchinson", 0, offset[0], 1)[0]
        offset[0] += 2 * zd.numel()
        return torch.autograd.grad(z, params, u.to(z.dtype).view(z.shape))

    def bare():
        g = backward()
        torch._foreach_addcmul_(acc, g, g)

    def bare_noacc():
        backward()

    fold = [False]

    def hook(a):
        def h(g):
            if fold[0]:
                a.addcmul_(g, g)
        return h

    handles = [p.register_hook(hook(a)) for p, a in zip(params, acc)]

    def hook_fold():
        fold[0] = True
        try:
            backward()
        finally:
            fold[0] = False

    def hook_noop():
        g = backward()
        torch._foreach_addcmul_(acc, g, g)

    fns = {
        "floor": floor, "floor:lean": floor_lean, "floor+sgd": floor_sgd,
        "floor+optim": floor_optim,
        "step": lambda: est.step((x, y)), "bare": bare, "bare:noacc": bare_noacc,
        "bare:hook-fold": hook_fold, "bare:hook-noop": hook_noop,
    }
    from fimfast import prepared

    host = getattr(prepared, "_host", None)
    if host is not None and len(host()) > 2 and host()[2] is not None:
        est_addcmul = fimfast.DiagFisher(model, "hutchinson", seed=0)

        def step_addcmul():
            fold, prepared._HOST[2] = prepared._HOST[2], None
            try:
                est_addcmul.step((x, y))
            finally:
                prepared._HOST[2] = fold

        fns["step:addcmul"] = step_addcmul
    if only:
        fns = {k: f for k, f in fns.items() if k == "floor" or k in only}
    # the hooks of the hook variants would run (doing nothing) in the others' backwards too
    plain = {"floor", "floor:lean", "floor+sgd", "floor+optim", "step", "step:addcmul", "bare",
             "bare:noacc"}
    clock, rng = time.process_time_ns, random.Random(seed)
    times: dict[str, list[int]] = {k: [] for k in fns}
    keys = list(fns)
    try:
        for i in range(rounds + 5):  # five warm-up rounds
            rng.shuffle(keys)
            for k in keys:
                if k in plain:
                    for h in handles:
                        h.remove()
                    handles.clear()
                elif not handles:
                    handles[:] = [p.register_hook(hook(a)) for p, a in zip(params, acc)]
                t0 = clock()
                fns[k]()
                if i >= 5:
                    times[k].append(clock() - t0)
    finally:
        for h in handles:
            h.remove()
    out: dict = {"workload": workload, "size": size, "rounds": rounds, "variants": {}}
    fl = times["floor"]
    for k, v in times.items():
        r = sorted(a / b for a, b in zip(v, fl))
        s = sorted(v)
        out["variants"][k] = {
            "median_us": statistics.median(v) / 1e3,
            "q25_us": s[len(s) // 4] / 1e3, "q75_us": s[(3 * len(s)) // 4] / 1e3,
            "ratio_median": statistics.median(r),
            "ratio_q25": r[len(r) // 4], "ratio_q75": r[(3 * len(r)) // 4],
        }
    for a, b in (("floor:lean", "floor"), ("step", "step:addcmul"), ("step", "bare"),
                 ("bare", "bare:noacc"), ("bare:noacc", "floor"),
                 ("bare:hook-noop", "bare:hook-fold"), ("step", "floor+sgd")):
        if a not in times or b not in times:
            continue
        d = sorted((p - q) / 1e3 for p, q in zip(times[a], times[b]))
        out[f"{a} - {b}"] = {"median_us": statistics.median(d), "q25_us": d[len(d) // 4],
                             "q75_us": d[(3 * len(d)) // 4]}
    return out


def _table(res: dict) -> str:
    lines = [f"workload ({res['workload']}) {res['size']}, {res['rounds']} paired rounds",
             f"{'variant':16s} {'median us':>10s} {'(q25-q75)':>16s} {'/ floor':>8s} "
             f"{'(q25-q75)':>14s}"]
    for k, v in res["variants"].items():
        lines.append(f"{k:16s} {v['median_us']:10.0f} ({v['q25_us']:6.0f}-{v['q75_us']:6.0f}) "
                     f"{v['ratio_median']:8.3f} ({v['ratio_q25']:.3f}-{v['ratio_q75']:.3f})")
    for k, v in res.items():
        if " - " in k:
            lines.append(f"{k:32s} {v['median_us']:8.1f} us ({v['q25_us']:.1f} to "
                         f"{v['q75_us']:.1f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="a")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--variants", default="", help="comma-separated: only these and floor")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = run(a.workload, a.rounds, size=a.size, only=tuple(filter(None, a.variants.split(","))))
    res["machine"] = {"platform": platform.platform(), "load": os.getloadavg(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    print(_table(res), flush=True)
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
