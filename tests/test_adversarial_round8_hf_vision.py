"""Hugging Face vision, audio and state-space models built from tiny configs against the float64
oracle (tests/test_adversarial_round8_hf.py has the text models and the helpers): Swin's
relative-position bias table and shifted windows, Swin-v2's continuous position bias MLP and
cosine attention, BEiT's per-layer bias table with layer scale, BiT's weight-standardized
convolutions, the conv feature encoders of Wav2Vec2 (GroupNorm,
a weight_norm positional convolution) and WavLM (gated relative position bias), the Whisper
encoder, Mamba's selective scan, RWKV's time mixing and FNet's Fourier mixing; then HUTCHINSON_SQRT,
_RANKK and _RANK1 with the same draws on a few of them, and HUTCHINSON's mean over many probes.
"""

from __future__ import annotations

import pytest
import torch
from test_adversarial_round8_hf import _NO_BATCH, _NO_RULE, F32_INSIDE, F64, TYPES, check_family

import fimfast

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
hf_tiny = pytest.importorskip("hf_tiny")

_COUPLED = "its output gradients couple the samples"
MODELS = {
    "swin": (F32_INSIDE, {"relative_position_bias_table": _NO_RULE}, ()),
    "swinv2": (F64, {"continuous_position_bias_mlp": _COUPLED, "logit_scale": _NO_BATCH}, ()),
    "beit": (F32_INSIDE, {}, ()),
    "bit": (F64, {"conv2.weight": _NO_RULE}, ()),
    "wav2vec2": (F64, {}, ()),
    "wavlm": (F64, {"attention.q_proj": _NO_RULE, "attention.k_proj": _NO_RULE,
                    "attention.v_proj": _NO_RULE, "attention.out_proj": _NO_RULE,
                    "rel_attn_embed": _NO_BATCH}, ()),
    "whisper": (F64, {}, ()),
    "mamba": (F32_INSIDE, {}, ()),  # at (3, 6) its conv1d weights go generic: exact too
    "rwkv": (F32_INSIDE, {}, ("time_decay",)),
    "fnet": (F64, {}, ()),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_vision_audio_ssm_family_every_diag_type_equals_the_oracle(name):
    check_family(name, MODELS, TYPES)


@pytest.mark.parametrize("name", ["swinv2", "wavlm", "mamba"])
def test_sqrt_and_low_rank_probes_equal_the_oracle(name):
    check_family(name, MODELS, ["hutchinson_sqrt", "hutchinson_rankk", "hutchinson_rank1"]
                 + ["exact"])


@pytest.mark.slow
def test_hutchinson_mean_approaches_exact_on_wav2vec2():
    """400 Rademacher probes: the mean within 0.15 of EXACT (spread about 0.05 here)."""
    from adversarial import jacobian_rows, rows_oracle
    from oracle import rel_error

    model, batches, fwd, _ = hf_tiny.build("wav2vec2")
    ref = rows_oracle(jacobian_rows(model, batches[0], fwd), batches[0][1], "exact", 0, 0)
    est = fimfast.DiagFisher(model, "hutchinson", seed=0, num_probes=400, forward_fn=fwd)
    est.step(batches[0])
    got = {k: v.double() for k, v in est.result().items()}
    assert rel_error(got, ref) < 0.15
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
