"""``scripts/gpu_check.sh --dry-run`` runs end to end on the CPU (tiny sizes, no build), so the GPU
validation script cannot rot on machines without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for step in ("build: skipped", "tests:", "ops: benchmarks/bench_ops.py", "suite:", "done:"):
        assert step in log, (step, log[-4000:])
    rep = json.loads(out.read_text())
    assert rep["size"] == "tiny" and rep["environment"]["device"] == "cpu"
    rows = rep["suite"]
    assert {r["workload"] for r in rows} == {"a", "d", "e", "g", "lm50k"}
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    for r in rows:
        assert r["fisher_step_ms"] > 0 and r["train_step_ms"] > 0
        assert r["ratio_to_training_step"] == pytest.approx(r["fisher_step_ms"]
                                                            / r["train_step_ms"])
    assert any(r["estimator"] == "hutchinson+lm_head" for r in rows if r["workload"] == "lm50k")
    ops = {r["op"] for r in rep["ops"]}
    assert ops == {"probe_logit_grad", "core_topk", "sq_matmul", "shared_sq", "accumulate_"}
    for r in rep["ops"]:
        assert r["bytes"] > 0 and r["flops"] > 0 and r["achieved_GBps"] > 0


def test_roofline_cost_model_by_hand():
    """bench_ops.cost: bytes and flops of sq_matmul and accumulate_ computed by hand."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks.bench_ops import cost, peaks_of, roofline

    g, a = torch.zeros(256, 512), torch.zeros(256, 784)
    nbytes, flops = cost("sq_matmul", "sq_matmul/256x512x784/f32", {"g": g, "a": a})
    assert nbytes == 4 * (256 * 512 + 256 * 784 + 512 * 784)
    assert flops == 2 * 256 * 512 * 784 + 256 * (512 + 784)
    h100 = peaks_of("NVIDIA H100 80GB HBM3")
    assert h100 == (3.35e12, 67e12)
    assert roofline(nbytes, flops, h100) == pytest.approx(flops / 67e12)  # compute-bound
    st = [torch.zeros(10, 3)]
    gr = [torch.zeros(10, 3, dtype=torch.bfloat16)]
    nbytes, flops = cost("accumulate_", "acc", {"states": st, "grads": gr})
    assert nbytes == 30 * (4 + 4 + 2) and flops == 90
    assert peaks_of("NVIDIA H100 PCIe")[0] == 2.0e12 and peaks_of("some CPU") is None
