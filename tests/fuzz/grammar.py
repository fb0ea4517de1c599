"""The architecture grammar of the fuzzer: a seed -> a :class:`Spec` (pure data) -> a float64 model.

A model is ``stem -> blocks -> [pool -> vector blocks] -> head -> output wrapper``:

* **stem** (the input): feature vectors ``(N, F)``; token ids ``(N, T)`` through ``nn.Embedding``;
  float sequences ``(N, T, d)``; bags of ids ``(N, B)`` through ``nn.EmbeddingBag`` (2-D ids, or
  flat ids with offsets); signals ``(N, c, L)``, images ``(N, c, H, W)``, volumes
  ``(N, c, D, H, W)``.
* **layout** of sequences: batch first ``(N, T, d)`` or sequence first ``(T, N, d)`` (the model
  transposes after the stem; every sequence block then runs in that layout: attention and RNNs with
  ``batch_first=False``, a batch-mixing op along dim 1, ...).
* **blocks**: Linear, functional ``F.linear`` on bare ``nn.Parameter``s, LayerNorm / RMSNorm /
  GroupNorm / BatchNorm (each BatchNorm in train or eval mode, with or without running
  statistics), InstanceNorm (the same), activations, PReLU, Bilinear (variants of a drawn
  GroupNorm or BatchNorm, activation or Linear, from a second random stream: :func:`_variant`),
  a Linear on a sequence's positions flattened with the batch (``h.reshape(-1, d)``, a variant
  from a third stream),
  one Linear called twice (reuse), two Linears sharing a weight (tied, also transposed), ops that
  couple the samples of the batch (cumsum, mean, roll along the batch dim), nn.MultiheadAttention
  (packed or separate key/value projections, causal mask, key padding mask),
  nn.TransformerEncoderLayer, nn.RNN / LSTM (with projections) / GRU (bidirectional, stacked),
  Conv1d over a sequence; Conv1d/2d/3d, ConvTranspose1d/2d (stride, padding, dilation, groups,
  circular padding), pooling on signals/images/volumes. Any shape-preserving block may be a
  residual; any block may run under ``torch.utils.checkpoint`` (``use_reentrant`` True or False);
  its main module may carry a user forward hook that changes its output (``out * 0.5 + 0.1``) or a
  pre-hook that changes its input.
* **head**: ``(N, C)`` class logits (pooled: mean, masked mean, first or last position, flatten)
  or ``(N, T, C)`` token logits with padding (``attention_mask`` and ``ignore_index`` labels); a
  Linear, ``F.linear`` on bare parameters, or the embedding table tied as the output layer; an
  optional learnable scalar temperature; a forward hook on the head.
* **output**: a tensor, a tuple ``(logits, aux)``, a dict with ``"logits"``, or an object with
  ``.logits``; batches ``(x, y)`` or a mapping ``{"input_ids", "attention_mask", "labels"}``.
* **model**: train or eval mode (BatchNorm layers set apart), optionally ``torch.compile``'d
  (backend ``eager`` or ``aot_eager``; ``inductor`` only where the caller allows it).

Sizes are small (the oracle forms every row's full Jacobian) and drawn from a pool that makes
coincidences likely on purpose: ``T == N == C``, ``d == N``, ``C == T`` ... (a layer whose batch
dimension cannot be told from its sizes).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn
from torch.utils.checkpoint import checkpoint

ACTS = ("tanh", "gelu", "silu", "sigmoid", "relu", "softplus", "elu")
SEQ_KINDS = ("tokens", "fseq")
CHANNEL_KINDS = ("sig", "img", "vol")


# --------------------------------------------------------------------------------------------- #
# spec (pure data)
# --------------------------------------------------------------------------------------------- #
@dataclass
class Spec:
    """One architecture, as data: what :func:`build` constructs (see the module docstring).

    Attributes:
        seed: the seed it was drawn from (also seeds the weights and the batch).
        N, T, C: batch size, sequence length (sequence inputs), classes.
        stem: the input and its first layer (``{"kind": ...}``).
        layout: ``bf`` (batch first) or ``sf`` (sequence first) for sequences.
        blocks: blocks on the stem's kind; ``vblocks``: blocks after pooling, on ``(N, d)``.
        pool: the reduction to ``(N, d)`` for class logits of non-vector kinds (or ``None``).
        head: the output layer.
        task: ``cls`` (``(N, C)`` logits) or ``token`` (``(N, T, C)``).
        mask: the batch has padding (``attention_mask`` in a mapping batch, ignored labels).
        kpm: attention blocks get the key padding mask.
        out: output wrapper (``tensor``, ``tuple``, ``dict``, ``hf``); ``batch``: ``tuple`` or
            ``dict``.
        mode: ``train`` or ``eval`` for the whole model (BatchNorm layers carry their own).
        compile: ``None`` or the ``torch.compile`` backend.
    """

    seed: int
    N: int
    T: int
    C: int
    stem: dict
    layout: str = "bf"
    blocks: list[dict] = field(default_factory=list)
    pool: dict | None = None
    vblocks: list[dict] = field(default_factory=list)
    head: dict = field(default_factory=dict)
    task: str = "cls"
    mask: bool = False
    kpm: bool = False
    out: str = "tensor"
    batch: str = "tuple"
    mode: str = "eval"
    compile: str | None = None

    @property
    def states_class_dim(self) -> bool:
        """Whether the step is told ``class_dim=-1`` (token-level models of even seeds; the others
        leave the class axis to fimfast, which must decide it from the labels or refuse)."""
        return self.task == "token" and self.seed % 2 == 0

    @property
    def seq_first_input(self) -> bool:
        """Sequence-first models of seeds divisible by 3 take their batch sequence first too:
        ids / features, mask and token labels ``(T, N, ...)``, token logits ``(T, N, C)``, and
        the step is told ``batch_dim=1``."""
        return self.stem["kind"] in SEQ_KINDS and self.layout == "sf" and self.seed % 3 == 0

    @property
    def inductor(self) -> bool:
        """Whether the model is compiled with inductor (slow: long runs only)."""
        return self.compile == "inductor"

    def copy(self) -> Spec:
        """A deep copy (for shrinking)."""
        return copy.deepcopy(self)


def _feat_str(b: dict) -> str:
    skip = {"op", "res", "ckpt", "hook", "din", "dout", "fin", "fout", "bdim", "_dim"}
    args = ",".join(f"{k}={v}" for k, v in b.items() if k not in skip and v is not None)
    wraps = []
    if b.get("res"):
        wraps.append("res")
    if b.get("ckpt") is not None:
        wraps.append("ckpt:" + ("reentrant" if b["ckpt"] else "nonreentrant"))
    if b.get("hook"):
        wraps.append("hook:" + b["hook"])
    shape = ""
    if "fin" in b:
        shape = f"{b['fin']}->{b['fout']}"
    elif "din" in b:
        shape = f"{b['din']}->{b['dout']}"
    s = f"{b['op']}({shape}{';' if shape and args else ''}{args})"
    return s + (f"[{','.join(wraps)}]" if wraps else "")


def describe(spec: Spec) -> str:
    """One line naming every construct of ``spec`` (printed with the seed of a failure)."""
    stem = spec.stem
    sargs = ",".join(f"{k}={v}" for k, v in stem.items() if k != "kind" and v is not None)
    parts = [f"seed={spec.seed} {stem['kind']}({sargs}) N={spec.N} T={spec.T} C={spec.C}"]
    if stem["kind"] in SEQ_KINDS:
        parts[0] += f" layout={spec.layout}"
        if spec.seq_first_input:
            parts[0] += " input=(T,N)+batch_dim=1"
    parts.append(" > ".join(_feat_str(b) for b in spec.blocks) or "-")
    if spec.pool is not None:
        parts.append("pool=" + ",".join(f"{v}" for v in spec.pool.values()))
    if spec.vblocks:
        parts.append(" > ".join(_feat_str(b) for b in spec.vblocks))
    h = spec.head
    head = h["type"]
    if h.get("temp"):
        head += f"+temp({h['temp']})"
    if h.get("hook"):
        head += f"[hook:{h['hook']}]"
    parts.append(f"head={head}")
    task = spec.task + (",mask" if spec.mask else "") + (",kpm" if spec.kpm else "")
    if spec.task == "token":
        task += ",class_dim=-1" if spec.states_class_dim else ",class_dim=unset"
    parts.append(f"{task} out={spec.out} batch={spec.batch} {spec.mode}")
    if spec.compile:
        parts.append(f"compile={spec.compile}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------- #
# planning: seed -> Spec
# --------------------------------------------------------------------------------------------- #
class _Draw:
    """The random choices of one plan (``random.Random``: stable across platforms).

    ``x`` is a second stream, for the variants of a drawn block (:func:`_variant`: PReLU for an
    activation, Bilinear for a Linear, InstanceNorm for a channel norm), and ``f`` a third (a
    Linear on a sequence flattened with the batch): their draws do not move those of the first,
    so a seed whose blocks take no variant builds the model it always did."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.x = random.Random(seed + 0x5EED0000)
        self.f = random.Random(seed + 0xF01D0000)  # folded Linears (see _variant)
        self.base = self.r.choice([2, 3, 4])

    def p(self, prob: float) -> bool:
        return self.r.random() < prob

    def px(self, prob: float) -> bool:
        """``p`` on the second stream."""
        return self.x.random() < prob

    def choice(self, seq):
        return self.r.choice(list(seq))

    def size(self, lo: int = 2, hi: int = 5) -> int:
        """A small size, equal to the plan's base size 40% of the time (coincident sizes)."""
        if self.p(0.4) and lo <= self.base <= hi:
            return self.base
        return self.r.randint(lo, hi)


def plan(seed: int, allow_inductor: bool = True) -> Spec:
    """Draw an architecture from ``seed``.

    The draws do not depend on ``allow_inductor``: without it a model the seed compiles with
    inductor is compiled with ``aot_eager`` instead.
    """
    d = _Draw(seed)
    N = d.size(2, 5)
    kind = d.choice(["vec"] * 3 + ["tokens"] * 4 + ["fseq"] * 2 + ["bag", "sig", "img", "vol"])
    T = d.size(2, 5) if kind in SEQ_KINDS else 1
    C = d.size(2, 5)
    if d.p(0.15):  # every size the same on purpose: T == N == C (== d below)
        T = N if kind in SEQ_KINDS else T
        C = N
    spec = Spec(seed=seed, N=N, T=T, C=C, stem={"kind": kind})
    coincide = d.p(0.3)  # feature size == N
    dim = N if coincide else d.size(2, 6)
    st = spec.stem
    if kind == "vec":
        st["F"] = dim
        feat: tuple = (dim,)
    elif kind == "tokens":
        st.update(V=d.size(3, 6), d=dim, padding_idx=0 if d.p(0.3) else None)
        feat = (T, dim)
    elif kind == "fseq":
        st["d"] = dim
        feat = (T, dim)
    elif kind == "bag":
        mode = d.choice(["sum", "mean", "max"])
        st.update(V=d.size(3, 6), d=dim, B=d.size(1, 4), mode=mode, offsets=d.p(0.4),
                  psw=mode == "sum" and d.p(0.4), padding_idx=0 if d.p(0.25) else None)
        feat = (dim,)
    else:
        c = d.size(1, 3)
        nsp = {"sig": 1, "img": 2, "vol": 3}[kind]
        sp = tuple(d.size(2, 5 if nsp < 3 else 3) for _ in range(nsp))
        st.update(c=c, spatial=sp)
        feat = (c, *sp)
    if kind in SEQ_KINDS:
        spec.layout = "sf" if d.p(0.45) else "bf"
        spec.task = "token" if d.p(0.5) else "cls"
        spec.mask = d.p(0.6)
        spec.batch = "dict" if spec.mask and d.p(0.75) else d.choice(["tuple", "dict"])
        spec.kpm = spec.mask and spec.batch == "dict" and d.p(0.7)
    else:
        spec.batch = d.choice(["tuple", "tuple", "dict"])
    # first stage
    nblocks = d.r.randint(1, 3) if kind != "bag" else d.r.randint(0, 1)
    bdim = 1 if (kind in SEQ_KINDS and spec.layout == "sf") else 0
    for _ in range(nblocks):
        if kind in SEQ_KINDS:
            b, feat = _seq_block(d, feat, bdim)
        elif kind in CHANNEL_KINDS:
            b, feat = _chan_block(d, feat, spec.N)
        else:
            b, feat = _vec_block(d, feat)
        spec.blocks.append(_variant(d, b, kind, feat))
    # pooling and the vector stage
    if spec.task == "cls":
        if kind in SEQ_KINDS:
            how = d.choice(["mean", "first", "last"] + (["masked_mean"] * 2 if spec.mask else []))
            spec.pool = {"how": how}
            feat = (feat[-1],)
        elif kind in CHANNEL_KINDS:
            n = math.prod(feat)
            how = "flatten" if n <= 48 and d.p(0.5) else "mean"
            spec.pool = {"how": how}
            feat = (n,) if how == "flatten" else (feat[0],)
        for _ in range(d.r.randint(0, 2)):
            b, feat = _vec_block(d, feat)
            spec.vblocks.append(_variant(d, b, "vec", feat))
    # head
    final = feat[-1]
    tied_ok = (kind == "tokens" and spec.task == "token" and final == st["d"])
    htype = d.choice(["linear"] * 4 + ["flinear"] + (["tied_emb"] * 2 if tied_ok else []))
    if htype == "tied_emb":
        spec.C = st["V"]
    spec.head = {"type": htype, "din": final,
                 "temp": d.choice(["exp", "div"]) if d.p(0.25) else None,
                 "hook": d.choice(["out", "pre"]) if d.p(0.12) else None}
    spec.out = d.choice(["tensor", "tensor", "tuple", "dict", "hf"])
    spec.mode = "train" if d.p(0.5) else "eval"
    if d.p(0.035):
        spec.compile = d.choice(["eager", "aot_eager"])
        if d.p(0.15):
            spec.compile = "inductor" if allow_inductor else "aot_eager"
    return spec


def _wrap(d: _Draw, b: dict, same_shape: bool) -> dict:
    b["res"] = same_shape and d.p(0.35)
    # reentrant checkpointing is refused by the per-sample types: a third of the checkpoints, so
    # that refused models do not take a large share of the runs
    b["ckpt"] = d.choice([False, False, True]) if d.p(0.12) else None
    b["hook"] = d.choice(["out", "out", "pre"]) if d.p(0.12) else None
    return b


def _variant(d: _Draw, b: dict, kind: str, feat: tuple) -> dict:
    """``b`` or a variant of it, drawn from the second stream (see :class:`_Draw`): an activation
    becomes ``nn.PReLU`` (one weight, or one per channel on vectors and channel-first tensors), a
    Linear ``nn.Bilinear`` of the features and their tanh, a GroupNorm or BatchNorm over
    channels (or over a sequence's features) ``nn.InstanceNorm`` over the positions (at least
    two of them: torch refuses one in train mode) in train or eval mode, with or without running
    statistics. ``feat``: the feature shape after the block (shape-preserving for these)."""
    op = b["op"]
    if op == "act" and d.px(0.4):
        b["prelu"] = "c" if kind not in SEQ_KINDS and d.px(0.5) else 1
    elif op == "linear" and d.px(0.25):
        b["bilinear"] = True
    elif op == "linear" and kind in SEQ_KINDS and d.f.random() < 0.5:
        b["flat"] = True  # (a third stream: the draws of the other two stay as they were)
    elif (op == "norm" and b["kind"] in ("group", "batch") and kind != "vec"
          and (kind in SEQ_KINDS or math.prod(feat[1:]) >= 2) and d.px(0.4)):
        wraps = {k: b[k] for k in ("res", "ckpt", "hook")}
        b.clear()
        b.update(op="norm", kind="instance", dim=1 if kind in SEQ_KINDS else len(feat) - 1,
                 affine=d.px(0.8), stats=d.px(0.5), train=d.px(0.5), **wraps)
    return b


def _bn_opts(d: _Draw) -> dict:
    return {"train": d.p(0.5), "affine": d.p(0.75), "stats": d.p(0.8),
            "momentum": None if d.p(0.2) else 0.1}


def _norm_block(d: _Draw, dim: int, allow_batch: bool = True) -> dict:
    kinds = ["layer", "rms", "group"] + (["batch"] if allow_batch else [])
    k = d.choice(kinds)
    b: dict[str, Any] = {"op": "norm", "kind": k}
    if k == "layer":
        b.update(affine=d.p(0.8), bias=d.p(0.7))
    elif k == "rms":
        b.update(affine=d.p(0.8))
    elif k == "group":
        b.update(groups=d.choice([g for g in (1, 2, 3) if dim % g == 0]), affine=d.p(0.8))
    else:
        b.update(_bn_opts(d))
    return b


def _vec_block(d: _Draw, feat: tuple) -> tuple[dict, tuple]:
    dim = feat[0]
    op = d.choice(["linear"] * 3 + ["flinear", "norm", "norm", "act", "reuse", "tied", "mix"])
    if op in ("linear", "flinear"):
        out = d.size(2, 6)
        b = {"op": op, "din": dim, "dout": out, "bias": d.p(0.8),
             "act": d.choice(ACTS) if d.p(0.7) else None}
        return _wrap(d, b, out == dim), (out,)
    if op == "norm":
        b = _norm_block(d, dim)
    elif op == "act":
        b = {"op": "act", "act": d.choice(ACTS)}
    elif op == "reuse":
        b = {"op": "reuse", "din": dim, "dout": dim, "act": d.choice(ACTS)}
    elif op == "tied":
        b = {"op": "tied", "din": dim, "dout": dim, "how": d.choice(["same", "transpose"]),
             "act": d.choice(ACTS)}
    else:
        b = {"op": "mix", "how": d.choice(["cumsum", "mean", "roll"]), "bdim": 0}
    return _wrap(d, b, True), feat


def _seq_block(d: _Draw, feat: tuple, bdim: int) -> tuple[dict, tuple]:
    T, dim = feat
    op = d.choice(["linear", "linear", "flinear", "norm", "norm", "mha", "mha", "mha", "tel",
                   "tel", "rnn", "rnn", "conv_t", "reuse", "mix", "act"])
    if op in ("linear", "flinear"):
        out = d.size(2, 6)
        b = {"op": op, "din": dim, "dout": out, "bias": d.p(0.8),
             "act": d.choice(ACTS) if d.p(0.6) else None}
        return _wrap(d, b, out == dim), (T, out)
    if op == "norm":
        b = _norm_block(d, dim)
    elif op == "mha":
        heads = d.choice([h for h in (1, 2, 3) if dim % h == 0])
        b = {"op": "mha", "din": dim, "dout": dim, "heads": heads,
             "kv": d.size(2, 5) if d.p(0.3) else None, "bias": d.p(0.8),
             "bias_kv": d.p(0.15), "causal": d.p(0.3), "weights": d.p(0.5)}
    elif op == "tel":
        heads = d.choice([h for h in (1, 2, 3) if dim % h == 0])
        b = {"op": "tel", "din": dim, "dout": dim, "heads": heads, "ff": d.size(2, 6),
             "norm_first": d.p(0.5), "act": d.choice(["relu", "gelu"]), "bias": d.p(0.85),
             "causal": d.p(0.25)}
    elif op == "rnn":
        cell = d.choice(["rnn", "lstm", "gru"])
        hid = d.size(2, 5)
        bi = d.p(0.4)
        proj = d.r.randint(1, hid - 1) if cell == "lstm" and hid > 2 and d.p(0.3) else None
        b = {"op": "rnn", "din": dim, "cell": cell, "hidden": hid, "layers": d.choice([1, 1, 2]),
             "bi": bi, "proj": proj, "bias": d.p(0.85),
             "nonlin": d.choice(["tanh", "relu"]) if cell == "rnn" else None}
        out = (proj or hid) * (2 if bi else 1)
        b["dout"] = out
        return _wrap(d, b, out == dim), (T, out)
    elif op == "conv_t":
        out = d.size(2, 5)
        k = d.choice([1, 2, 3])
        groups = d.choice([g for g in (1, 2) if dim % g == 0 and out % g == 0])
        b = {"op": "conv_t", "din": dim, "dout": out, "k": k, "groups": groups,
             "bias": d.p(0.8)}
        return _wrap(d, b, out == dim), (T, out)
    elif op == "reuse":
        b = {"op": "reuse", "din": dim, "dout": dim, "act": d.choice(ACTS)}
    elif op == "mix":
        b = {"op": "mix", "how": d.choice(["cumsum", "mean", "roll"]), "bdim": bdim}
    else:
        b = {"op": "act", "act": d.choice(ACTS)}
    return _wrap(d, b, True), feat


def _conv_out(n: int, k: int, s: int, p: int, dil: int) -> int:
    return (n + 2 * p - dil * (k - 1) - 1) // s + 1


def _chan_block(d: _Draw, feat: tuple, N: int) -> tuple[dict, tuple]:
    c, *sp = feat
    nsp = len(sp)
    ops = ["conv", "conv", "conv", "norm", "act", "mix"]
    if nsp < 3:
        ops += ["convT", "convT"]
    if min(sp) >= 2:
        ops.append("pool")
    op = d.choice(ops)
    if op == "conv":
        for _ in range(20):
            k, s, p, dil = d.choice([1, 2, 3]), d.choice([1, 1, 2]), d.choice([0, 0, 1]), \
                d.choice([1, 1, 2])
            out = [_conv_out(n, k, s, p, dil) for n in sp]
            if min(out) >= 1:
                break
        else:
            k, s, p, dil, out = 1, 1, 0, 1, list(sp)
        cout = d.size(1, 4)
        groups = d.choice([g for g in (1, 2) if c % g == 0 and cout % g == 0])
        pmode = "circular" if p > 0 and min(sp) > p and d.p(0.2) else "zeros"
        b = {"op": "conv", "dim": nsp, "fin": (c, *sp), "fout": (cout, *out), "k": k,
             "stride": s, "padding": p, "dilation": dil, "groups": groups, "pmode": pmode,
             "bias": d.p(0.8)}
        return _wrap(d, b, (cout, *out) == (c, *sp)), (cout, *out)
    if op == "convT":
        for _ in range(20):
            k, s, p, dil = d.choice([1, 2, 3]), d.choice([1, 2]), d.choice([0, 0, 1]), \
                d.choice([1, 1, 2])
            op_ = d.choice([0, 1]) if max(s, dil) > 1 else 0
            out = [(n - 1) * s - 2 * p + dil * (k - 1) + op_ + 1 for n in sp]
            if 1 <= min(out) and max(out) <= 7:
                break
        else:
            k, s, p, dil, op_, out = 1, 1, 0, 1, 0, list(sp)
        cout = d.size(1, 3)
        groups = d.choice([g for g in (1, 2) if c % g == 0 and cout % g == 0])
        b = {"op": "convT", "dim": nsp, "fin": (c, *sp), "fout": (cout, *out), "k": k,
             "stride": s, "padding": p, "dilation": dil, "out_pad": op_, "groups": groups,
             "bias": d.p(0.8)}
        return _wrap(d, b, (cout, *out) == (c, *sp)), (cout, *out)
    if op == "norm":
        if d.p(0.5):
            b = {"op": "norm", "kind": "batch", "dim": nsp, **_bn_opts(d)}
        else:
            b = {"op": "norm", "kind": "group",
                 "groups": d.choice([g for g in (1, 2, 3) if c % g == 0]), "affine": d.p(0.8)}
        return _wrap(d, b, True), feat
    if op == "pool":
        b = {"op": "pool", "dim": nsp, "how": d.choice(["max", "avg"]), "fin": feat,
             "fout": (c, *[n // 2 for n in sp])}
        return _wrap(d, b, False), (c, *[n // 2 for n in sp])
    if op == "mix":
        return _wrap(d, {"op": "mix", "how": d.choice(["cumsum", "mean", "roll"]), "bdim": 0},
                     True), feat
    return _wrap(d, {"op": "act", "act": d.choice(ACTS)}, True), feat


def features(spec: Spec) -> set[str]:
    """The constructs of ``spec`` as tags (``op:mha``, ``mha:sf``, ``hook:out``,
    ``ckpt:reentrant=True``, ``compile:aot_eager``, ``sizes:T==N==C``, ...)."""
    f = {f"stem:{spec.stem['kind']}", f"task:{spec.task}", f"out:{spec.out}",
         f"batch:{spec.batch}", f"mode:{spec.mode}", f"head:{spec.head['type']}"}
    st = spec.stem
    if st["kind"] == "bag":
        f.add(f"bag:offsets={st['offsets']}")
    if spec.compile:
        f.add(f"compile:{spec.compile}")
    if spec.head.get("temp"):
        f.add("head:temp")
    if spec.head.get("hook"):
        f.add(f"hook:{spec.head['hook']}")
    if spec.task == "token" and spec.mask:
        f.add("token:mask")
    if spec.kpm:
        f.add("kpm")
    seq = st["kind"] in ("tokens", "fseq")
    if seq:
        f.add(f"layout:{spec.layout}")
        if spec.seq_first_input:
            f.add("input:sf")
        if spec.T == spec.N:
            f.add("sizes:T==N")
    if seq and spec.T == spec.N == spec.C:
        f.add("sizes:T==N==C")
    d = st.get("F", st.get("d"))
    if d == spec.N:
        f.add("sizes:d==N")
    if pruned_modules(spec):
        f.add("prune")
    for b in spec.blocks + spec.vblocks:
        op = b["op"]
        f.add(f"op:{op}")
        if op in ("mha", "tel", "rnn") and seq:
            f.add(f"{op}:{spec.layout}")
        if op == "rnn":
            f.add(f"rnn:{b['cell']}")
        if op == "norm":
            f.add(f"norm:{b['kind']}")
            if b["kind"] in ("batch", "instance"):
                f.add(f"norm:{b['kind']}:train={b['train']}")
            if b["kind"] == "instance":  # an affine one normalised by the running statistics
                f.add(f"norm:instance:affine={b['affine']}")
                if b["affine"] and b["stats"] and not b["train"]:
                    f.add("norm:instance:affine+running")
        if b.get("prelu"):
            f.add(f"act:prelu:{b['prelu']}")
        if b.get("bilinear"):
            f.add("linear:bilinear")
        if b.get("flat"):
            f.add(f"linear:flat:{spec.layout}")
        if op in ("conv", "convT"):
            f.add(f"{op}{b['dim']}d")
        if op in ("tied", "mix"):
            f.add(f"{op}:{b['how']}")
        if b.get("res"):
            f.add("res")
        if b.get("ckpt") is not None:
            f.add(f"ckpt:reentrant={b['ckpt']}")
        if b.get("hook"):
            f.add(f"hook:{b['hook']}")
    return f


# --------------------------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------------------------- #
def act_fn(name: str | None):
    """The activation ``name`` as a function (identity for ``None``)."""
    if name is None:
        return lambda x: x
    return {"tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
            "relu": F.relu, "softplus": F.softplus, "elu": F.elu}[name]


class FLinear(nn.Module):
    """``F.linear`` on bare parameters (no nn.Linear)."""

    def __init__(self, din: int, dout: int, bias: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dout, din) / math.sqrt(din))
        self.b = nn.Parameter(torch.randn(dout) * 0.1) if bias else None

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class Last(nn.Module):
    """A block on the last dimension: ``act(main(x))``."""

    def __init__(self, main: nn.Module, act: str | None):
        super().__init__()
        self.main, self.act = main, act

    def forward(self, h, pad=None):
        return act_fn(self.act)(self.main(h))


class Flat(nn.Module):
    """``act(main(h.reshape(-1, d)))`` reshaped back: a Linear on the sequence's positions
    flattened with the batch (sample-major for batch-first layouts, time-major for
    sequence-first ones)."""

    def __init__(self, main: nn.Module, act: str | None):
        super().__init__()
        self.main, self.act = main, act

    def forward(self, h, pad=None):
        y = act_fn(self.act)(self.main(h.reshape(-1, h.shape[-1])))
        return y.reshape(*h.shape[:-1], y.shape[-1])


class Act(nn.Module):
    """An activation: ``act`` as a function, or ``nn.PReLU`` (``prelu``: its ``num_parameters``,
    1 or the channel count)."""

    def __init__(self, act: str, prelu: int | None = None):
        super().__init__()
        self.act = act
        self.main = None if prelu is None else nn.PReLU(prelu, init=0.2)

    def forward(self, h, pad=None):
        if self.main is not None:
            return self.main(h)
        return act_fn(self.act)(h)


class Bil(nn.Module):
    """``act(bilinear(h, tanh(h)))`` with ``nn.Bilinear``."""

    def __init__(self, din: int, dout: int, bias: bool, act: str | None):
        super().__init__()
        self.main, self.act = nn.Bilinear(din, din, dout, bias=bias), act

    def forward(self, h, pad=None):
        return act_fn(self.act)(self.main(h, torch.tanh(h)))


class ChannelNorm(nn.Module):
    """A BatchNorm/GroupNorm over the feature dim of a sequence (moved to dim 1 and back), or a
    norm of channel-first tensors as they are."""

    def __init__(self, main: nn.Module, layout: str | None):
        super().__init__()
        self.main, self.layout = main, layout

    def forward(self, h, pad=None):
        if self.layout == "bf":  # (N, T, d) -> (N, d, T)
            return self.main(h.transpose(1, 2)).transpose(1, 2)
        if self.layout == "sf":  # (T, N, d) -> (N, d, T)
            return self.main(h.permute(1, 2, 0)).permute(2, 0, 1)
        return self.main(h)


class Reuse(nn.Module):
    """The same Linear called twice."""

    def __init__(self, d: int, act: str):
        super().__init__()
        self.main = nn.Linear(d, d)
        self.act = act

    def forward(self, h, pad=None):
        f = act_fn(self.act)
        return f(self.main(f(self.main(h))))


class Tied(nn.Module):
    """Two Linears sharing one weight (``same``), or a Linear and ``F.linear`` with its
    transpose (``transpose``)."""

    def __init__(self, d: int, how: str, act: str):
        super().__init__()
        self.main = nn.Linear(d, d)
        self.how, self.act = how, act
        if how == "same":
            self.other = nn.Linear(d, d)
            self.other.weight = self.main.weight
        else:
            self.other = None
            self.b2 = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, h, pad=None):
        f = act_fn(self.act)
        h = f(self.main(h))
        if self.other is not None:
            return f(self.other(h))
        return f(F.linear(h, self.main.weight.t(), self.b2))


class Mix(nn.Module):
    """Couples the samples: ``h + 0.3 * op(h)`` with op a cumsum, mean or roll along the batch."""

    def __init__(self, how: str, bdim: int):
        super().__init__()
        self.how, self.bdim = how, bdim
        self.main = None

    def forward(self, h, pad=None):
        if self.how == "cumsum":
            m = torch.cumsum(h, self.bdim)
        elif self.how == "mean":
            m = h.mean(self.bdim, keepdim=True).expand_as(h)
        else:
            m = torch.roll(h, 1, self.bdim)
        return h + 0.3 * m


class Attn(nn.Module):
    """Self-attention (or attention over a projected key/value sequence)."""

    def __init__(self, b: dict, batch_first: bool):
        super().__init__()
        d = b["din"]
        self.kv = nn.Linear(d, b["kv"]) if b["kv"] else None
        self.main = nn.MultiheadAttention(d, b["heads"], bias=b["bias"],
                                          add_bias_kv=b["bias_kv"], kdim=b["kv"], vdim=b["kv"],
                                          batch_first=batch_first)
        self.causal, self.weights, self.bf = b["causal"], b["weights"], batch_first

    def forward(self, h, pad=None):
        kv = h if self.kv is None else self.kv(h)
        T = h.shape[1 if self.bf else 0]
        mask = None
        if self.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        return self.main(h, kv, kv, key_padding_mask=pad, attn_mask=mask,
                         need_weights=self.weights)[0]


class Encoder(nn.Module):
    def __init__(self, b: dict, batch_first: bool):
        super().__init__()
        self.main = nn.TransformerEncoderLayer(b["din"], b["heads"], dim_feedforward=b["ff"],
                                               dropout=0.0, activation=b["act"],
                                               batch_first=batch_first,
                                               norm_first=b["norm_first"], bias=b["bias"])
        self.causal, self.bf = b["causal"], batch_first

    def forward(self, h, pad=None):
        mask = None
        if self.causal:
            T = h.shape[1 if self.bf else 0]
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        return self.main(h, src_mask=mask, src_key_padding_mask=pad)


class Recurrent(nn.Module):
    def __init__(self, b: dict, batch_first: bool):
        super().__init__()
        kw: dict[str, Any] = {"num_layers": b["layers"], "bias": b["bias"],
                              "batch_first": batch_first, "bidirectional": b["bi"]}
        if b["cell"] == "rnn":
            self.main = nn.RNN(b["din"], b["hidden"], nonlinearity=b["nonlin"], **kw)
        elif b["cell"] == "lstm":
            self.main = nn.LSTM(b["din"], b["hidden"], proj_size=b["proj"] or 0, **kw)
        else:
            self.main = nn.GRU(b["din"], b["hidden"], **kw)

    def forward(self, h, pad=None):
        return self.main(h)[0]


class ConvSeq(nn.Module):
    """Conv1d along the positions of a sequence (length kept: ``padding="same"``)."""

    def __init__(self, b: dict, layout: str):
        super().__init__()
        self.main = nn.Conv1d(b["din"], b["dout"], b["k"], padding="same", groups=b["groups"],
                              bias=b["bias"])
        self.layout = layout

    def forward(self, h, pad=None):
        if self.layout == "bf":
            return self.main(h.transpose(1, 2)).transpose(1, 2)
        return self.main(h.permute(1, 2, 0)).permute(2, 0, 1)


class Chan(nn.Module):
    """A module on channel-first tensors, as it is."""

    def __init__(self, main: nn.Module):
        super().__init__()
        self.main = main

    def forward(self, h, pad=None):
        return self.main(h)


class Block(nn.Module):
    """A block with its wrappers: checkpoint (``ckpt``: None, False, True = ``use_reentrant``)
    and residual."""

    def __init__(self, inner: nn.Module, res: bool, ckpt: bool | None):
        super().__init__()
        self.inner, self.res, self.ckpt = inner, res, ckpt

    def forward(self, h, pad=None):
        if self.ckpt is None:
            f = self.inner(h, pad)
        else:
            x = h
            if self.ckpt and not x.requires_grad:
                # reentrant checkpointing back-propagates into the segment only when an input
                # requires grad (what Hugging Face's enable_input_require_grads arranges)
                x = x.detach().requires_grad_(True)
            f = checkpoint(self.inner, x, pad, use_reentrant=self.ckpt)
        return h + f if self.res else f


class Pool(nn.Module):
    def __init__(self, how: str, layout: str | None):
        super().__init__()
        self.how, self.layout = how, layout

    def forward(self, h, mask=None):
        if self.layout is None:  # channel-first tensors
            if self.how == "flatten":
                return h.flatten(1)
            return h.flatten(2).mean(-1)
        if self.layout == "sf":
            h = h.transpose(0, 1)
        if self.how == "mean" or (self.how == "masked_mean" and mask is None):
            return h.mean(1)
        if self.how == "first":
            return h[:, 0]
        if self.how == "last":
            return h[:, -1]
        w = mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)


class HFOutput:
    """An output object with ``.logits`` (as Hugging Face models return)."""

    def __init__(self, logits, hidden=None):
        self.logits = logits
        self.hidden = hidden


class Stem(nn.Module):
    def __init__(self, st: dict):
        super().__init__()
        self.kind = st["kind"]
        self.st = dict(st)
        if self.kind == "tokens":
            self.main = nn.Embedding(st["V"], st["d"], padding_idx=st["padding_idx"])
        elif self.kind == "bag":
            self.main = nn.EmbeddingBag(st["V"], st["d"], mode=st["mode"],
                                        padding_idx=st["padding_idx"])
        else:
            self.main = None

    def forward(self, x):
        if self.kind == "tokens":
            return self.main(x)
        if self.kind == "bag":
            psw = (x % 3 + 1).to(self.main.weight.dtype) / 3 if self.st["psw"] else None
            if self.st["offsets"]:
                N, B = x.shape
                off = torch.arange(0, N * B, B, device=x.device)
                return self.main(x.reshape(-1), off,
                                 per_sample_weights=None if psw is None else psw.reshape(-1))
            return self.main(x, per_sample_weights=psw)
        return x


class Head(nn.Module):
    def __init__(self, h: dict, C: int, emb: nn.Module | None):
        super().__init__()
        if h["type"] == "linear":
            self.main = nn.Linear(h["din"], C)
        elif h["type"] == "flinear":
            self.main = FLinear(h["din"], C)
        else:
            self.main = nn.Linear(h["din"], C, bias=False)
            self.main.weight = emb.weight
        self.temp = h["temp"]
        if self.temp is not None:
            self.t = nn.Parameter(torch.tensor(0.3 if self.temp == "exp" else 1.3))

    def forward(self, h):
        z = self.main(h)
        if self.temp == "exp":
            return z * self.t.exp()
        if self.temp == "div":
            return z / self.t
        return z


class Net(nn.Module):
    """The model of a :class:`Spec`."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.task, self.out, self.kpm = spec.task, spec.out, spec.kpm
        kind = spec.stem["kind"]
        self.sf = kind in SEQ_KINDS and spec.layout == "sf"
        self.sf_in = spec.seq_first_input  # the inputs, mask and token logits are (T, N, ...)
        layout = spec.layout if kind in SEQ_KINDS else None
        self.stem = Stem(spec.stem)
        self.blocks = nn.ModuleList(_module(b, layout) for b in spec.blocks)
        self.pool = None if spec.pool is None else Pool(spec.pool["how"], layout)
        self.vblocks = nn.ModuleList(_module(b, None) for b in spec.vblocks)
        self.head = Head(spec.head, spec.C, self.stem.main)

    def forward(self, input_ids, attention_mask=None):
        pad = None
        if self.sf_in and attention_mask is not None:
            attention_mask = attention_mask.transpose(0, 1)  # (T, N) -> (N, T)
        if self.kpm and attention_mask is not None:
            pad = attention_mask == 0
        h = self.stem(input_ids)
        if self.sf and not self.sf_in:
            h = h.transpose(0, 1)
        for b in self.blocks:
            h = b(h, pad)
        if self.task == "cls":
            if self.pool is not None:
                h = self.pool(h, attention_mask)
            for b in self.vblocks:
                h = b(h, None)
        elif self.sf and not self.sf_in:
            h = h.transpose(0, 1)
        z = self.head(h)
        if self.out == "tuple":
            return z, h
        if self.out == "dict":
            return {"logits": z, "hidden": h}
        if self.out == "hf":
            return HFOutput(z, h)
        return z


def _norm_module(b: dict, dim: int, layout: str | None) -> nn.Module:
    k = b["kind"]
    if k == "layer":
        return Last(nn.LayerNorm(dim, elementwise_affine=b["affine"], bias=b["bias"]), None)
    if k == "rms":
        return Last(nn.RMSNorm(dim, elementwise_affine=b["affine"]), None)
    if k == "group":
        return ChannelNorm(nn.GroupNorm(b["groups"], dim, affine=b["affine"]), layout)
    if k == "instance":
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[b["dim"]]
        return ChannelNorm(cls(dim, affine=b["affine"], track_running_stats=b["stats"]), layout)
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[b.get("dim", 1)]
    bn = cls(dim, affine=b["affine"], track_running_stats=b["stats"], momentum=b["momentum"])
    return ChannelNorm(bn, layout)


def _module(b: dict, layout: str | None) -> Block:
    """The module of block spec ``b`` (``layout``: ``bf``/``sf`` for sequences, else None)."""
    op = b["op"]
    bf = layout != "sf"
    if op == "linear" and b.get("bilinear"):
        inner: nn.Module = Bil(b["din"], b["dout"], b["bias"], b["act"])
    elif op == "linear":
        lin = nn.Linear(b["din"], b["dout"], bias=b["bias"])
        inner = Flat(lin, b["act"]) if b.get("flat") else Last(lin, b["act"])
    elif op == "flinear":
        inner = Last(FLinear(b["din"], b["dout"], bias=b["bias"]), b["act"])
    elif op == "act":
        prelu = b.get("prelu")
        inner = Act(b["act"], b["_dim"] if prelu == "c" else prelu)
    elif op == "norm":
        inner = _norm_module(b, b["_dim"], layout)
    elif op == "reuse":
        inner = Reuse(b["din"], b["act"])
    elif op == "tied":
        inner = Tied(b["din"], b["how"], b["act"])
    elif op == "mix":
        inner = Mix(b["how"], b["bdim"])
    elif op == "mha":
        inner = Attn(b, bf)
    elif op == "tel":
        inner = Encoder(b, bf)
    elif op == "rnn":
        inner = Recurrent(b, bf)
    elif op == "conv_t":
        inner = ConvSeq(b, layout)
    elif op == "conv":
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[b["dim"]]
        inner = Chan(cls(b["fin"][0], b["fout"][0], b["k"], stride=b["stride"],
                         padding=b["padding"], dilation=b["dilation"], groups=b["groups"],
                         bias=b["bias"], padding_mode=b["pmode"]))
    elif op == "convT":
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[b["dim"]]
        inner = Chan(cls(b["fin"][0], b["fout"][0], b["k"], stride=b["stride"],
                         padding=b["padding"], output_padding=b["out_pad"], groups=b["groups"],
                         bias=b["bias"], dilation=b["dilation"]))
    elif op == "pool":
        cls = {("max", 1): nn.MaxPool1d, ("avg", 1): nn.AvgPool1d, ("max", 2): nn.MaxPool2d,
               ("avg", 2): nn.AvgPool2d, ("max", 3): nn.MaxPool3d, ("avg", 3): nn.AvgPool3d}
        inner = Chan(cls[(b["how"], b["dim"])](2))
    else:
        raise ValueError(f"unknown block op {op!r}")
    return Block(inner, bool(b.get("res")), b.get("ckpt"))


# --------------------------------------------------------------------------------------------- #
# user hooks (module-level functions: deep copies of the model share them)
# --------------------------------------------------------------------------------------------- #
def hook_scale_shift(module, args, out):
    """A forward hook that changes the output: ``out * 0.5 + 0.1``."""
    if isinstance(out, tuple):
        return (out[0] * 0.5 + 0.1, *out[1:])
    return out * 0.5 + 0.1


def prehook_scale(module, args):
    """A forward pre-hook that changes the first input: ``x * 0.9``."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    return (args[0] * 0.9, *args[1:])


def _hook_target(block: Block) -> nn.Module:
    inner = block.inner
    main = getattr(inner, "main", None)
    return main if main is not None else inner


def _register(mod: nn.Module, how: str) -> None:
    if how == "out":
        mod.register_forward_hook(hook_scale_shift)
    else:
        mod.register_forward_pre_hook(prehook_scale)


# --------------------------------------------------------------------------------------------- #
# build
# --------------------------------------------------------------------------------------------- #
@dataclass
class Case:
    """A built :class:`Spec`: the model fimfast sees, the eager model for the oracle, the batch.

    Attributes:
        spec: the architecture.
        model: what ``fimfast.DiagFisher`` gets (maybe ``torch.compile``'d), float64.
        net: the eager :class:`Net` (``model`` is it, or wraps it).
        batch: the batch for ``step``.
        labels: the labels as the oracle sees them; ``valid``: bool mask of the valid rows.
        likelihood: always ``categorical``.
        prefix: parameter-name prefix of ``model`` over ``net`` (``_orig_mod.`` when compiled).
        words: names of the constructs (lower case) a refusal's message may name.
    """

    spec: Spec
    model: nn.Module
    net: Net
    batch: Any
    labels: torch.Tensor
    valid: torch.Tensor
    likelihood: str = "categorical"
    prefix: str = ""
    words: list[str] = field(default_factory=list)

    @property
    def C(self) -> int:
        return self.spec.C

    def inputs(self, batch: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the model call for ``batch``."""
        if isinstance(batch, dict):
            return (), {k: v for k, v in batch.items() if k != "labels"}
        return (batch[0],), {}


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a :class:`Net` output, independently of fimfast."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, dict):
        return out["logits"]
    return out.logits


def without_checkpoint(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every checkpoint wrapper off (same values, plain autograd:
    the oracle differentiates row by row with ``torch.autograd.grad``, which reentrant
    checkpointing refuses)."""
    from oracle import strip_pruned  # tests/ is on sys.path wherever the fuzz models are built

    net = copy.deepcopy(strip_pruned(net))
    for m in net.modules():
        if isinstance(m, Block):
            m.ckpt = None
    return net


def _batch(spec: Spec, g: torch.Generator) -> tuple[Any, torch.Tensor, torch.Tensor]:
    N, T, C = spec.N, spec.T, spec.C
    st = spec.stem
    kind = st["kind"]
    mask = None
    if kind == "vec":
        x = torch.randn(N, st["F"], generator=g, dtype=torch.float64)
    elif kind == "tokens":
        lo = 1 if st["padding_idx"] == 0 else 0
        x = torch.randint(lo, st["V"], (N, T), generator=g)
    elif kind == "fseq":
        x = torch.randn(N, T, st["d"], generator=g, dtype=torch.float64)
    elif kind == "bag":
        x = torch.randint(0, st["V"], (N, st["B"]), generator=g)
    else:
        x = torch.randn(N, st["c"], *st["spatial"], generator=g, dtype=torch.float64)
    if spec.mask:
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        lengths[0] = T if N > 1 else lengths[0]
        mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
        if kind == "tokens" and st["padding_idx"] is not None:
            x = x.masked_fill(mask == 0, st["padding_idx"])
    if spec.task == "token":
        y = torch.randint(0, C, (N, T), generator=g)
        if mask is not None:
            y = y.masked_fill(mask == 0, -100)
        drop = torch.rand(N, T, generator=g) < 0.15
        drop[0, 0] = False
        y = y.masked_fill(drop, -100)
        valid = y != -100
        if mask is not None and spec.batch == "dict":
            valid &= mask != 0
    else:
        y = torch.randint(0, C, (N,), generator=g)
        valid = torch.ones(N, dtype=torch.bool)
    if spec.seq_first_input:  # the batch sequence first; the oracle keeps the (N, T) view
        x = x.transpose(0, 1)
        mask = None if mask is None else mask.transpose(0, 1)
        if spec.task == "token":
            return _pack(spec, x, mask, y.transpose(0, 1)), y, valid
    return _pack(spec, x, mask, y), y, valid


def _pack(spec: Spec, x, mask, y) -> Any:
    if spec.batch == "dict":
        b: dict[str, Any] = {"input_ids": x}
        if mask is not None:
            b["attention_mask"] = mask
        b["labels"] = y
        return b
    return (x, y)


def _words(spec: Spec, net: nn.Module) -> list[str]:
    w = {type(m).__name__.lower() for m in net.modules()}
    if spec.task == "token" and not spec.states_class_dim:
        w |= {"class_dim", "class axis"}  # the layout of the logits, left to fimfast
    w |= {"checkpoint", "hook", "compile", "torch.compile", "batch", "sample", "tied", "shared",
          "parameter"}
    for b in spec.blocks + spec.vblocks:
        w.add(b["op"])
        if b["op"] == "mix":
            w.add(b["how"])
    return sorted(w)


def build(spec: Spec) -> Case:
    """Construct ``spec``: float64 model (weights from ``spec.seed``), its batch and labels."""
    torch.manual_seed(spec.seed)
    _fill_dims(spec)
    net = Net(spec)
    with torch.no_grad():  # no parameter at a symmetric point (ones, zeros)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in net.modules():
            if isinstance(m, _RUNNING) and m.track_running_stats:
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.3)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.num_batches_tracked.fill_(3)
    net = net.double()
    for m in pruned_modules(spec, net):  # no draw from the grammar: other models stay as they were
        torch.nn.utils.prune.random_unstructured(m, "weight", amount=0.4)
    net.train(spec.mode == "train")
    for blk, b in zip(list(net.blocks) + list(net.vblocks), spec.blocks + spec.vblocks):
        if b["op"] == "norm" and b["kind"] in ("batch", "instance"):
            blk.inner.main.train(b["train"])
        if b.get("hook"):
            _register(_hook_target(blk), b["hook"])
    if spec.head.get("hook"):
        _register(net.head.main, spec.head["hook"])
    g = torch.Generator().manual_seed(spec.seed)
    batch, labels, valid = _batch(spec, g)
    model: nn.Module = net
    prefix = ""
    if spec.compile:
        model = torch.compile(net, backend=spec.compile)
        prefix = "_orig_mod."
    return Case(spec, model, net, batch, labels, valid, prefix=prefix, words=_words(spec, net))


def pruned_modules(spec: Spec, net: nn.Module | None = None) -> list:
    """The ``nn.Linear`` layers of a ``linear`` block or head, the affine norms and the
    convolutions of the blocks that ``torch.nn.utils.prune`` masks in a third of the models
    (seeds ``2 mod 3``; ``net=None``: whether there is one), for the weights used through a
    function of a parameter (``weight = weight_orig * weight_mask``)."""
    if spec.seed % 3 != 2 or spec.compile:
        return []
    if net is None:
        ok = [b["op"] in ("linear", "norm", "conv", "convT", "conv_t")
              for b in spec.blocks + spec.vblocks]
        return [True] if any(ok) or spec.head["type"] == "linear" else []
    out = []
    for blk, b in zip(list(net.blocks) + list(net.vblocks), spec.blocks + spec.vblocks):
        if b["op"] == "linear":
            out.append(blk.inner.main)
        elif b["op"] in ("norm", "conv", "convT", "conv_t"):  # affine norms, convolutions
            out += [m for m in blk.modules() if isinstance(m, _PRUNABLE)
                    and isinstance(getattr(m, "weight", None), nn.Parameter)]
    return out + ([net.head.main] if spec.head["type"] == "linear" else [])


_PRUNABLE = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm,
             nn.modules.instancenorm._InstanceNorm, nn.modules.conv._ConvNd)
_RUNNING = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _fill_dims(spec: Spec) -> None:
    """Record the feature size every norm block sees (``_dim``) from the stem and the blocks."""
    st = spec.stem
    kind = st["kind"]
    if kind == "vec":
        dim = st["F"]
    elif kind in ("tokens", "fseq", "bag"):
        dim = st["d"]
    else:
        dim = st["c"]
    for b in spec.blocks:
        b["_dim"] = dim
        if "dout" in b:
            dim = b["dout"]
        elif "fout" in b:
            dim = b["fout"][0]
    if spec.pool is not None and kind in CHANNEL_KINDS and spec.pool["how"] == "flatten":
        dim = math.prod(_chan_feat(spec))
    for b in spec.vblocks:
        b["_dim"] = dim
        if "dout" in b:
            dim = b["dout"]


def _chan_feat(spec: Spec) -> tuple:
    """The channel-first feature shape after the first stage (``(c, *spatial)``)."""
    feat = (spec.stem["c"], *spec.stem["spatial"])
    for b in spec.blocks:
        if "fout" in b:
            feat = tuple(b["fout"])
    return feat
