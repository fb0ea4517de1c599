"""CI seeds on which the per-sample engine currently fails, with the reason.

``tests/test_fuzz.py`` marks these ``xfail(strict=True)``: once the engine handles a seed"s model,
the seed passes, the strict xfail reports XPASS as a failure, and its entry must be removed here.
The reasons name the constructs of the model that its failure involves (the smallest failing
models, from ``python -m fuzz --seed <seed> --shrink`` in ``tests/``, keep only those); replay a
seed with ``FIMFAST_FUZZ_SEED=<seed>``.
"""

REASONS = {
    "ckpt_reentrant": "checkpoint(use_reentrant=True): the step raises (autograd.grad inside the "
                      "block) or gives the block's parameters zeros",
    "ckpt_nr": "checkpoint(use_reentrant=False) around MultiheadAttention: the recomputation "
               "differs from the captured forward (CheckpointError, or wrong numbers when the "
               "samples are coupled)",
    "compile": "torch.compile with aot_eager/inductor: zeros for every layer but the head",
    "hook": "a user forward hook that changes a module's output is left out of the per-sample "
            "gradients",
    "cumsum": "samples coupled by a cumsum along the batch: not detected",
    "mix_tn": "samples coupled (mean or roll along the batch, BatchNorm batch statistics) in a "
              "batch-first model with T == N: not detected",
    "sf": "sequence-first (T, N, d) layout with T == N: batch dimension guessed from the sizes",
    "bn": "BatchNorm in train mode: the step updates its running statistics",
}

_SEEDS: dict[int, tuple[str, ...]] = {
    3: ("hook",),
    4: ("compile",),
    5: ("ckpt_reentrant",),
    6: ("compile", "hook", "cumsum"),
    7: ("hook", "cumsum"),
    8: ("hook", "sf"),
    10: ("hook",),
    11: ("ckpt_nr", "hook"),
    17: ("cumsum", "sf"),
    19: ("sf",),
    22: ("cumsum",),
    26: ("ckpt_reentrant",),
    27: ("ckpt_reentrant", "sf"),
    28: ("ckpt_reentrant",),
    31: ("cumsum",),
    32: ("sf",),
    34: ("ckpt_reentrant",),
    35: ("ckpt_reentrant", "hook"),
    37: ("hook",),
    39: ("hook",),
    48: ("ckpt_reentrant", "bn"),
    49: ("cumsum",),
    50: ("ckpt_reentrant", "hook", "cumsum"),
    52: ("ckpt_reentrant",),
    54: ("ckpt_reentrant",),
    55: ("ckpt_reentrant", "hook"),
    56: ("hook",),
    60: ("ckpt_reentrant", "cumsum"),
    64: ("hook",),
    65: ("ckpt_reentrant",),
    66: ("hook",),
    68: ("ckpt_reentrant",),
    72: ("ckpt_reentrant", "cumsum"),
    74: ("hook",),
    75: ("hook", "cumsum"),
    78: ("cumsum",),
    80: ("ckpt_reentrant",),
    82: ("hook",),
    86: ("bn",),
    88: ("ckpt_reentrant", "hook"),
    90: ("ckpt_reentrant", "hook"),
    91: ("ckpt_reentrant",),
    96: ("ckpt_reentrant",),
    101: ("ckpt_reentrant", "hook"),
    111: ("ckpt_reentrant",),
    120: ("compile",),
    121: ("compile",),
    125: ("ckpt_reentrant",),
    128: ("ckpt_reentrant",),
    129: ("ckpt_reentrant",),
    130: ("hook",),
    137: ("hook",),
    141: ("ckpt_reentrant", "bn"),
    143: ("ckpt_reentrant", "cumsum", "bn"),
    146: ("sf",),
    148: ("ckpt_reentrant",),
    149: ("ckpt_reentrant", "sf"),
    152: ("hook", "mix_tn"),
    154: ("hook",),
    159: ("ckpt_reentrant", "hook", "sf"),
    161: ("hook", "bn"),
    164: ("cumsum",),
    168: ("ckpt_reentrant", "hook"),
    177: ("ckpt_reentrant",),
    180: ("hook",),
    181: ("ckpt_reentrant", "hook", "bn"),
    183: ("hook", "cumsum"),
    185: ("ckpt_reentrant",),
    186: ("hook",),
    188: ("ckpt_nr", "sf"),
    189: ("ckpt_reentrant", "hook"),
    190: ("ckpt_reentrant",),
    196: ("ckpt_reentrant", "hook"),
    197: ("ckpt_reentrant",),
    198: ("hook",),
}

KNOWN: dict[int, str] = {s: "; ".join(REASONS[k] for k in ks) for s, ks in _SEEDS.items()}
