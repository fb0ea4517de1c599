"""Hugging Face text models built from tiny configs against the float64 oracle: weight sharing
(ALBERT's layer groups reused at every depth with a factorized embedding, T5's relative-attention
bias shared by the layers and its scaled tied head), relative and disentangled position schemes
(DeBERTa-v2, MPNet, XLNet's bare-Parameter einsums, Funnel's pooling), dynamic convolution
(ConvBERT), ALiBi (BLOOM, Falcon), parallel multi-query blocks (Falcon), learned offset positions
with projections (OPT), partial rotary (GPT-J, Phi with LayerNorm on queries and keys), sliding
and local windows (Mistral, GPT-Neo), soft-capping with the sqrt(d) embedding scale (Gemma-2).

Every type of diagonal equals the oracle with the same draws (tests/adversarial.py): exact in
float64, or to float32 rounding where the model computes in float32 inside (T5 and the RMSNorm,
rotary, softmax upcasts of the decoders). The parameters that take the generic path are the ones
listed, for the reason given; every other parameter is on the rules. The oracle's Fisher is
nonzero for every parameter but the attention key biases (a softmax does not see them) and the
few a model never uses on these inputs.
"""

from __future__ import annotations

import pytest
from adversarial import jacobian_rows, rows_oracle, run

import fimfast

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
transformers.logging.set_verbosity_error()
hf_tiny = pytest.importorskip("hf_tiny")

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
F64 = 1e-10  # float64 throughout
F32_INSIDE = 2e-5  # the model's forward runs float32 operations (the backward rounds likewise)
_NO_BATCH = "no dimension of the layer output is the batch"
_NO_RULE = "no rule for its module"

# name: (tolerance, {parameter-name fragment: generic-path reason}, zero-Fisher fragments)
MODELS = {
    "albert": (F64, {}, ()),
    "t5": (F32_INSIDE, {"relative_attention_bias": _NO_BATCH}, ()),
    "deberta_v2": (F64, {"pos_key_proj": _NO_BATCH, "pos_query_proj": _NO_BATCH,
                         "rel_embeddings": _NO_RULE}, ()),
    "funnel": (F32_INSIDE, {"r_kernel": _NO_BATCH}, ("r_r_bias", "r_kernel", "r_s_bias",
                                                     "seg_embed")),
    "xlnet": (F64, {}, ("mask_emb", "r_s_bias", "seg_embed")),
    "convbert": (F64, {"key_conv_attn_layer.bias": _NO_RULE}, ()),
    "mpnet": (F64, {"relative_attention_bias": _NO_BATCH}, ()),
    "bloom": (F32_INSIDE, {}, ()),
    "falcon": (F32_INSIDE, {}, ()),
    "opt": (F32_INSIDE, {}, ()),
    "gptj": (F32_INSIDE, {}, ()),
    "phi": (F32_INSIDE, {}, ()),
    "mistral": (F32_INSIDE, {}, ()),
    "gemma2": (F32_INSIDE, {}, ()),
    "gptneo": (F32_INSIDE, {}, ()),
}
_KEY_BIAS = ("key.bias", "k_proj.bias", "k_lin.bias", "k_head.bias", "k.bias", "pos_key_proj.bias")


def rel(got: dict, ref: dict) -> tuple[float, str]:
    """The largest relative error over the parameters (one whose oracle is below 1e-9 of the
    largest parameter's is measured against that largest norm), and its parameter."""
    big = max(float(r.norm()) for r in ref.values())
    worst, at = 0.0, ""
    for n, r in ref.items():
        e = float((got[n].double() - r).norm()) / max(float(r.norm()), 1e-9 * big)
        if e > worst:
            worst, at = e, n
    return worst, at


def check_family(name: str, spec: dict, types=TYPES) -> None:
    """Every type in ``types`` on the first batch of ``name`` against the oracle of its rows;
    the generic path and the zero-Fisher parameters as ``spec`` says."""
    tol, generic, zero = spec[name]
    model, batches, fwd, opts = hf_tiny.build(name)
    batch = batches[0]
    rows = jacobian_rows(model, batch, fwd)
    y = batch[1].reshape(-1)
    labels = y[y != -100]
    for t in types:
        est = fimfast.DiagFisher(model, t, seed=7, forward_fn=fwd, **opts)
        est.step(batch)
        ref = rows_oracle(rows, labels, t, 7, 0)
        err, at = rel(dict(est.result().items()), ref)
        assert err <= tol, (t, at, err)
        if t == "exact":
            exact, plan = ref, est._persample.last_plan
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for i in plan.generic:  # the generic parameters are the listed ones, for their reason
        frag = [f for f in generic if f in names[i]]
        assert frag, (names[i], plan.reasons[i])
        assert generic[frag[0]] == plan.reasons[i], (names[i], plan.reasons[i])
    for f in generic:
        assert any(f in names[i] for i in plan.generic), f
    big = max(float(r.abs().max()) for r in exact.values())
    for n, r in exact.items():  # no vacuous comparison
        if not any(f in n for f in _KEY_BIAS + tuple(zero)):
            assert float(r.abs().max()) > 1e-13 * big, n


@pytest.mark.parametrize("name", list(MODELS))
def test_text_family_every_diag_type_equals_the_oracle(name):
    check_family(name, MODELS, TYPES)


@pytest.mark.parametrize("name", ["albert", "mistral"])
def test_steps_on_changing_lengths_and_padding(name):
    """Three steps: no padding at length 5, right padding at 4, left padding at 6: the plan of
    one shape bound to the next, the masks built otherwise (Mistral's sliding window of 2 on
    sdpa; the eager mask of a fully masked padded query is NaN in float64, refused)."""
    model, _, fwd, opts = hf_tiny.build(name)
    tokens = bool(opts)
    batches = [hf_tiny.ids_batch(tokens, None, 11, 5, 2), hf_tiny.ids_batch(tokens, "right", 12, 4),
               hf_tiny.ids_batch(tokens, "left", 13, 6, 2)]
    est, ref = run(model, batches, "exact", logits_fn=fwd, forward_fn=fwd, **opts)
    assert rel(dict(est.result().items()), ref)[0] <= MODELS[name][0]


def test_t5_dict_batch_with_labels_only():
    """A dict batch with ``labels`` and no ``decoder_input_ids``: the model forms its decoder
    inputs from the labels (shifted right), the rows are the labels' (the encoder's
    ``attention_mask`` is not the decoder's); EMPIRICAL equals the oracle at those inputs."""
    model, batches, fwd, _ = hf_tiny.build("t5")
    ids, labels, mask, _ = batches[0]
    labels = labels.clone()
    labels[2, 3] = -100
    est = fimfast.DiagFisher(model, "empirical")
    est.step({"input_ids": ids, "attention_mask": mask, "labels": labels})
    dec = model._shift_right(labels)
    rows = jacobian_rows(model, (ids, labels, mask, dec), fwd)
    ref = rows_oracle(rows, labels[labels != -100], "empirical", 0, 0)
    assert est.result().meta["count"] == int((labels != -100).sum())
    assert rel(dict(est.result().items()), ref)[0] <= F32_INSIDE


@pytest.mark.parametrize("name", ["bloom", "falcon"])
def test_lm_head_option_equals_the_unfused_step(name):
    model, batches, fwd, opts = hf_tiny.build(name)
    for t in ("hutchinson", "hutchinson_sqrt", "hutchinson_dg"):
        a = fimfast.DiagFisher(model, t, seed=3, num_probes=2, forward_fn=fwd, **opts)
        b = fimfast.DiagFisher(model, t, seed=3, num_probes=2, forward_fn=fwd, lm_head="lm_head",
                               **opts)
        a.step(batches[0])
        b.step(batches[0])
        ref = {k: v.double() for k, v in a.result().items()}
        assert rel(dict(b.result().items()), ref)[0] <= 1e-6, t


def test_lm_head_option_refuses_soft_capped_logits():
    """Gemma-2 soft-caps its logits after the head: the fused head cannot reproduce them."""
    model, batches, fwd, opts = hf_tiny.build("gemma2")
    est = fimfast.DiagFisher(model, "hutchinson", forward_fn=fwd, lm_head="lm_head", **opts)
    with pytest.raises(ValueError, match="lm_head"):
        est.step(batches[0])
    assert est.state.steps == 0


@pytest.mark.parametrize("name", ["opt", "mamba", "gemma2", "bloom"])
def test_lm_head_option_is_the_unfused_step_or_refused(name):
    """Whatever a model does after its head (OPT copies the logits with ``.contiguous()``, Gemma-2
    soft-caps them, Mamba casts them), the fused head's estimate is the unfused one or the step
    is refused naming ``lm_head``, nothing kept; OPT's copy is taken."""
    model, batches, fwd, opts = hf_tiny.build(name)
    a = fimfast.DiagFisher(model, "hutchinson", seed=3, forward_fn=fwd, **opts)
    b = fimfast.DiagFisher(model, "hutchinson", seed=3, forward_fn=fwd, lm_head="lm_head", **opts)
    a.step(batches[0])
    try:
        b.step(batches[0])
    except ValueError as e:
        assert "lm_head" in str(e) and name != "opt"
        assert b.state.steps == 0
        return
    ref = {k: v.double() for k, v in a.result().items()}
    assert rel(dict(b.result().items()), ref)[0] <= 1e-6
