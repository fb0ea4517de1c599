"""KFAC (MONTE_CARLO) on workload (a) (MLP 784-512-256-10, B=128) phase by phase against the same
arithmetic in plain torch and against plain products of the same shapes, in **CPU time**
(``time.process_time``, one torch thread), in one process, interleaved with a training step.

    PYTHONPATH=. python benchmarks/kfac_floor.py [rounds]

Each round runs, in turn: a training step (forward and cross-entropy, then the backward into
``.grad``, timed apart), a ``fimfast.fisher(..., "monte_carlo", "kfac")`` call with its phases
timed as in ``benchmarks/kfac_phases.py``, and ``plain``: the same arithmetic without fimfast
(the forward through the ``nn.Sequential``, one MC label per sample, ``torch.autograd.grad`` to
the Linear outputs only, then the upper triangles of ``[x, 1]^T [x, 1]`` and ``g^T g`` by
``fimfast.ops.gram.gram_upper_`` into new buffers, as fimfast's sums), each phase timed. Then,
hot (each repeated on the same buffers), the plain products of the same shapes: the forward's
``addmm``, the full ``x^T x`` (``mm``) and the upper triangle (``gram_upper_``). First, the matrix
products of one call with their shapes (``torch.profiler``): no weight-gradient product runs.

Prints medians over the rounds (us) with the lower and upper quartiles, multiply-adds per ns,
and each phase as a fraction of the training step's median.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch import nn

_MACS = {  # multiply-adds of workload (a), B=128
    "forward": 128 * (784 * 512 + 512 * 256 + 256 * 10),
    "backward to the layer outputs": 128 * (10 * 256 + 256 * 512),
    "A sums": 128 * (785 * 786 + 513 * 514 + 257 * 258) // 2,
    "G sums": 128 * (512 * 513 + 256 * 257 + 10 * 10) // 2,
}


def _plain(model: nn.Sequential, X: torch.Tensor, t: dict) -> None:
    """The plain-torch KFAC (MONTE_CARLO, one label per sample), each phase added to ``t``."""
    from benchmarks.kfac_cputime import _mc_cotangent, linear_forward
    from fimfast.ops.gram import gram_upper_

    pt = time.process_time
    c0 = pt()
    ins, outs, h = linear_forward(model, X)
    c1 = pt()
    u = _mc_cotangent(h)
    c2 = pt()
    grads = torch.autograd.grad(h, outs, u)
    c3 = pt()
    for x in ins:
        y = torch.cat([x.detach(), x.new_ones(x.shape[0], 1)], 1)
        gram_upper_(y.new_empty(y.shape[1], y.shape[1]), y)
    c4 = pt()
    for g in grads:
        if g.shape[1] <= 192:
            torch.mm(g.T, g)
        else:
            gram_upper_(g.new_empty(g.shape[1], g.shape[1]), g)
    c5 = pt()
    for k, v in (("forward", c1 - c0), ("MC labels", c2 - c1),
                 ("backward to the layer outputs", c3 - c2), ("A sums", c4 - c3),
                 ("G sums", c5 - c4), ("call", c5 - c0)):
        t.setdefault(k, []).append(v)


def _hot(reps: int = 50) -> dict:
    """Plain products of (a)'s shapes, repeated on the same buffers (us, median)."""
    from fimfast.ops.gram import gram_upper_

    g = torch.Generator().manual_seed(0)

    def med(f):
        for _ in range(5):
            f()
        v = []
        for _ in range(reps):
            c = time.process_time()
            f()
            v.append(time.process_time() - c)
        return statistics.median(v) * 1e6

    out = {}
    fw = 0.0
    for i, o in ((784, 512), (512, 256), (256, 10)):
        x, w, b = torch.randn(128, i, generator=g), torch.randn(o, i, generator=g), torch.randn(o)
        fw += med(lambda x=x, w=w, b=b: torch.addmm(b, x, w.T))
    out["forward"] = {"addmm": fw}
    for key, ns in (("A sums", (785, 513, 257)), ("G sums", (512, 256))):
        full = tri = 0.0
        for n in ns:
            x, o = torch.randn(128, n, generator=g), torch.empty(n, n)
            full += med(lambda x=x, o=o: torch.mm(x.T, x, out=o))
            tri += med(lambda x=x, o=o: gram_upper_(o, x))
        out[key] = {"mm (full x^T x)": full, "gram_upper_": tri}
    return out


def main(rounds: int) -> dict:
    import fimfast
    from benchmarks import kfac_phases as kp
    from benchmarks.bench_structured import prepare

    torch.set_num_threads(1)
    w, model, full, _ = prepare("a", "full")
    X, y = w.inputs, w.labels
    data = [(X, y)]
    acc: dict = {}
    for module, attr, label in kp._PHASES:
        kp._wrap(acc, module, attr, label)
    fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0).eig()  # as kfac_cputime.py
    train_t: dict = {}
    plain_t: dict = {}
    fim_t: dict = {}
    pt = time.process_time
    faults: dict = {"fimfast": [], "plain": []}
    for r in range(rounds + 3):
        c0 = pt()
        full.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(full(X), y)
        c1 = pt()
        loss.backward()
        c2 = pt()
        f0 = _faults()
        acc.clear()
        c2 = pt()
        fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
        c3 = pt()
        f1 = _faults()
        _plain(model, X, plain_t)
        f2 = _faults()
        if r < 3:  # warm-up rounds
            plain_t.clear()
            continue
        for k, v in (("forward", c1 - c0), ("backward", c2 - c1), ("step", c2 - c0)):
            train_t.setdefault(k, []).append(v)
        fim_t.setdefault("call", []).append(c3 - c2)
        faults["fimfast"].append(f1 - f0)
        faults["plain"].append(f2 - f1)
        for k, v in acc.items():
            fim_t.setdefault(k.strip(), []).append(v)
    return {"products": _products(fimfast, model, data),
            "train": _summary(train_t), "fimfast": _summary(fim_t),
            "plain": _summary(plain_t), "hot": _hot(),
            "page_faults": {k: statistics.median(v) for k, v in faults.items()}}


def _products(fimfast, model, data) -> list[str]:
    """The matrix products of one call, with their operand shapes (``torch.profiler``): the
    forward's ``addmm``, the backward's input-gradient ``mm`` (a weight gradient would be an
    ``mm`` of the transposed output gradient and the layer input) and the factor sums."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fimfast.fisher(model, data, "monte_carlo", "kfac", seed=0)
    kinds = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "fimfast::gram_upper_")
    return [f"{e.name} {e.input_shapes}" for e in prof.events() if e.name in kinds]


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _summary(t: dict) -> dict:
    out = {}
    for k, v in t.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[k] = {"median": statistics.median(v) * 1e6, "q1": q[0] * 1e6, "q3": q[2] * 1e6}
    return out


def table(res: dict) -> str:
    step = res["train"]["step"]["median"]
    lines = ["products of one fimfast call: " + "; ".join(res["products"]), "",
             f"median minor page faults a call: {res['page_faults']}", "",
             f"training step {step:.0f} us (forward and loss "
             f"{res['train']['forward']['median']:.0f}, backward "
             f"{res['train']['backward']['median']:.0f})", "",
             "| phase | multiply-adds | fimfast us (q1-q3) | MAC/ns | plain us (q1-q3) | MAC/ns "
             "| hot products of the shapes, us (MAC/ns) | fimfast / step |",
             "|---|---|---|---|---|---|---|---|"]
    names = [("call", "call", None), ("forward", "forward (model, rows)", "forward"),
             ("MC labels", "MC labels and score columns", None),
             ("backward to the layer outputs", "backward to the layer outputs",
              "backward to the layer outputs"),
             ("A sums", "A sums", "A sums"), ("G sums", "G sums", "G sums")]
    for plain_key, fim_key, mac_key in names:
        f, p = res["fimfast"].get(fim_key), res["plain"].get(plain_key)
        macs = _MACS.get(mac_key) if mac_key else None

        def cell(d, macs=macs):
            if d is None:
                return "", ""
            rate = f"{macs / d['median'] / 1e3:.1f}" if macs else ""
            return f"{d['median']:.0f} ({d['q1']:.0f}-{d['q3']:.0f})", rate

        fc, fr = cell(f)
        pc, pr = cell(p)
        hot = res["hot"].get(plain_key, {})
        hc = ", ".join(f"{k} {v:.0f} ({macs * (2 if k.startswith('mm') else 1) / v / 1e3:.1f})"
                       for k, v in hot.items()) if macs else ""
        share = f"{f['median'] / step:.3f}" if f else ""
        lines.append(f"| {fim_key} | {macs or ''} | {fc} | {fr} | {pc} | {pr} | {hc} | {share} |")
    lines += ["", "| other fimfast phase | us (q1-q3) | fraction of the step |", "|---|---|---|"]
    shown = {k for _, k, _ in names}
    for k, d in res["fimfast"].items():
        if k not in shown:
            lines.append(f"| {k} | {d['median']:.0f} ({d['q1']:.0f}-{d['q3']:.0f}) | "
                         f"{d['median'] / step:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    res = main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
    print(table(res))
    print(json.dumps(res))
