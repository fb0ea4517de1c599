"""A realistic scale point: GPT-2 small on the CPU, Fisher steps against one training step.

The model is ``transformers.GPT2LMHeadModel`` built from a config with random weights (no
download): 12 layers, d=768, 12 heads, 1024 positions, V=50257, ``lm_head`` tied to the token
embedding ``wte``: 124,439,808 parameters. The batch is ``N`` random sequences of ``T`` tokens,
labels the inputs (Hugging Face's shift: position ``t`` predicts token ``t + 1``; ``N (T - 1)``
Fisher rows). Eval mode (no dropout), float32.

Methods, each with its own estimator (fimfast's reduction ``"sum"``):

* ``train``: one training step: forward, the model's own mean cross-entropy, ``backward``, an
  ``SGD`` step and ``zero_grad(set_to_none=True)``: the unit of the ratios. The learning rate is 0:
  the update runs all the same, and the weights stay, so that every method sees one model and the
  closed-form checks below hold to rounding;
* ``hutchinson_lm_head``: ``DiagFisher(model, "hutchinson", lm_head="lm_head").step(batch)``:
  the probes run through the head in row tiles, the ``(N, T, V)`` logits never exist
  (fimfast/lm_head.py);
* ``hutchinson``: the same without the option (the logits formed and back-propagated);
* ``monte_carlo_seq``: MONTE_CARLO with ``sequence_rows=True`` (one backward column per draw);
* ``empirical``, ``monte_carlo``: token rows: one backward column per position (docs/math.md §3,
  "Sequence rows"), ``T - 1`` columns, so their cost grows like ``T`` training steps;
* ``cl_ggn_hutchinson``, ``cl_fishermc_hutchinson``: curvlinops' ``hutchinson_diag`` (1 matvec) of
  its ``GGNLinearOperator`` / ``FisherMCLinearOperator`` (1 sample) on the ``(N (T-1), V)`` logits,
  under the composite attention kernel (forward-mode AD has no rule for the fused one).

EXACT is not run: it needs ``V`` backward columns per position, ``(T - 1) V`` per sequence
(12,815,535 at T=256), against ~1 for a training step.

Protocol: per method, set-up (not timed), a first call under ``--max-call-s`` (a method past it is
recorded as too slow with the time it had run, and dropped), a second call counted by
:mod:`benchmarks.opcount` (ATen operators below autograd), then ``--rounds`` rounds, every method
once per round in a new random order (:func:`benchmarks.timing.interleaved`); ratios are medians
over the training step's median in the same rounds. Peak memory of every timed call: the resident
set (:class:`benchmarks.memory.PeakMeter`: VmHWM reset before the call, peak minus the RSS before
it, heap trimmed; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
blocks leave the resident set), median over the rounds, outputs (e.g. the training gradients)
included.

Checks (after the rounds, in the results): every fimfast estimate finite and nonnegative; on the
vocabulary rows that occur nowhere in the batch, the tied weight's diagonal has only the head's
term, in closed form from the final hidden states ``h`` and the probabilities ``p``:
``F[v, j] = sum_r p_rv (1 - p_rv) h_rj^2`` and the empirical ``sum_r p_rv^2 h_rj^2``. EMPIRICAL is
compared coordinate by coordinate (relative error over the slice), the random estimators by the
sum over the slice (a few million coordinates: a one-draw relative error of a few percent).

Usage: ``python benchmarks/bench_gpt2.py [--config gpt2|tiny] [--batch 2] [--seq-len 256]
[--rounds 3] [--threads 1] [--methods train,hutchinson_lm_head,...] [--max-call-s 600]
[--json out.json]`` (markdown written next to the JSON).
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
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import memory, timing  # noqa: E402
from benchmarks.opcount import count_ops  # noqa: E402

CONFIGS = {
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024},
    "tiny": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 512, "n_positions": 32},
}
DEFAULT_METHODS = ("train", "hutchinson_lm_head", "hutchinson", "monte_carlo_seq", "empirical",
                   "monte_carlo", "cl_ggn_hutchinson", "cl_fishermc_hutchinson")
FIMFAST = {
    "hutchinson_lm_head": ("hutchinson", {"lm_head": "lm_head"}),
    "hutchinson": ("hutchinson", {}),
    "monte_carlo_seq": ("monte_carlo", {"sequence_rows": True}),
    "empirical": ("empirical", {}),
    "monte_carlo": ("monte_carlo", {}),
}


def build(config: str, batch: int, seq_len: int, seed: int = 0):
    """``(model, batch)``: the random-init GPT-2 of ``config`` and ``batch`` random sequences."""
    import transformers

    transformers.logging.set_verbosity_error()
    conf = transformers.GPT2Config(**CONFIGS[config], bos_token_id=0, eos_token_id=0)
    if seq_len > conf.n_positions:
        raise ValueError(f"--seq-len {seq_len} exceeds the {conf.n_positions} positions of "
                         f"config {config!r}")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(conf).eval()
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("lm_head is not tied to wte")
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, conf.vocab_size, (batch, seq_len), generator=g)
    return model, {"input_ids": ids, "labels": ids}


class _Rows(torch.nn.Module):
    """``(N (T - 1), V)`` logits of the positions that have a label (curvlinops' view)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.model(input_ids=ids).logits[:, :-1]
        return z.reshape(-1, z.shape[-1])


def _curvlinops(model, batch, kind: str):
    from curvlinops import FisherMCLinearOperator, GGNLinearOperator, hutchinson_diag
    from torch.nn.attention import SDPBackend, sdpa_kernel

    wrapped = _Rows(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    ids = batch["input_ids"]
    data = [(ids, ids[:, 1:].reshape(-1))]
    lossfn = torch.nn.CrossEntropyLoss(reduction="sum")

    def call():
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no forward-mode AD
            if kind == "fmc":
                seed = int(torch.randint(0, 2**31 - 1, (1,)))
                A = FisherMCLinearOperator(wrapped, lossfn, params, data, num_data=ids.shape[0],
                                           check_deterministic=False, mc_samples=1, seed=seed)
            else:
                A = GGNLinearOperator(wrapped, lossfn, params, data, num_data=ids.shape[0],
                                      check_deterministic=False)
            return hutchinson_diag(A, num_matvecs=1)

    return call, lambda: None


def make_methods(model, batch, names) -> tuple[dict, dict]:
    """``({name: (call, cleanup)}, {name: fimfast estimator})``."""
    import fimfast

    calls, ests = {}, {}
    for name in names:
        if name == "train":
            opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the update runs, the weights stay

            def train(opt=opt):
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            calls[name] = (train, lambda: None)
        elif name in FIMFAST:
            fim_type, opts = FIMFAST[name]
            est = ests[name] = fimfast.DiagFisher(model, fim_type, reduction="sum", seed=0, **opts)
            calls[name] = ((lambda est=est: est.step(batch)), lambda: None)
        elif name in ("cl_ggn_hutchinson", "cl_fishermc_hutchinson"):
            calls[name] = _curvlinops(model, batch, "fmc" if "fisher" in name else "ggn")
        else:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(DEFAULT_METHODS)}")
    return calls, ests


def head_check(model, batch, ests: dict) -> dict:
    """Finiteness, sign, and the closed form of the tied weight's rows absent from the batch."""
    ids = batch["input_ids"]
    with torch.no_grad():
        h = model.transformer(input_ids=ids).last_hidden_state[:, :-1]
        h = h.reshape(-1, model.config.n_embd)
        p = torch.softmax(model.lm_head(h).double(), -1)
    free = torch.ones(model.config.vocab_size, dtype=torch.bool)
    free[ids.unique()] = False
    h2 = h.double() ** 2
    pf = p[:, free]
    closed = {"fim": (pf * (1 - pf)).T @ h2, "ef": (pf**2).T @ h2}  # (free rows, d)
    out = {"free_vocabulary_rows": int(free.sum())}
    for name, est in ests.items():
        res = est.result()
        vals = [res[n] for n in est.names]
        steps = int(est.state.steps)  # every step was on this batch: the state sums them
        r = {"steps": steps,
             "finite": all(bool(torch.isfinite(v).all()) for v in vals),
             "nonnegative": all(bool((v >= 0).all()) for v in vals)}
        got = res["transformer.wte.weight"].double()[free] / steps  # = lm_head.weight (tied)
        if name == "empirical":
            ref = closed["ef"]
            r["rel_err_free_rows"] = float((got - ref).norm() / ref.norm())
        else:
            ref = closed["fim"]
            r["rel_err_sum_free_rows"] = float((got.sum() - ref.sum()).abs() / ref.sum())
        out[name] = r
    return out


def _provenance(args) -> dict:
    from importlib import metadata

    import fimfast
    from benchmarks.suite import cpu_name

    cpu = cpu_name()

    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True
                              ).stdout.strip()

    versions = {}
    for pkg in ("torch", "transformers", "curvlinops-for-pytorch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": ["python", "benchmarks/bench_gpt2.py", *sys.argv[1:]],
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(), "platform": platform.platform(),
        "python": platform.python_version(), "versions": versions,
        "fimfast_version": fimfast.__version__, "fimfast_git_sha": git("rev-parse", "HEAD"),
        "fimfast_git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def run(args) -> dict:
    """Build, warm up, count, time in interleaved rounds, check; returns the results."""
    torch.set_num_threads(args.threads)
    model, batch = build(args.config, args.batch, args.seq_len, args.seed)
    N, T = batch["input_ids"].shape
    V = model.config.vocab_size
    names = [m for m in args.methods.split(",") if m]
    if "train" not in names:
        names.insert(0, "train")
    calls, ests = make_methods(model, batch, names)
    res: dict = {
        "provenance": _provenance(args),
        "config": {"name": args.config, **CONFIGS[args.config], "batch": N, "seq_len": T,
                   "rows": N * (T - 1), "tied_lm_head": True,
                   "num_params": sum(p.numel() for p in model.parameters())},
        "exact_not_run": {"backward_columns_per_sequence": (T - 1) * V,
                          "backward_columns_total": N * (T - 1) * V,
                          "note": "EXACT needs V columns per position; a training step is ~1"},
        "memory_method": "resident set: peak (VmHWM reset before the call) minus RSS before it",
        "methods": {},
    }
    timer = timing.CallTimer(args.max_call_s)
    for name in list(calls):
        fn, cleanup = calls[name]
        r = res["methods"][name] = {}
        try:
            r["first_call_s"] = timer(fn, cleanup)
            if args.ops:  # a second, warm call: lazy set-up not counted
                c = count_ops(fn)
                cleanup()
                r.update(ops_per_call=c["ops"], views_per_call=c["views"], top_ops=c["top"])
        except timing.TooSlow as exc:
            r.update(status="too_slow", elapsed_before_abort_s=exc.elapsed)
            del calls[name]
            ests.pop(name, None)
            continue
        except Exception as exc:  # noqa: BLE001 - an unsupported method is a result
            r.update(status="error", error=f"{type(exc).__name__}: {exc}"[:400])
            del calls[name]
            ests.pop(name, None)
            continue
        r["status"] = "ok"
        _log(f"{name}: first call {r['first_call_s']:.2f} s, {r.get('ops_per_call')} ops")
    meter = memory.PeakMeter("cpu")
    times: dict[str, list[float]] = {n: [] for n in calls}
    peaks: dict[str, list[float]] = {n: [] for n in calls}
    rng = random.Random(args.seed)
    for _ in range(args.rounds):  # interleaved: a new random order each round
        order = list(calls)
        rng.shuffle(order)
        for name in order:
            fn, cleanup = calls[name]
            meter.begin()  # gc, heap trim, RSS before, peak counter reset: not timed
            try:
                times[name].append(timer(fn))
            except Exception as exc:  # noqa: BLE001
                res["methods"][name].update(status="error",
                                            error=f"{type(exc).__name__}: {exc}"[:400])
                del calls[name]
                ests.pop(name, None)
                continue
            peaks[name].append(meter.end())
            cleanup()
    floor = statistics.median(times["train"]) if times.get("train") else None
    for name, ts in times.items():
        r = res["methods"][name]
        if not ts:
            continue
        r["times_s"] = ts
        r["time_s"] = statistics.median(ts)
        r["ratio_to_train"] = r["time_s"] / floor if floor else None
        r["peak_extra_mb"] = statistics.median(peaks[name])
        r["peak_extra_mb_max"] = max(peaks[name])
        _log(f"{name}: {r['time_s']:.2f} s, x{r['ratio_to_train']:.2f}, "
             f"{r['peak_extra_mb']:.0f} MB")
    for r in res["methods"].values():
        if r.get("status") == "too_slow" and floor:
            r["ratio_to_train_lower_bound"] = r["elapsed_before_abort_s"] / floor
    res["checks"] = head_check(model, batch, ests)
    return res


def markdown(res: dict) -> str:
    """One table: time, ratio to the training step, ops, peak memory, check."""
    prov, cfg = res["provenance"], res["config"]
    out = [
        f"GPT-2-shaped causal LM ({cfg['name']}: {cfg['n_layer']} layers, d={cfg['n_embd']}, "
        f"{cfg['n_head']} heads, V={cfg['vocab_size']:,}, tied head, {cfg['num_params']:,} "
        f"parameters), N={cfg['batch']} x T={cfg['seq_len']} ({cfg['rows']:,} rows). "
        f"Run of {prov['time']} on {prov['cpu']} ({prov['logical_cpus']} logical CPUs, torch "
        f"threads {prov['torch_threads']}, load {prov['load_average_at_start'][0]:.2f}), torch "
        f"{prov['versions']['torch']}, transformers {prov['versions']['transformers']}, curvlinops "
        f"{prov['versions']['curvlinops-for-pytorch']}, fimfast @ "
        f"`{prov['fimfast_git_sha'][:10]}`{' (dirty)' if prov['fimfast_git_dirty'] else ''}. "
        f"Command: `{' '.join(prov['argv'])}`.",
        "",
        "| method | time s | x training step | ops/step (non-view) | peak extra MB (RSS) | check "
        "| status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    checks = res.get("checks", {})
    for name, r in res["methods"].items():
        ops = r.get("ops_per_call")
        opss = "-" if ops is None else f"{ops:,} ({ops - r['views_per_call']:,})"
        c = checks.get(name, {})
        chk = "-"
        if c:
            err = c.get("rel_err_free_rows", c.get("rel_err_sum_free_rows"))
            what = "coordinates" if "rel_err_free_rows" in c else "sum"
            chk = (f"{'finite' if c['finite'] else 'NON-FINITE'}, "
                   f"{'>= 0' if c['nonnegative'] else 'NEGATIVE'}; free rows, {what}: "
                   f"rel. err {err:.2g}")
        if r.get("status") == "too_slow":
            lb = r.get("ratio_to_train_lower_bound")
            st = (f"too slow: stopped after {r['elapsed_before_abort_s']:.0f} s"
                  + (f" (> {lb:.0f}x training step)" if lb else ""))
        else:
            st = r.get("status", "?") if r.get("status") != "ok" else ""
            if r.get("error"):
                st += f": `{r['error'][:150]}`"
        t, ratio, mb = r.get("time_s"), r.get("ratio_to_train"), r.get("peak_extra_mb")
        out.append(f"| {name} | {'-' if t is None else f'{t:.2f}'} | "
                   f"{'-' if ratio is None else f'{ratio:.2f}'} | {opss} | "
                   f"{'-' if mb is None else f'{mb:,.0f}'} | {chk} | {st} |")
    ex = res["exact_not_run"]
    out += ["", f"EXACT not run: {ex['backward_columns_per_sequence']:,} backward columns per "
            f"sequence ({ex['backward_columns_total']:,} for the batch) against ~1 for a training "
            "step."]
    return "\n".join(out) + "\n"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="gpt2")
    ap.add_argument("--batch", type=int, default=2, help="sequences N")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence T")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated, of: " + ", ".join(DEFAULT_METHODS))
    ap.add_argument("--max-call-s", type=float, default=600.0,
                    help="a first call past this is stopped; the method is recorded as too slow")
    ap.add_argument("--no-ops", dest="ops", action="store_false",
                    help="skip the operator count (one more call per method)")
    ap.add_argument("--json", default=None, help="results JSON (markdown next to it)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    warnings.simplefilter("ignore")
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed large blocks leave the RSS
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
