"""The ``lm_head`` option: HUTCHINSON steps through the head without the (tokens x V) logits.

The fused step draws the signs of the unfused one (same seed and counters), so both estimates agree
to float32 rounding, on a GPT-2 with tied embeddings and on a plain module with an untied head,
with padding, ignored labels and several probes. No tensor of (tokens x V) elements is allocated
(every aten output storage is observed, tests/largest_alloc.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from largest_alloc import LargestAlloc
from tolerances import BF16_REL, DET_REL_F64, LARGE_VOCAB_SLACK_BYTES, LM_HEAD_EST_REL

import fimfast
from fimfast import hutchinson

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

TYPES = ("hutchinson", "hutchinson_sqrt", "hutchinson_dg")
HERE = os.path.dirname(os.path.abspath(__file__))


def gpt2(V: int = 1000, d: int = 32, tie: bool = True, T: int = 16, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if "dropout" in kw:
        p = kw.pop("dropout")
        kw.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    conf = transformers.GPT2Config(vocab_size=V, n_embd=d, n_layer=2, n_head=2, n_positions=T,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie, **kw)
    return transformers.GPT2LMHeadModel(conf).eval()


def lm_batch(V: int = 1000, N: int = 3, T: int = 8) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[0, T - 3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 2] = -100  # an ignored token inside a sequence
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TinyLM(torch.nn.Module):
    """Embedding, one tanh layer, an untied Linear head with bias (token-level logits)."""

    def __init__(self, V: int = 300, d: int = 12, scale: float | None = None, upcast=False):
        super().__init__()
        self.upcast = upcast
        self.emb = torch.nn.Embedding(V, d)
        self.mid = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, V)
        self.scale = scale

    def forward(self, ids):
        z = self.head(torch.tanh(self.mid(self.emb(ids))))
        if self.upcast:  # as Hugging Face LMs do with `logits.float()`
            z = z.float()
        return z if self.scale is None else z * self.scale


def tiny_batch(V: int = 300, N: int = 4, T: int = 5):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (N, T), generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :2] = -100
    labels[3, 4] = -100
    return ids, labels


def rel(a, b, names) -> float:
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in names)
    den = sum(float((b[n].double() ** 2).sum()) for n in names)
    return (num / den) ** 0.5


def both(model, batch, fim_type, steps=2, head="lm_head", **kw):
    plain = fimfast.DiagFisher(model, fim_type, seed=11, **kw)
    fused = fimfast.DiagFisher(model, fim_type, seed=11, lm_head=head, **kw)
    for _ in range(steps):
        plain.step(batch)
        fused.step(batch)
    assert fused.offset == plain.offset
    a, b = fused.result(), plain.result()
    assert a.meta["count"] == b.meta["count"]
    return a, b, plain.names


@pytest.mark.parametrize(("fim_type", "S"), [(t, 1) for t in TYPES] + [("hutchinson", 3)],
                         ids=[f"{t}-S1" for t in TYPES] + ["hutchinson-S3"])
def test_gpt2_tied_equals_unfused(fim_type, S):
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    a, b, names = both(model, lm_batch(), fim_type, steps=2 if S == 1 else 1, num_probes=S)
    assert rel(a, b, names) <= LM_HEAD_EST_REL
    # the tied weight holds the embedding's and the head's gradient: not the embedding's alone
    assert float(a["transformer.wte.weight"].sum()) > 0
    assert "forward" not in model.lm_head.__dict__  # the head's forward is restored


def test_gpt2_untied_with_the_module_itself():
    model = gpt2(tie=False)
    a, b, names = both(model, lm_batch(), "hutchinson", head=model.lm_head, num_probes=2)
    assert "lm_head.weight" in names
    assert rel(a, b, names) <= LM_HEAD_EST_REL


@pytest.mark.parametrize("fim_type", TYPES)
def test_untied_linear_head_with_bias_and_ignored_labels(fim_type):
    torch.manual_seed(0)
    model = TinyLM()
    a, b, names = both(model, tiny_batch(), fim_type, head="head", num_probes=2)
    assert rel(a, b, names) <= LM_HEAD_EST_REL
    assert float(a["head.bias"].sum()) > 0


def test_float64_model_matches_to_float64_rounding():
    torch.manual_seed(0)
    model = TinyLM().double()
    a, b, names = both(model, tiny_batch(), "hutchinson", head="head", num_probes=2)
    assert a["head.weight"].dtype == torch.float64
    assert rel(a, b, names) <= DET_REL_F64


def test_bf16_model_that_upcasts_its_logits():
    """A bf16 head's output upcast with ``.float()``: the placeholder is already float32."""
    torch.manual_seed(0)
    model = TinyLM(upcast=True).to(torch.bfloat16)
    a, b, names = both(model, tiny_batch(), "hutchinson", head="head")
    assert a["head.weight"].dtype == torch.float32
    # the unfused step rounds the logits and the cotangent to bf16; the fused one keeps float32
    assert rel(a, b, names) <= BF16_REL


@pytest.mark.parametrize("frozen", ["head", "body"])
def test_frozen_head_or_frozen_body(frozen):
    torch.manual_seed(0)
    model = TinyLM()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head") != (frozen == "head"))
    a, b, names = both(model, tiny_batch(), "hutchinson", head="head")
    assert rel(a, b, names) <= LM_HEAD_EST_REL


def test_no_tokens_by_vocab_tensor_is_allocated():
    """V = 50k, 2 x 64 tokens: the unfused step allocates (tokens x V); the fused one never."""
    V, N, T = 50_000, 2, 64
    model = gpt2(V=V, d=8, T=T)
    batch = lm_batch(V, N, T)
    tokens_by_vocab = N * T * V * 4
    fused = fimfast.DiagFisher(model, "hutchinson", seed=1, lm_head="lm_head")
    with LargestAlloc() as m_fused:
        fused.step(batch)
    assert m_fused.bytes < tokens_by_vocab / 2, (m_fused.bytes, m_fused.op, m_fused.shape)
    plain = fimfast.DiagFisher(model, "hutchinson", seed=1)
    with LargestAlloc() as m_plain:  # the probe sees the allocation when there is one
        plain.step(batch)
    assert m_plain.bytes >= tokens_by_vocab
    assert rel(fused.result(), plain.result(), plain.names) <= LM_HEAD_EST_REL


def test_peak_memory_at_50k_vocab_stays_below_the_logits():
    """Peak extra resident memory of a whole fused step (fresh process, tests/peak_memory.py).

    The unfused step holds the logits and one cotangent (2 x 102 MB here; 214 MB measured); the
    fused one holds the model's activations, the head's weight gradient, the estimate and a few
    8 MiB row chunks (24 MB measured).
    """
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak resident memory needs Linux /proc/self/clear_refs")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    # the unfused step at this size: 214 MB (the dispatch-mode test above shows its allocation)
    configs = [{"V": 50_000, "N": 4, "T": 128, "rounds": 1, "lm_head": "lm_head",
                "phases": ["step"]}]
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "peak_memory.py"), json.dumps(configs)],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (fused,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    chunks = 4 * 8 * 2**20  # four float32 buffers of one 8 MiB row chunk
    bound = 3 * fused["param_bytes"] + chunks + LARGE_VOCAB_SLACK_BYTES
    assert fused["step"] <= bound, (fused, bound)
    assert fused["step"] < fused["logits_bytes"] / 2, fused


BAD = {
    "not-found": ({"lm_head": "nope"}, "hutchinson", "names no submodule"),
    "not-linear": ({"lm_head": "transformer.wte"}, "hutchinson", "must name an nn.Linear"),
    "not-a-module": ({"lm_head": 3}, "hutchinson", "must be None, a module name or an nn.Linear"),
    "foreign": ({"lm_head": torch.nn.Linear(2, 2)}, "hutchinson", "must be a module of the model"),
    "exact": ({"lm_head": "lm_head"}, "exact", "works with fim_type"),
    "rankk": ({"lm_head": "lm_head"}, "hutchinson_rankk", "works with fim_type"),
    "bernoulli": ({"lm_head": "lm_head", "likelihood": "bernoulli"}, "hutchinson", "categorical"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_lm_head_raises_naming_it(case):
    opts, fim_type, msg = BAD[case]
    with pytest.raises(ValueError, match=r"lm_head.*" + msg):
        fimfast.DiagFisher(gpt2(V=50, d=8), fim_type, **opts)


def test_set_options_validates_and_switches_lm_head():
    model = gpt2(V=50, d=8)
    batch = lm_batch(50)
    est = fimfast.DiagFisher(model, "hutchinson", seed=2)
    with pytest.raises(ValueError, match="lm_head"):
        est.set_options({"seed": 2, "lm_head": "nope"})
    assert est.opts.lm_head is None
    est.set_options({"seed": 2, "lm_head": "lm_head"})
    est.step(batch)
    ref = fimfast.DiagFisher(model, "hutchinson", seed=2)
    ref.step(batch)
    assert rel(est.result(), ref.result(), ref.names) <= LM_HEAD_EST_REL
    assert est.result().meta["options"]["lm_head"] == "lm_head"


def test_train_step_refuses_lm_head():
    est = fimfast.DiagFisher(gpt2(V=50, d=8), "hutchinson", lm_head="lm_head")
    with pytest.raises(ValueError, match="lm_head"):
        est.train_step(lm_batch(50))


def test_transformed_logits_are_refused_and_nothing_is_kept():
    torch.manual_seed(0)
    model = TinyLM(scale=0.5)  # the model scales the head's output: the fused path cannot
    est = fimfast.DiagFisher(model, "hutchinson", lm_head="head")
    with pytest.raises(ValueError, match="lm_head.*not the head's output"):
        est.step(tiny_batch())
    assert "forward" not in model.head.__dict__
    assert est.offset == 0 and est.state.count == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing(reentrant):
    model = gpt2(dropout=0.0).train()  # HF checkpoints in training mode only
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    seen = []
    model.lm_head.register_forward_pre_hook(
        lambda m, args: seen.append(hutchinson.has_reentrant_checkpoint(args[0]))
    )
    a, b, names = both(model, lm_batch(), "hutchinson", steps=1, num_probes=2)
    assert seen == [reentrant] * 2
    assert rel(a, b, names) <= LM_HEAD_EST_REL


def test_functional_api_takes_lm_head():
    model = gpt2(V=50, d=8)
    batch = lm_batch(50)
    for _ in range(2):
        fimfast.diag_fim_step(model, batch, fim_opts={"seed": 3, "lm_head": "lm_head"})
    got = fimfast.get_diag_fim(model, "hutchinson")
    ref = fimfast.DiagFisher(model, "hutchinson", seed=3)
    ref.step(batch)
    ref.step(batch)
    assert rel(got, ref.result(), ref.names) <= LM_HEAD_EST_REL


class Wrapper(torch.nn.Module):
    """Holds the model as ``.module``, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kw):
        return self.module(*args, **kw)


def test_head_name_inside_a_wrapper():
    torch.manual_seed(0)
    model = TinyLM()
    wrapped = Wrapper(model)
    fused = fimfast.DiagFisher(wrapped, "hutchinson", seed=5, lm_head="head")  # not module.head
    plain = fimfast.DiagFisher(wrapped, "hutchinson", seed=5)
    fused.step(tiny_batch())
    plain.step(tiny_batch())
    assert rel(fused.result(), plain.result(), plain.names) <= LM_HEAD_EST_REL


def test_non_finite_hidden_states_are_refused_and_nothing_is_kept():
    torch.manual_seed(0)
    model = TinyLM()
    ids, labels = tiny_batch()
    with torch.no_grad():
        model.emb.weight[ids[1, 1]] = float("nan")
    est = fimfast.DiagFisher(model, "hutchinson", lm_head="head")
    with pytest.raises(ValueError, match="lm_head contains .* non-finite"):
        est.step((ids, labels))
    assert est.offset == 0 and est.state.count == 0


def test_compiled_model_keeps_the_placeholder(monkeypatch):
    """torch.compile runs the replaced forward: the logits it returns are still the placeholder."""
    from fimfast import lm_head

    torch.manual_seed(0)
    model = TinyLM()
    seen = []
    check = lm_head.HeadCapture.check_output

    def spy(self, logits):
        seen.append(logits.untyped_storage().nbytes())
        return check(self, logits)

    monkeypatch.setattr(lm_head.HeadCapture, "check_output", spy)
    compiled = torch.compile(model)
    fused = fimfast.DiagFisher(compiled, "hutchinson", seed=5, lm_head="head")
    fused.step(tiny_batch())
    assert seen == [4 * model.head.out_features]  # one float32 row of marks, expanded
    plain = fimfast.DiagFisher(model, "hutchinson", seed=5)
    plain.step(tiny_batch())
    got = fused.result()
    got = {n.removeprefix("_orig_mod."): got[n] for n in fused.names}
    assert rel(got, plain.result(), plain.names) <= LM_HEAD_EST_REL
