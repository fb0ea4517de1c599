"""Peak resident memory of one fimfast step on a GPT-2-style LM, measured in a fresh process.

Run as a script (``python tests/peak_memory.py '[{"V": 50000, ...}, ...]'``); prints one JSON
line per configuration with the peak extra memory (bytes above the resident set before the phase)
of

* ``forward``: the model's forward with autograd on (the logits and the graph),
* ``step``: ``DiagFisher.step`` (forward, probes, backward, accumulation),
* ``train``: one training step (forward, the model's own loss, backward into ``.grad``),

and the sizes they are compared with. ``"lm_head": "lm_head"`` passes that option to the
estimator; ``"phases"`` (default all three) limits the measured phases. With
``"abort_after": [k1, k2, ...]`` (for EXACT, whose full run on a large vocabulary takes hours) the
step is stopped by a gradient hook after ``k`` backward calls instead, and ``step_k`` is reported
for every ``k``.

The peak is reset between phases through ``/proc/self/clear_refs`` (Linux), and glibc returns
every block above 64 KiB to the system on free (``MALLOC_MMAP_THRESHOLD_``, set by the caller), so
the resident set follows live tensors.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _phase(fn) -> int:
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    peak = _status("VmHWM")
    del out
    gc.collect()
    return peak - base


def main(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    import fimfast

    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    V, N, T = cfg["V"], cfg["N"], cfg["T"]
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    conf = GPT2Config(
        vocab_size=V,
        n_embd=cfg.get("d", 32),
        n_layer=1,
        n_head=2,
        n_positions=T,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(conf).to(dtype).eval()
    ids = torch.randint(1, V, (N, T))
    mask = torch.ones(N, T, dtype=torch.long)
    if cfg.get("pad", True) and N > 1:
        mask[0, T // 2 :] = 0  # one padded sequence: the valid rows are not all rows
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fim_type = cfg.get("fim_type", "hutchinson")
    extra = {"lm_head": cfg["lm_head"]} if cfg.get("lm_head") else {}
    est = fimfast.DiagFisher(model, fim_type, num_probes=cfg.get("num_probes", 1), seed=0, **extra)
    elem = torch.finfo(dtype).bits // 8
    info = {
        "logits_bytes": N * T * V * elem,
        "logits_f32_bytes": N * T * V * 4,
        "param_bytes": sum(p.numel() for p in model.parameters()) * 4,
    }

    def forward():
        return model(input_ids=ids, attention_mask=mask).logits

    if "abort_after" in cfg:

        class Stop(Exception):
            pass

        calls = [0]
        limit = [0]

        def hook(g):
            calls[0] += 1
            if calls[0] >= limit[0]:
                raise Stop

        # count the backward passes through the logits: both per-sample paths (the generic one and
        # the layer-capture engine, which never forms the head's weight gradient) run them
        def tap(module, args, out):
            if out.requires_grad:
                out.register_hook(hook)

        model.lm_head.register_forward_hook(tap)

        def aborted_step():
            calls[0] = 0
            try:
                est.step(batch)
            except Stop:
                pass
            assert est.state.steps == 0 and calls[0] == limit[0]

        limit[0] = 1
        aborted_step()  # warm-up
        res = {"forward": [_phase(forward) for _ in range(2)]}
        for k in cfg["abort_after"]:
            limit[0] = k
            res[f"step_{k}"] = [_phase(aborted_step)]
        return {**{k: min(v) for k, v in res.items()}, **info}

    phases = cfg.get("phases", ["forward", "step", "train"])
    est.step(batch)  # warm-up: lazy initialisation, state allocated
    if "train" in phases:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def step():
        est.step(batch)

    def train():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    res = {name: [] for name in phases}
    for _ in range(cfg.get("rounds", 2)):
        for name, fn in (("forward", forward), ("step", step), ("train", train)):
            if name in phases:
                res[name].append(_phase(fn))
    return {**{k: min(v) for k, v in res.items()}, **info}


if __name__ == "__main__":
    for c in json.loads(sys.argv[1]):
        print(json.dumps({"config": c, **main(c)}), flush=True)
