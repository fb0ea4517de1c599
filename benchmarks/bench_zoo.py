"""A survey of common architectures outside the suite's workloads: each estimator's step as a
ratio to one training step measured in the same interleaved rounds (CPU time, one torch thread),
with, for token-level models, EMPIRICAL and MONTE_CARLO with ``sequence_rows=True`` too,
and the parameters that took the generic path (one batched backward per (row, column) pair; the
``fimfast.persample`` logger names them), to find the cliffs a user would meet.

Models (float32, batch of 16 unless said, classifiers with one row per sample unless said):

* ``vit``: patch embedding Conv2d(3, 64, 4, stride=4) on 3 x 32 x 32, a class token and a position
  embedding (bare Parameters), 2 pre-norm ``nn.TransformerEncoderLayer`` (4 heads, GELU), head;
* ``resnet``: two residual blocks Conv-BatchNorm-ReLU (eval mode), global pool, head;
* ``convnext``: a ConvNeXt block (depthwise 7 x 7 conv, channels-last LayerNorm, Linear 4x,
  GELU, Linear, a layer-scale Parameter), pool, head;
* ``mixer``: an MLP-Mixer block (token mixing Linear on the transposed patches, channel mixing);
* ``llama``: a hand-written decoder block (RMSNorm, rotary q/k by cos/sin tables, SDPA causal,
  SwiGLU), token-level logits ``(N, T, V)`` with ``class_dim=-1``, tied embedding head
  (``F.linear(h, emb.weight)``), N=4, T=16, V=256;
* ``lstm``: Embedding - 2-layer LSTM - Linear on the last state, T=24;
* ``charcnn``: Embedding - Conv1d - max over time - Linear;
* ``deep_mlp``: 8 Linear-BatchNorm1d(eval)-ReLU-Dropout(eval) layers;
* ``gpt2``, ``bert``: Hugging Face tiny random configs (2 layers, d=64) when transformers is
  installed: GPT-2 LM (token-level logits, shifted labels) and BERT sequence classification.

    PYTHONPATH=. python benchmarks/bench_zoo.py [--rounds 7] [--models vit,resnet,...]
        [--types exact,empirical,monte_carlo,hutchinson] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fimfast  # noqa: E402


class _ViT(nn.Module):
    def __init__(self, d=64, C=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 65, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.enc(h))[:, 0])


class _Res(nn.Module):
    def __init__(self, c=16, C=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            for _ in range(2))
        self.head = nn.Linear(c, C)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = F.relu(h + b(h))
        return self.head(h.mean((2, 3)))


class _ConvNeXt(nn.Module):
    def __init__(self, c=32, C=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))
        self.head = nn.Linear(c, C)

    def forward(self, x):
        h = self.stem(x)
        y = self.dw(h).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.ln(y))))
        return self.head((h + y.permute(0, 3, 1, 2)).mean((2, 3)))


class _Mixer(nn.Module):
    def __init__(self, P=16, d=32, C=10):
        super().__init__()
        self.embed = nn.Linear(48, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tok1, self.tok2 = nn.Linear(P, 2 * P), nn.Linear(2 * P, P)
        self.ch1, self.ch2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, C)

    def forward(self, x):  # (N, 16, 48) flattened 4 x 4 patches of 3 x 16 x 16 images
        h = self.embed(x)
        h = h + self.tok2(F.gelu(self.tok1(self.ln1(h).transpose(1, 2)))).transpose(1, 2)
        h = h + self.ch2(F.gelu(self.ch1(self.ln2(h))))
        return self.head(h.mean(1))


class _RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Llama(nn.Module):
    def __init__(self, V=256, d=64, H=4, T=16):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        # a language model's small init (GPT-2: 0.02): with N(0, 1) rows the tied head gives each
        # token's own logit a lead of 30-40 (1 - p below 1e-13: confident rows throughout)
        nn.init.normal_(self.emb.weight, std=0.1)
        self.n1, self.n2, self.nf = _RMSNorm(d), _RMSNorm(d), _RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.H = H
        hd = d // H
        f = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(T).float(), f)
        self.register_buffer("cos", ang.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", ang.sin().repeat(1, 2), persistent=False)

    def _rope(self, x):
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[: x.shape[2]] + rot * self.sin[: x.shape[2]]

    def forward(self, ids):
        N, T = ids.shape
        h = self.emb(ids)
        q, k, v = self.qkv(self.n1(h)).view(N, T, 3, self.H, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True)
        h = h + self.o(a.transpose(1, 2).reshape(N, T, -1))
        x = self.n2(h)
        h = h + self.down(F.silu(self.gate(x)) * self.up(x))
        return F.linear(self.nf(h), self.emb.weight)


class _LSTM(nn.Module):
    def __init__(self, V=500, d=32, C=4):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.rnn = nn.LSTM(d, d, num_layers=2, batch_first=True)
        self.head = nn.Linear(d, C)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class _CharCNN(nn.Module):
    def __init__(self, V=100, d=32, C=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.conv = nn.Conv1d(d, 64, 5, padding=2)
        self.head = nn.Linear(64, C)

    def forward(self, ids):
        return self.head(F.relu(self.conv(self.emb(ids).transpose(1, 2))).amax(-1))


def _deep_mlp():
    layers, d = [], 64
    for i in range(8):
        layers += [nn.Linear(32 if i == 0 else d, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Linear(d, 10))


def _hf(kind: str, V: int = 256):
    try:
        import transformers
    except ImportError:
        return None
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=2,
                                      n_head=4, attn_implementation="eager")
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=32, num_labels=3,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg)


def build(name: str, N: int = 16, V: int = 256):
    """``(model, batch, fim_opts, loss)`` of one model of the zoo (seeded), or ``None``
    (``V``: the vocabulary of the token-level models, ``llama`` and ``gpt2``)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    opts: dict = {}
    if name == "vit":
        m, x, y = _ViT(), torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,))
    elif name == "resnet":
        m, x, y = _Res(), torch.randn(N, 3, 16, 16, generator=g), torch.randint(0, 10, (N,))
    elif name == "convnext":
        m, x, y = _ConvNeXt(), torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,))
    elif name == "mixer":
        m, x, y = _Mixer(), torch.randn(N, 16, 48, generator=g), torch.randint(0, 10, (N,))
    elif name == "llama":
        m = _Llama(V=V)
        x = torch.randint(0, V, (4, 16), generator=g)
        y = torch.randint(0, V, (4, 16), generator=g)
        opts = {"class_dim": -1}
    elif name == "lstm":
        m, x, y = _LSTM(), torch.randint(0, 500, (N, 24), generator=g), torch.randint(0, 4, (N,))
    elif name == "charcnn":
        m, x, y = _CharCNN(), torch.randint(0, 100, (N, 40), generator=g), torch.randint(0, 5, (N,))
    elif name == "deep_mlp":
        m, x, y = _deep_mlp(), torch.randn(N, 32, generator=g), torch.randint(0, 10, (N,))
    elif name in ("gpt2", "bert"):
        m = _hf(name, V)
        if m is None:
            return None
        ids = torch.randint(0, V, (4 if name == "gpt2" else N, 16), generator=g)
        if name == "gpt2":
            opts = {"forward_fn": lambda model, b: model(input_ids=b[0]).logits,
                    "class_dim": -1, "shift_labels": True}
            m.eval()
            return m, (ids, ids), opts, _lm_loss(shift=True)
        m.eval()
        y = torch.randint(0, 3, (N,), generator=g)
        opts = {"forward_fn": lambda model, b: model(input_ids=b[0]).logits}
        return m, (ids, y), opts, lambda m, b: F.cross_entropy(m(input_ids=b[0]).logits, b[1])
    else:
        raise ValueError(f"unknown model {name!r}")
    m.eval()
    if name == "llama":
        return m, (x, y), opts, _lm_loss(shift=False)
    return m, (x, y), opts, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def _lm_loss(shift: bool):
    def loss(m, b):
        out = m(b[0])
        z = out.logits if hasattr(out, "logits") else out
        y = b[1]
        if shift:
            z, y = z[:, :-1], y[:, 1:]
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))

    return loss


class _Generic(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def survey(name: str, types: list[str], rounds: int) -> dict | None:
    built = build(name)
    if built is None:
        return None
    model, batch, opts, loss = built
    handler = _Generic()
    log = logging.getLogger("fimfast.persample")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        token = "class_dim" in opts  # token-level logits: the sequence-row variants too
        ests = {}
        for t in types:
            ests[t] = fimfast.DiagFisher(model, t, seed=0, **opts)
            if token and t in ("empirical", "monte_carlo"):
                ests[t + "+seq"] = fimfast.DiagFisher(model, t, seed=0, sequence_rows=True,
                                                      **opts)

        def train():
            model.zero_grad(set_to_none=True)
            loss(model, batch).backward()

        calls = {"train": train, **{t: (lambda e=e: e.step(batch)) for t, e in ests.items()}}
        for f in calls.values():  # warm-up (plans, caches)
            f()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, f in calls.items():
                c = time.process_time()
                f()
                times[k].append(time.process_time() - c)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    tr = statistics.median(times["train"])
    out = {"train_ms": round(tr * 1e3, 3),
           "ratio": {t: round(statistics.median(times[t]) / tr, 3) for t in ests},
           "generic": sorted(set(handler.lines))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", default="vit,resnet,convnext,mixer,llama,lstm,charcnn,deep_mlp,"
                                        "gpt2,bert")
    ap.add_argument("--types", default="exact,empirical,monte_carlo,hutchinson")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    types = a.types.split(",")
    res = {}
    print("| model | train ms | " + " | ".join(types) + " | sequence rows | generic path |")
    print("|---|---|" + "---|" * len(types) + "---|---|")
    for name in a.models.split(","):
        r = survey(name, types, a.rounds)
        if r is None:
            continue
        res[name] = r
        gen = "; ".join(r["generic"])[:300] or "none"
        seq = ", ".join(f"{t} {v}" for t, v in r["ratio"].items() if t.endswith("+seq"))
        print(f"| {name} | {r['train_ms']} | " + " | ".join(str(r["ratio"][t]) for t in types)
              + f" | {seq or '-'} | {gen} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
