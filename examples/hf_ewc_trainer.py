"""EWC with the Hugging Face Trainer: a Fisher saved after task A keeps it while training task B.

A tiny BERT (built from a config: nothing is downloaded) classifies token sequences. Task A's label
is the first token mod 3, task B's the last token mod 3. Task A is trained with a ``Trainer`` and
:class:`fimfast.integrations.hf.FisherCallback`, which writes the EXACT Fisher (per sample, at the
end of training, with the model's fingerprint) to ``<out>/task_a/fisher.safetensors``. Task B is
then trained twice from the task-A model: with the plain ``Trainer`` (fine-tuning) and with
:class:`fimfast.integrations.hf.EWCTrainer`, whose loss adds ``lam/2 * sum F (theta - theta_A)^2``
built from the saved file.

The script prints both runs' accuracies on A and B and how far each moved from ``theta_A`` in the
Fisher's metric, ``0.5 (theta - theta_A)^T F (theta - theta_A)``, the quantity the penalty keeps
small. This tiny model forgets and relearns erratically: accuracies after B vary by tens of points
with the seed and ``lam`` (one run at 150 steps, ``lam=300``: task A 0.32 fine-tuned, 0.33 with
EWC); ``examples/ewc.py`` and ``benchmarks/free_fisher.py`` measure EWC's effect on steadier
problems.

    python examples/hf_ewc_trainer.py --steps 150
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import fimfast

VOCAB, LENGTH = 24, 6


def make_task(n: int, position: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": int(ids[i, position] % 3)}
            for i in range(n)]  # fmt: skip


def accuracy(model, rows: list[dict]) -> float:
    from transformers import default_data_collator

    batch = default_data_collator(rows)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float((logits.argmax(-1) == batch["labels"]).double().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lam", type=float, default=1e4)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from fimfast.integrations.hf import EWCTrainer, FisherCallback

    out = args.out_dir or tempfile.mkdtemp(prefix="fimfast_hf_ewc_")
    task_a, task_b = make_task(512, 0, args.seed), make_task(512, LENGTH - 1, args.seed + 1)
    test_a, test_b = make_task(256, 0, args.seed + 2), make_task(256, LENGTH - 1, args.seed + 3)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip

    def targs(name: str) -> TrainingArguments:
        return TrainingArguments(
            output_dir=os.path.join(out, name), per_device_train_batch_size=32,
            max_steps=args.steps, learning_rate=3e-3, report_to=[], use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=args.seed,
        )  # fmt: skip

    torch.manual_seed(args.seed)
    model = BertForSequenceClassification(cfg)
    fisher_batches = [default_data_collator(task_a[i : i + 64]) for i in range(0, 256, 64)]
    cb = FisherCallback("exact", when="end", dataloader=fisher_batches, revision="task_a")
    Trainer(model=model, args=targs("task_a"), train_dataset=task_a, callbacks=[cb]).train()
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    result = {"task_a_before": accuracy(model, test_a)}
    fisher_path = os.path.join(out, "task_a", "fisher.safetensors")

    ewc = None
    for name in ("finetune", "ewc"):
        m = BertForSequenceClassification(cfg)
        m.load_state_dict(state_a)
        if name == "ewc":
            F = fimfast.load_fisher(fisher_path, model=m)  # checks the fingerprint
            ewc = fimfast.EWC(m, F, lam=args.lam)  # anchor: theta_A, the parameters now
            trainer = EWCTrainer(model=m, args=targs(name), train_dataset=task_b, ewc=ewc)
        else:
            trainer = Trainer(model=m, args=targs(name), train_dataset=task_b)
        trainer.train()
        result[name] = {"task_a": accuracy(m, test_a), "task_b": accuracy(m, test_b), "model": m}
    # how far each run moved from theta_A in the Fisher's metric: the quantity EWC keeps small
    for name in ("finetune", "ewc"):
        m = result[name].pop("model")
        with torch.no_grad():
            result[name]["fisher_distance"] = float(ewc(m)) / args.lam
    print(f"task A accuracy after training on A: {result['task_a_before']:.3f}")
    for name in ("finetune", "ewc"):
        r = result[name]
        print(f"{name:>8} on B -> task A {r['task_a']:.3f}, task B {r['task_b']:.3f}, "
              f"0.5 (theta - theta_A)^T F (theta - theta_A) = {r['fisher_distance']:.4g}")
    return result


if __name__ == "__main__":
    main()
