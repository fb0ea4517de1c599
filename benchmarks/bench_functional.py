"""Cost of the per-sample types on models whose parameters are used through functional calls
(and on Linear layers whose input has the batch folded into its first dim).

Models: a GPT-like LM whose token table is also the output layer through
``F.linear(h, wte.weight)`` (token-level logits), the same LM tied through an ``nn.Linear`` head
(the module rules' cost, for reference), the F.linear-tied LM with its positions added as a bare
table (``+ wpe.weight``), a classifier made of bare parameters through
``F.linear``, and classifiers with the other functional uses of bare parameters: elementwise
functions as scales and a functional norm (``scaled_mlp``: ``F.layer_norm(h, ..., w, b)`` and
``h * sigmoid(gate)`` after the first layer, a learnable log-temperature
``logits * logit_scale.exp()``),
contractions (``contract_mlp``: ``einsum``, per-head ``bmm``, ``addmm``, ``W @ x``) and
convolutions (``bare_convs``: ``F.conv3d`` then ``F.conv_transpose2d``), a small ViT whose class
token is expanded to the batch and concatenated to the patches (``vit_cls``), ``nn.Linear`` layers
on a batch folded into the first dim (``folded_mlp``: ``fc(h.reshape(N * T, d))`` on ``(N, T, d)``
activations; ``windows``: Swin-style attention inside 4 x 4 windows, ``(N * 16, 16, C)``),
masked weights (``masked_mlp``: ``F.linear(h, W * mask, b)`` with half the entries masked,
``pruned_mlp``: the same MLP of ``nn.Linear`` layers pruned by
``torch.nn.utils.prune.l1_unstructured``), weights computed from parameters (``weight_norm_mlp``:
an MLP 784-512-256-10 with ``torch.nn.utils.parametrizations.weight_norm`` on its three Linear
layers, batch 128; ``param_mlp``: 64-128-128-10 with ``spectral_norm`` and a symmetric
parametrization of its own, batch 16; ``relpos_attn``: attention over a 4 x 4 grid of tokens with
a relative-position bias table gathered by an index buffer and added to the scores, as in BEiT,
batch 16; cosine classifiers ``cosine_cls`` and ``cosine_cls_1k``: an MLP 784-256-128, its
features normalized, then ``logit_scale.exp() * (h @ F.normalize(W, dim=0))`` to 10 and to 1000
classes, batch 64). For each, EXACT, EMPIRICAL and MONTE_CARLO
steps are timed as ratios to a training step (forward, loss, backward) of the same model, one
torch thread (``--clock cpu``: by the process's CPU time instead of the wall clock; ``--types``:
some of the types only).

``python benchmarks/bench_functional.py --trees A B --rounds 11`` compares source trees (each
on ``PYTHONPATH`` in a child process, e.g. before and after a change): every round runs one child
per tree, in shuffled order, and each child measures every ratio once (the fastest of its timed
steps, one for a step over a second, over the fastest of the training steps timed right after
them); the medians over the rounds are printed as a table. ``--child`` runs one measurement, prints
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

MODELS = ("tied_lm", "module_tied_lm", "bare_pos_lm", "bare_mlp", "scaled_mlp", "contract_mlp",
          "bare_convs", "masked_mlp", "pruned_mlp", "vit_cls", "folded_mlp", "windows",
          "weight_norm_mlp", "param_mlp", "relpos_attn", "cosine_cls", "cosine_cls_1k")
TYPES = ("exact", "empirical", "monte_carlo")


def _models():
    import torch
    import torch.nn.functional as F
    import torch.nn.utils.prune as prune
    from torch import nn

    class TiedLM(nn.Module):
        bare_pos = False  # positions added as a bare table (wpe.weight) instead of a lookup

        def __init__(self, V=32, d=32, T=8):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
            self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))

        def forward(self, ids):
            return self.head(self.body(ids))

        def body(self, ids):
            h = self.wte(ids) + self.wpe.weight if self.bare_pos else self.wte(ids) + self.wpe(
                torch.arange(ids.shape[1]))
            a = self.ln1(h)
            h = h + self.attn(a, a, a, attn_mask=self.mask, need_weights=False)[0]
            return h + self.proj(F.gelu(self.fc(self.ln2(h))))

        def head(self, h):
            return F.linear(h, self.wte.weight)

    class BarePosLM(TiedLM):
        bare_pos = True

    class ModuleTiedLM(TiedLM):
        """The same LM tied the usual way: an nn.Linear head sharing the table."""

        def __init__(self):
            super().__init__()
            self.out = nn.Linear(32, 32, bias=False)
            self.out.weight = self.wte.weight

        def head(self, h):
            return self.out(h)

    class BareMLP(nn.Module):
        def __init__(self, d=64, h=128, C=10):
            super().__init__()
            self.W1 = nn.Parameter(torch.randn(h, d) / d**0.5)
            self.b1 = nn.Parameter(torch.zeros(h))
            self.W2 = nn.Parameter(torch.randn(C, h) / h**0.5)
            self.b2 = nn.Parameter(torch.zeros(C))

        def forward(self, x):
            return F.linear(torch.relu(F.linear(x, self.W1, self.b1)), self.W2, self.b2)

    def bare(*shape, scale=None):
        return nn.Parameter(torch.randn(*shape) * (scale or shape[-1] ** -0.5))

    class ScaledMLP(nn.Module):
        def __init__(self, d=64, h=128, C=10):
            super().__init__()
            self.fc, self.fc2, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, C)
            self.ln_w, self.ln_b = nn.Parameter(torch.ones(h)), nn.Parameter(torch.zeros(h))
            self.gate = bare(h, scale=1.0)
            self.logit_scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            h = F.layer_norm(torch.relu(self.fc(x)), (128,), self.ln_w, self.ln_b)
            h = torch.relu(self.fc2(h * torch.sigmoid(self.gate)))
            return self.head(h) * self.logit_scale.exp()

    class ContractMLP(nn.Module):
        def __init__(self, d=64, h=128, C=10):
            super().__init__()
            self.W1, self.b1 = bare(h, d), nn.Parameter(torch.zeros(h))
            self.W2 = bare(4, h // 4, h // 4)
            self.W3, self.b3 = bare(h, h), nn.Parameter(torch.zeros(h))
            self.W4 = bare(C, h)

        def forward(self, x):
            N = x.shape[0]
            h = torch.relu(torch.einsum("nd,hd->nh", x, self.W1) + self.b1)
            hh = torch.bmm(h.view(N, 4, -1).transpose(0, 1), self.W2)  # per-head weights
            h = torch.relu(torch.addmm(self.b3, hh.transpose(0, 1).reshape(N, -1), self.W3))
            return (self.W4 @ h.T).T

    class BareConvs(nn.Module):
        def __init__(self, C=10):
            super().__init__()
            self.k3, self.b3 = bare(8, 2, 3, 3, 3, scale=0.2), nn.Parameter(torch.zeros(8))
            self.kt, self.bt = bare(8, 4, 3, 3, scale=0.2), nn.Parameter(torch.zeros(4))
            self.head = nn.Linear(4, C)

        def forward(self, x):  # (N, 2, 6, 6, 6)
            a = torch.relu(F.conv3d(x, self.k3, self.b3))  # (N, 8, 4, 4, 4)
            a = a.reshape(a.shape[0], 8, 8, 8)
            b = torch.relu(F.conv_transpose2d(a, self.kt, self.bt, stride=2))  # (N, 4, 17, 17)
            return self.head(b.mean((2, 3)))

    class MaskedMLP(nn.Module):
        def __init__(self, d=64, h=128, C=10):
            super().__init__()
            self.W = nn.ParameterList([bare(h, d), bare(h, h), bare(C, h)])
            self.b = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in (h, h, C)])
            for i, w in enumerate(self.W):
                self.register_buffer(f"m{i}", (torch.rand(w.shape) > 0.5).float())

        def forward(self, x):
            for i in range(3):
                x = F.linear(x, self.W[i] * getattr(self, f"m{i}"), self.b[i])
                x = torch.relu(x) if i < 2 else x
            return x

    class ViTCls(nn.Module):
        """A small ViT: 4x4 patches of 3 x 16 x 16 images, a class token expanded to the batch
        and concatenated, a positional table added, one pre-norm encoder layer scaled by a
        LayerScale vector, the class token's features classified."""

        def __init__(self, d=32, C=10):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, stride=4)
            self.cls = bare(1, 1, d, scale=0.02)
            self.pos = bare(1, 17, d, scale=0.02)
            self.block = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                                    norm_first=True)
            self.gamma = nn.Parameter(torch.full((d,), 0.1))
            self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, C)

        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
            h = h + self.gamma * self.block(h)
            return self.head(self.norm(h[:, 0]))

    class FoldedMLP(nn.Module):
        def __init__(self, d=64, h=128, C=10):
            super().__init__()
            self.a, self.b, self.head, self.h = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, C), h

        def forward(self, x):  # (N, T, d)
            N, T, d = x.shape
            h = torch.relu(self.a(x.reshape(N * T, d)))
            return self.head(torch.relu(self.b(h)).reshape(N, T, self.h).mean(1))

    class Windows(nn.Module):
        def __init__(self, c=32, C=10):
            super().__init__()
            self.embed = nn.Conv2d(3, c, 2, stride=2)
            self.qkv, self.proj, self.head = nn.Linear(c, 3 * c), nn.Linear(c, c), nn.Linear(c, C)

        def forward(self, x):  # (N, 3, 32, 32) -> (N, 16, 16, c) -> 16 windows of 4 x 4
            h = self.embed(x).permute(0, 2, 3, 1)
            N, H, W, c = h.shape
            w = h.reshape(N, 4, 4, 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(N * 16, 16, c)
            q, k, v = self.qkv(w).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, -1) @ v
            a = self.proj(a).reshape(N, 4, 4, 4, 4, c).permute(0, 1, 3, 2, 4, 5)
            return self.head((h + a.reshape(N, H, W, c)).mean((1, 2)))

    def parametrized(d=64, h=128, C=10):
        from torch.nn.utils import parametrizations as P
        from torch.nn.utils import parametrize

        class Symmetric(nn.Module):
            def forward(self, X):
                return X.triu() + X.triu(1).transpose(-1, -2)

        last = nn.Linear(h, h)
        parametrize.register_parametrization(last, "weight", Symmetric())
        return nn.Sequential(P.spectral_norm(nn.Linear(d, h)), nn.ReLU(), last, nn.ReLU(),
                             nn.Linear(h, C))

    class RelPosAttention(nn.Module):
        def __init__(self, d=32, H=4, C=10, w=4):
            super().__init__()
            self.H, self.T = H, w * w
            self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, C)
            self.table = nn.Parameter(0.02 * torch.randn((2 * w - 1) ** 2, H))
            yy, xx = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
            pos = torch.stack([yy.flatten(), xx.flatten()])
            rel = pos[:, :, None] - pos[:, None, :] + w - 1
            self.register_buffer("index", rel[0] * (2 * w - 1) + rel[1])

        def forward(self, x):  # (N, T, d)
            N, T, d = x.shape
            q, k, v = self.qkv(x).view(N, T, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
            bias = self.table[self.index.view(-1)].view(T, T, self.H).permute(2, 0, 1)
            a = q @ k.transpose(-2, -1) * (d // self.H) ** -0.5 + bias.unsqueeze(0)
            o = (a.softmax(-1) @ v).transpose(1, 2).reshape(N, T, d)
            return self.head((x + self.proj(o)).mean(1))

    def weight_norm_mlp():
        from torch.nn.utils.parametrizations import weight_norm

        return nn.Sequential(weight_norm(nn.Linear(784, 512)), nn.ReLU(),
                             weight_norm(nn.Linear(512, 256)), nn.ReLU(),
                             weight_norm(nn.Linear(256, 10)))

    class CosineCls(nn.Module):
        """An MLP 784-256-128, then a cosine head with a learnable scale (CLIP-like)."""

        def __init__(self, C=10):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128),
                                      nn.ReLU())
            self.W = nn.Parameter(torch.randn(128, C) * 128 ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            h = F.normalize(self.body(x), dim=1)
            return self.logit_scale.exp() * (h @ F.normalize(self.W, dim=0))

    def pruned(d=64, h=128, C=10):
        net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, C))
        for i in (0, 2, 4):
            prune.l1_unstructured(net[i], "weight", amount=0.5)
        return net

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    N = 16
    ids = torch.randint(0, 32, (N, 8), generator=g)
    labels = torch.randint(0, 32, (N, 8), generator=g)
    x = torch.randn(N, 64, generator=g)
    return {
        "tied_lm": (TiedLM(), (ids, labels)),
        "module_tied_lm": (ModuleTiedLM(), (ids, labels)),
        "bare_pos_lm": (BarePosLM(), (ids, labels)),
        "bare_mlp": (BareMLP(), (x, torch.randint(0, 10, (N,), generator=g))),
        "scaled_mlp": (ScaledMLP(), (x, torch.randint(0, 10, (N,), generator=g))),
        "contract_mlp": (ContractMLP(), (x, torch.randint(0, 10, (N,), generator=g))),
        "bare_convs": (BareConvs(), (torch.randn(N, 2, 6, 6, 6, generator=g),
                                     torch.randint(0, 10, (N,), generator=g))),
        "masked_mlp": (MaskedMLP(), (x, torch.randint(0, 10, (N,), generator=g))),
        "pruned_mlp": (pruned(), (x, torch.randint(0, 10, (N,), generator=g))),
        "vit_cls": (ViTCls(), (torch.randn(N, 3, 16, 16, generator=g),
                               torch.randint(0, 10, (N,), generator=g))),
        "folded_mlp": (FoldedMLP(), (torch.randn(N, 32, 64, generator=g),
                                     torch.randint(0, 10, (N,), generator=g))),
        "windows": (Windows(), (torch.randn(N, 3, 32, 32, generator=g),
                                torch.randint(0, 10, (N,), generator=g))),
        "weight_norm_mlp": (weight_norm_mlp(), (torch.randn(128, 784, generator=g),
                                                torch.randint(0, 10, (128,), generator=g))),
        "param_mlp": (parametrized(), (x, torch.randint(0, 10, (N,), generator=g))),
        "relpos_attn": (RelPosAttention(), (torch.randn(N, 16, 32, generator=g),
                                            torch.randint(0, 10, (N,), generator=g))),
        "cosine_cls": (CosineCls(), (torch.randn(64, 784, generator=g),
                                     torch.randint(0, 10, (64,), generator=g))),
        "cosine_cls_1k": (CosineCls(1000), (torch.randn(64, 784, generator=g),
                                            torch.randint(0, 1000, (64,), generator=g))),
    }


def child(calls: int, models: list[str], types=TYPES, clock=time.perf_counter) -> dict:
    """One measurement of every (model, type) ratio in this process's ``fimfast`` (``clock``:
    wall clock, or the process's CPU time)."""
    import torch
    import torch.nn.functional as F

    import fimfast

    torch.set_num_threads(1)
    out = {}
    for name, (model, (inp, y)) in _models().items():
        if name not in models:
            continue

        def train(model=model, inp=inp, y=y):
            z = model(inp)
            F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)).backward()
            model.zero_grad(set_to_none=True)

        for t in types:
            est = fimfast.DiagFisher(model, t, class_dim=-1)
            t0 = clock()
            est.step((inp, y))  # warm-up: plan, probe
            slow = clock() - t0 > 1.0  # then one timed call is enough
            times = []
            for _ in range(1 if slow else calls):
                t0 = clock()
                est.step((inp, y))
                times.append(clock() - t0)
            del est
            train()  # warm-up: the estimator's step freed memory a training step reuses
            floor = []
            for _ in range(2 * calls + 1):
                t0 = clock()
                train()
                floor.append(clock() - t0)
            # the fastest call of each: on a shared machine the others carry preemptions
            out[f"{name}:{t}"] = min(times) / min(floor)
            out[f"{name}:{t}:s"] = min(times)
            out.setdefault(f"{name}:train:s", min(floor))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--json", help="also write every round's measurements to this file")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by the wall clock or by the process's CPU time")
    a = ap.parse_args()
    if a.child:
        clock = time.process_time if a.clock == "cpu" else time.perf_counter
        print(json.dumps(child(a.calls, a.models, a.types, clock)))
        return
    rng = random.Random(0)
    res: dict[str, list[dict]] = {t: [] for t in a.trees}
    for r in range(a.rounds):
        order = list(a.trees)
        rng.shuffle(order)
        for tree in order:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
            # run as a script: its own folder, not the working directory, heads sys.path
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--calls", str(a.calls),
                   "--models", *a.models, "--types", *a.types, "--clock", a.clock]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            res[tree].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    keys = [f"{m}:{t}" for m in a.models for t in a.types]
    print("| model:type | " + " | ".join(a.trees) + " |")
    print("|---|" + "---|" * len(a.trees))
    for k in keys + [f"{m}:train:s" for m in a.models]:
        cells = []
        for tree in a.trees:
            vs = [d[k] for d in res[tree]]
            v = statistics.median(vs)
            cells.append(f"{v * 1e3:.2f} ms" if k.endswith(":s")
                         else f"{v:.1f}x [{min(vs):.1f}, {max(vs):.1f}]")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
