"""Tiny random Hugging Face models (no download) and their batches for the float64 oracle.

:func:`build` returns ``(model, batches, forward_fn, options)``: a float64 model in eval mode with
dropout 0 and weights drawn at a large initializer range (0.3: attention that is not near uniform,
so the query and key weights have a Fisher well above rounding), batches ``(x, labels, mask, ...)``
and the ``forward_fn`` both the estimator and the oracle (tests/adversarial.py) call. Token-level
models are read with ``class_dim=-1`` and ``shift_labels=False`` (the oracle pairs row ``t`` with
label ``t``; the shift itself is tested in tests/test_hf.py).
"""

from __future__ import annotations

import torch

V, N, T, C = 16, 3, 6, 3
INIT = 0.3
TOKEN = {"class_dim": -1, "shift_labels": False}


def ids_batch(tokens: bool = False, pad: str | None = "right", seed: int = 1, t: int = T,
              n: int = N) -> tuple:
    """``(input_ids, labels, attention_mask)``: row ``i`` has ``i % 3`` padding tokens; labels
    ``(n,)`` classes, or ``(n, t)`` tokens with ``-100`` on the padding (``tokens``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        k = i % 3
        if k and pad == "left":
            mask[i, :k] = 0
        elif k and pad == "right":
            mask[i, t - k:] = 0
    if tokens:
        y = torch.randint(0, V, (n, t), generator=g).masked_fill(mask == 0, -100)
    else:
        y = torch.randint(0, C, (n,), generator=g)
    return ids, y, mask


def image_batch(channels: int, size: int, seed: int = 3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, channels, size, size, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 2, 1])


def audio_batch(samples: int = 40, seed: int = 3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, samples, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1])


def text_fwd(m, b):
    return m(input_ids=b[0], attention_mask=b[2]).logits


def seq2seq_fwd(m, b):
    return m(input_ids=b[0], attention_mask=b[2], decoder_input_ids=b[3]).logits


def image_fwd(m, b):
    return m(pixel_values=b[0]).logits


def audio_fwd(m, b):
    return m(b[0]).logits


def ids_only_fwd(m, b):
    return m(input_ids=b[0]).logits


def make(cls, conf, attn: str = "eager") -> torch.nn.Module:
    """``cls`` built from ``conf`` (seed 0, initializer range :data:`INIT`), float64, eval."""
    for c in (conf, getattr(conf, "vision_config", None), getattr(conf, "text_config", None)):
        if c is not None and hasattr(c, "initializer_range"):
            c.initializer_range = INIT
    if hasattr(conf, "initializer_factor"):
        conf.initializer_factor = INIT * 10
    if hasattr(conf, "init_std"):
        conf.init_std = INIT
    torch.manual_seed(0)
    return cls._from_config(conf, attn_implementation=attn).double().eval()


def _seq2seq_batch() -> tuple:
    ids, _, mask = ids_batch(tokens=True, t=5)
    dec = torch.randint(2, V, (N, 4), generator=torch.Generator().manual_seed(5))
    labels = torch.randint(2, V, (N, 4), generator=torch.Generator().manual_seed(6))
    return ids, labels, mask, dec


def _text(tf, name: str, attn: str):  # noqa: C901 (one branch per family)
    bert = dict(hidden_size=8, num_attention_heads=2, intermediate_size=12, num_hidden_layers=2,
                vocab_size=V, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=C, pad_token_id=0)
    lm = dict(vocab_size=V, pad_token_id=0)
    if name == "albert":  # 4 layers on 2 groups of 2 inner layers; embeddings 4 -> hidden 8
        bert["num_hidden_layers"] = 4
        conf = tf.AlbertConfig(embedding_size=4, num_hidden_groups=2, inner_group_num=2,
                               classifier_dropout_prob=0.0, **bert)
        return make(tf.AlbertForSequenceClassification, conf, attn), [ids_batch()], text_fwd
    if name == "t5":
        conf = tf.T5Config(d_model=8, d_kv=4, d_ff=12, num_layers=2, num_decoder_layers=2,
                           num_heads=2, relative_attention_num_buckets=8,
                           relative_attention_max_distance=16, dropout_rate=0.0,
                           decoder_start_token_id=0, eos_token_id=1, **lm)
        return make(tf.T5ForConditionalGeneration, conf, attn), [_seq2seq_batch()], seq2seq_fwd
    if name == "deberta_v2":
        conf = tf.DebertaV2Config(relative_attention=True, position_buckets=4,
                                  max_relative_positions=8, pos_att_type=["p2c", "c2p"],
                                  position_biased_input=False, pooler_dropout=0.0,
                                  pooler_hidden_size=8, **bert)
        return make(tf.DebertaV2ForSequenceClassification, conf, attn), [ids_batch()], text_fwd
    if name == "funnel":
        conf = tf.FunnelConfig(block_sizes=[1, 1], num_decoder_layers=1, d_model=8, n_head=2,
                               d_head=4, d_inner=12, hidden_dropout=0.0, attention_dropout=0.0,
                               activation_dropout=0.0, num_labels=C, **lm)
        return make(tf.FunnelForSequenceClassification, conf, attn), [ids_batch(t=8)], text_fwd
    if name == "xlnet":
        conf = tf.XLNetConfig(d_model=8, n_layer=2, n_head=2, d_inner=12, dropout=0.0,
                              num_labels=C, summary_last_dropout=0.0, **lm)
        return make(tf.XLNetForSequenceClassification, conf, attn), [ids_batch()], text_fwd
    if name == "convbert":
        conf = tf.ConvBertConfig(embedding_size=8, head_ratio=2, conv_kernel_size=3, **bert)
        return make(tf.ConvBertForSequenceClassification, conf, attn), [ids_batch()], text_fwd
    if name == "mpnet":
        conf = tf.MPNetConfig(**bert)
        return make(tf.MPNetForSequenceClassification, conf, attn), [ids_batch()], text_fwd
    tok = [ids_batch(tokens=True, t=5, n=2)]
    if name == "bloom":
        conf = tf.BloomConfig(hidden_size=8, n_layer=2, n_head=2, hidden_dropout=0.0,
                              attention_dropout=0.0, **lm)
        return make(tf.BloomForCausalLM, conf, attn), tok, text_fwd
    if name == "falcon":  # parallel attention, multi-query, ALiBi
        conf = tf.FalconConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                               hidden_dropout=0.0, attention_dropout=0.0, bias=True,
                               multi_query=True, parallel_attn=True, alibi=True, **lm)
        return make(tf.FalconForCausalLM, conf, attn), tok, text_fwd
    if name == "opt":  # learned positions at an offset, project_in / project_out
        conf = tf.OPTConfig(hidden_size=8, num_hidden_layers=2, ffn_dim=12, num_attention_heads=2,
                            word_embed_proj_dim=6, max_position_embeddings=32, dropout=0.0,
                            attention_dropout=0.0, **lm)
        return make(tf.OPTForCausalLM, conf, attn), tok, text_fwd
    if name == "gptj":  # rotary on 4 of 8 head dimensions, parallel block
        conf = tf.GPTJConfig(n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=32,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                             eos_token_id=0, **lm)
        return make(tf.GPTJForCausalLM, conf, attn), tok, text_fwd
    if name == "phi":  # partial rotary, LayerNorm on queries and keys
        conf = tf.PhiConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                            num_attention_heads=2, partial_rotary_factor=0.5,
                            max_position_embeddings=32, resid_pdrop=0.0, embd_pdrop=0.0,
                            attention_dropout=0.0, qk_layernorm=True, **lm)
        return make(tf.PhiForCausalLM, conf, attn), tok, text_fwd
    if name == "mistral":  # sliding window 2 (sdpa: the eager mask of a padded row is NaN)
        conf = tf.MistralConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, sliding_window=2,
                                max_position_embeddings=32, head_dim=4, **lm)
        return make(tf.MistralForCausalLM, conf, "sdpa"), tok, text_fwd
    if name == "gemma2":  # sqrt(d) embedding scale, 1 + w RMSNorm, soft-capped scores and logits
        conf = tf.Gemma2Config(hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                               max_position_embeddings=32, **lm)
        return make(tf.Gemma2ForCausalLM, conf, attn), tok, text_fwd
    if name == "gptneo":  # a global and a local (window 2) layer
        conf = tf.GPTNeoConfig(hidden_size=8, num_layers=2, num_heads=2, window_size=2,
                               attention_types=[[["global", "local"], 1]],
                               max_position_embeddings=32, resid_dropout=0.0, embed_dropout=0.0,
                               attention_dropout=0.0, **lm)
        return make(tf.GPTNeoForCausalLM, conf, attn), tok, text_fwd
    return None


def _other(tf, name: str, attn: str):
    if name == "swin":  # relative position bias table, shifted windows
        conf = tf.SwinConfig(image_size=8, patch_size=2, num_channels=2, embed_dim=4,
                             depths=[2, 1], num_heads=[1, 2], window_size=2, mlp_ratio=1.0,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             drop_path_rate=0.0, num_labels=C)
        return make(tf.SwinForImageClassification, conf, attn), [image_batch(2, 8)], image_fwd
    if name == "swinv2":  # continuous position bias MLP, cosine attention with a logit scale
        conf = tf.Swinv2Config(image_size=8, patch_size=2, num_channels=2, embed_dim=4,
                               depths=[2, 1], num_heads=[1, 2], window_size=2, mlp_ratio=1.0,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               drop_path_rate=0.0, num_labels=C)
        return make(tf.Swinv2ForImageClassification, conf, attn), [image_batch(2, 8)], image_fwd
    if name == "beit":  # relative position bias per layer, layer scale, mean pooling
        conf = tf.BeitConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=8,
                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             drop_path_rate=0.0, num_labels=C, use_relative_position_bias=True,
                             layer_scale_init_value=0.5, use_mean_pooling=True)
        return make(tf.BeitForImageClassification, conf, attn), [image_batch(2, 8)], image_fwd
    if name == "bit":  # weight-standardized convolutions, GroupNorm
        conf = tf.BitConfig(num_channels=2, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
                            layer_type="preactivation", global_padding="SAME", num_groups=2,
                            num_labels=C, drop_path_rate=0.0)
        return make(tf.BitForImageClassification, conf, attn), [image_batch(2, 16)], image_fwd
    audio = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                 conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3),
                 num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                 layerdrop=0.0, final_dropout=0.0, mask_time_prob=0.0, num_labels=C,
                 classifier_proj_size=4)
    if name == "wav2vec2":  # conv feature encoder with GroupNorm, weight_norm positional conv
        conf = tf.Wav2Vec2Config(feat_extract_norm="group", **audio)
        return make(tf.Wav2Vec2ForSequenceClassification, conf, attn), [audio_batch()], audio_fwd
    if name == "wavlm":  # gated relative position bias
        audio["num_hidden_layers"] = 2
        conf = tf.WavLMConfig(num_buckets=8, max_bucket_distance=16, **audio)
        return make(tf.WavLMForSequenceClassification, conf, attn), [audio_batch()], audio_fwd
    if name == "whisper":
        conf = tf.WhisperConfig(vocab_size=V, num_mel_bins=4, encoder_layers=1,
                                encoder_attention_heads=2, decoder_layers=1,
                                decoder_attention_heads=2, d_model=8, encoder_ffn_dim=12,
                                decoder_ffn_dim=12, max_source_positions=4, dropout=0.0,
                                attention_dropout=0.0, activation_dropout=0.0, num_labels=C,
                                classifier_proj_size=4, pad_token_id=0, bos_token_id=1,
                                eos_token_id=1, decoder_start_token_id=1)
        x = torch.randn(N, 4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        return (make(tf.WhisperForAudioClassification, conf, attn),
                [(x, torch.tensor([0, 2, 1]))], lambda m, b: m(input_features=b[0]).logits)
    tok = [ids_batch(tokens=True, pad=None, t=5, n=2)]
    if name == "mamba":  # selective scan, depthwise causal conv1d
        conf = tf.MambaConfig(vocab_size=V, hidden_size=8, state_size=4, num_hidden_layers=2,
                              expand=2, conv_kernel=3, time_step_rank=2, use_cache=False)
        return make(tf.MambaForCausalLM, conf, attn), tok, ids_only_fwd
    if name == "rwkv":  # time mixing with learned decay, token shift
        conf = tf.RwkvConfig(vocab_size=V, hidden_size=8, num_hidden_layers=2,
                             attention_hidden_size=8, intermediate_size=12, context_length=16,
                             rescale_every=0, use_cache=False)
        return make(tf.RwkvForCausalLM, conf, attn), tok, ids_only_fwd
    if name == "fnet":  # Fourier token mixing
        conf = tf.FNetConfig(vocab_size=V, hidden_size=8, num_hidden_layers=2, intermediate_size=12,
                             max_position_embeddings=32, hidden_dropout_prob=0.0,
                             use_tpu_fourier_optimizations=False, num_labels=C, pad_token_id=0)
        return (make(tf.FNetForSequenceClassification, conf, attn), [ids_batch(pad=None)],
                ids_only_fwd)
    return None


def build(name: str, attn: str = "eager"):
    """``(model, batches, forward_fn, options)`` of the tiny model ``name``."""
    import transformers as tf

    built = _text(tf, name, attn) or _other(tf, name, attn)
    if built is None:
        raise KeyError(name)
    model, batches, fwd = built
    opts = TOKEN if batches[0][1].dim() == 2 else {}
    return model, batches, fwd, dict(opts)
