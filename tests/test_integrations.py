"""fimfast.integrations: the Hugging Face and Lightning callbacks on tiny models, EWCTrainer, and
lazy imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fimfast

ROOT = Path(__file__).resolve().parent.parent

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="the Trainer needs transformers and accelerate (pip install --no-deps accelerate)",
)
_PL = importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")
needs_pl = pytest.mark.skipif(_PL is None, reason="needs lightning or pytorch_lightning")


def test_import_fimfast_imports_no_framework():
    code = (
        "import sys, fimfast\n"
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import fimfast.integrations\n"
        "assert 'transformers' not in sys.modules\n"
        "print(sorted(fimfast.integrations.__all__))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "['hf', 'lightning']" in out.stdout


# -- Hugging Face -------------------------------------------------------------------------------- #
def _tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3)  # fmt: skip
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def _hf_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
         "labels": int(ids[i, 0] % 3)}
        for i in range(n)
    ]  # fmt: skip


def _batches(rows, size=8):
    from transformers import default_data_collator

    return [default_data_collator(rows[i : i + size]) for i in range(0, len(rows), size)]


def _args(tmp_path, steps=4, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, **kw,
    )  # fmt: skip


@needs_hf
def test_hf_callback_end_step_and_adam(tmp_path):
    from transformers import Trainer

    from fimfast.integrations.hf import FisherCallback

    rows = _hf_data()
    loader = _batches(rows)
    model = _tiny_bert()
    end = FisherCallback("exact", when="end", dataloader=loader, max_batches=3)
    step = FisherCallback("hutchinson", when="step", every_n_steps=2, save_path=False, seed=0)
    free = FisherCallback("adam", save_path=str(tmp_path / "adam.safetensors"))
    tr = Trainer(model=model, args=_args(tmp_path), train_dataset=rows,
                 callbacks=[end, step, free])  # fmt: skip
    tr.train()
    model.eval()
    ref = fimfast.diag_fisher(model, loader[:3], "exact", reduction="mean")
    assert list(end.fisher) == list(ref) and end.fisher.allclose(ref, rtol=1e-5, atol=1e-9)
    assert end.fisher.meta["count"] == 24
    saved = fimfast.load_fisher(tmp_path / "fisher.safetensors", model=model)  # fingerprint ok
    assert saved.allclose(end.fisher, rtol=0, atol=0)
    # step mode: one batch of the training dataloader every 2 of the 4 steps
    assert step.estimator.state.steps == 2 and step.fisher.meta["count"] == 16
    assert not (tmp_path / "hutchinson.safetensors").exists()
    # the free estimate: the trainer's AdamW, B = 8
    expected = fimfast.from_optimizer(tr.optimizer, model, batch_size=8)
    assert free.fisher.allclose(expected, rtol=0, atol=0) and free.fisher.meta["batch_size"] == 8
    assert fimfast.DiagFIM.read_metadata(str(tmp_path / "adam.safetensors"))["step"] == 4


@needs_hf
def test_ewc_trainer_adds_the_penalty(tmp_path):
    from fimfast.integrations.hf import EWCTrainer

    rows = _hf_data()
    model = _tiny_bert()
    F = fimfast.diag_fisher(model.eval(), _batches(rows)[:2], "exact", reduction="mean")
    ewc = fimfast.EWC(model, F, lam=1e4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    tr = EWCTrainer(model=model, args=_args(tmp_path, steps=2), train_dataset=rows, ewc=ewc)
    batch = _batches(rows)[0]
    model.eval()
    with torch.no_grad():
        plain = model(**batch).loss
        total = tr.compute_loss(model, batch)
    assert float(ewc()) > 0
    assert float(total) == pytest.approx(float(plain) + float(ewc()), rel=1e-5)
    tr.train()  # runs with the penalty
    with pytest.raises(TypeError, match="fimfast.EWC"):
        EWCTrainer(model=model, args=_args(tmp_path), train_dataset=rows, ewc=F)


def test_callback_arguments_are_checked():
    from fimfast.integrations._common import Accumulator

    with pytest.raises(ValueError, match="when must be"):
        Accumulator("exact", "epoch", 1, None, "mean", None, None, None, {})
    with pytest.raises(ValueError, match="use when='end'"):
        Accumulator("adam", "step", 1, None, "mean", None, None, None, {})
    with pytest.raises(ValueError, match="every_n_steps"):
        Accumulator("exact", "step", 0, None, "mean", None, None, None, {})
    with pytest.raises(ValueError):
        Accumulator("exakt", "end", 1, None, "mean", None, None, None, {})
    with pytest.raises(ValueError):
        Accumulator("exact", "end", 1, None, "mean", None, None, None, {"num_probs": 2})


@needs_hf
def test_hf_ewc_trainer_example(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_ewc", ROOT / "examples/hf_ewc_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "40", "--out-dir", str(tmp_path)])
    meta = fimfast.DiagFIM.read_metadata(str(tmp_path / "task_a" / "fisher.safetensors"))
    assert meta["estimator"] == "exact" and meta["model_revision"] == "task_a"
    # the penalised run stays closer to theta_A in the Fisher's metric
    assert out["ewc"]["fisher_distance"] < 0.5 * out["finetune"]["fisher_distance"]
    for r in (out["ewc"], out["finetune"]):
        assert 0 <= r["task_a"] <= 1 and 0 <= r["task_b"] <= 1


# -- Lightning ----------------------------------------------------------------------------------- #
def _pl():
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    return pl


@needs_pl
def test_lightning_callback(tmp_path):
    pl = _pl()
    from torch.utils.data import DataLoader, TensorDataset

    from fimfast.integrations.lightning import FisherCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    module = Net()
    end = FisherCallback("exact", dataloader=[(x[:32],), (x[32:],)])
    step = FisherCallback("empirical", when="step", every_n_steps=2, save_path=False)
    free = FisherCallback("adam", save_path=str(tmp_path / "adam.safetensors"))
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[end, step, free])  # fmt: skip
    trainer.fit(module, train)
    module.eval()
    ref = fimfast.diag_fisher(module, [(x[:32],), (x[32:],)], "exact", reduction="mean")
    assert end.fisher.allclose(ref, rtol=1e-5, atol=1e-9) and list(end.fisher) == list(ref)
    assert fimfast.load_fisher(tmp_path / "fisher.safetensors", model=module).allclose(ref)
    assert step.estimator.state.steps == 2 and step.fisher.meta["count"] == 32
    expected = fimfast.from_optimizer(trainer.optimizers[0], module, batch_size=16)
    assert free.fisher.allclose(expected, rtol=0, atol=0)
    assert free.fisher.meta["batch_size"] == 16
