"""Large output heads: an LM head with a 50k vocabulary.

HUTCHINSON-type steps hold one tensor shaped like the logits (the cotangent) beyond what the
model's forward holds, whatever the vocabulary: measured as peak resident memory in a fresh
process (tests/peak_memory.py). EXACT needs one backward column per (row, class): it announces that
cost before its first backward, and runs in bounded memory (it does not grow with the columns done).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from tolerances import CHUNK_RANKK_REL, DET_REL_F32, LARGE_VOCAB_SLACK_BYTES

import fimfast
from fimfast import hutchinson

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

ONE_BACKWARD = [t.value for t in fimfast.FIMType if not t.is_per_sample]
HERE = os.path.dirname(os.path.abspath(__file__))


def lm(V: int, d: int = 8, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    conf = transformers.GPT2Config(vocab_size=V, n_embd=d, n_layer=1, n_head=2, n_positions=16,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(conf).eval()


def lm_batch(V: int, N: int = 2, T: int = 6) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[0, T - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def peak_memory(configs: list[dict], budget_mb: int | None = None) -> list[dict]:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak resident memory needs Linux /proc/self/clear_refs")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    if budget_mb is not None:
        env["FIMFAST_MEMORY_BUDGET_MB"] = str(budget_mb)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "peak_memory.py"), json.dumps(configs)],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("fim_type", ONE_BACKWARD)
def test_chunked_probes_equal_one_chunk(monkeypatch, fim_type):
    """Row chunks of the probe factor draw the signs of one whole-batch call: same estimate."""
    V = 300
    model, batch = lm(V), lm_batch(V)
    full = fimfast.DiagFisher(model, fim_type, seed=4, num_probes=2)
    full.step(batch)
    monkeypatch.setattr(hutchinson, "_CHUNK_ELEMS", 2 * V)  # 2 rows per chunk (1 for RANKK)
    chunked = fimfast.DiagFisher(model, fim_type, seed=4, num_probes=2)
    chunked.step(batch)
    a, b = full.result().to_vector(), chunked.result().to_vector()
    if fim_type in ("hutchinson_rankk", "hutchinson_rank1"):
        # the eigen-solver iterates until every row of a call converged, so rows solved in other
        # company take a few more or fewer (converged) steps: rounding-level differences
        assert float((a - b).norm() / a.norm()) <= CHUNK_RANKK_REL
    else:
        assert torch.equal(a, b)


def test_hutchinson_at_50k_vocab_holds_one_logits_sized_buffer():
    """Peak extra memory of a step minus the forward's <= one cotangent + params + chunks.

    Configurations: float32 HUTCHINSON, bf16 HUTCHINSON (the cotangent is bf16: no float32 copy of
    the logits), RANKK (eigenpairs per chunk), 2 probes of DG (the buffer is reused).
    """
    base = {"V": 50_000, "N": 4, "T": 64, "rounds": 1}
    configs = [dict(base), dict(base, dtype="bfloat16"), dict(base, fim_type="hutchinson_rankk"),
               dict(base, fim_type="hutchinson_dg", num_probes=2)]
    for r in peak_memory(configs):
        cot = r["logits_bytes"]
        fisher_extra = r["step"] - r["forward"]
        bound = cot + 3 * r["param_bytes"] + LARGE_VOCAB_SLACK_BYTES
        assert fisher_extra <= bound, (r, bound)
        # for scale: the whole step needs less than a training step (logits, log-softmax, grads)
        assert r["step"] <= r["train"], r


def test_exact_at_50k_vocab_runs_in_bounded_memory():
    """Memory after 8 batched backwards equals that after 2: it does not grow with the columns."""
    budget = 64
    (r,) = peak_memory(
        [{"V": 50_000, "N": 1, "T": 4, "d": 8, "fim_type": "exact", "abort_after": [2, 8]}],
        budget_mb=budget)
    assert r["step_8"] <= r["step_2"] + LARGE_VOCAB_SLACK_BYTES, r
    assert r["step_8"] <= 4 * budget * 2**20, r


def test_exact_announces_its_cost_before_any_backward():
    V = fimfast.estimator.EXACT_WARN_CLASSES
    model, batch = lm(V), lm_batch(V)
    calls = []
    model.lm_head.weight.register_hook(lambda g: calls.append(1))
    est = fimfast.DiagFisher(model, "exact")
    R = int((batch["labels"][:, 1:] != -100).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=rf"{R * V} \(row, class\) backward columns"):
            est.step(batch)
    assert calls == [] and est.state.steps == 0  # announced up front; nothing was accumulated


def test_exact_at_4k_vocab_matches_closed_form_of_the_head():
    """Untied LM head z = W h: F_W = sum_rows p(1-p) x h^2 over the shifted valid rows."""
    V = fimfast.estimator.EXACT_WARN_CLASSES
    model, batch = lm(V, tie=False), lm_batch(V, N=2, T=3)
    seen = {}

    def keep(module, args):
        seen["h"] = args[0].detach()

    model.lm_head.register_forward_pre_hook(keep)
    est = fimfast.DiagFisher(model, "exact")
    with pytest.warns(UserWarning, match="backward columns"):
        est.step(batch)
    # row (n, t) predicts t + 1: valid when both positions are real tokens
    m = batch["attention_mask"]
    valid = (m[:, :-1] != 0) & (m[:, 1:] != 0)
    h = seen["h"][:, :-1][valid]
    assert est.result().meta["count"] == h.shape[0] == 2
    with torch.no_grad():
        p = torch.softmax(model.lm_head(h).double(), -1)
    h = h.double()
    ref = (p * (1 - p)).T @ (h * h)
    got = est.result()["lm_head.weight"].double()
    assert float((got - ref).norm() / ref.norm()) <= DET_REL_F32
