"""Hugging Face models through the other entry points and options, against the float64 oracle:
the seed API on dict batches (an encoder-decoder's included) equals the object API bit for bit;
Hugging Face gradient checkpointing (train mode, dropout 0) is exact with non-reentrant segments
and refused, naming ``use_reentrant``, for the per-sample types with reentrant ones; and
``sequence_rows`` sums each sequence's token scores before the square.
"""

from __future__ import annotations

import pytest
import torch
from adversarial import jacobian_rows, rows_oracle
from test_adversarial_round8_hf import F32_INSIDE, rel

import fimfast
from fimfast.ops.torch_ref import probe_logit_grad_torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
hf_tiny = pytest.importorskip("hf_tiny")


@pytest.mark.parametrize("name", ["albert", "t5"])
def test_seed_api_on_dict_batches_equals_the_object_api(name):
    model, batches, _, opts = hf_tiny.build(name)
    ids, y, mask = batches[0][:3]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    if name == "t5":
        batch["decoder_input_ids"] = batches[0][3]
    extra = {"shift_labels": False} if opts else {}
    for t in ("exact", "monte_carlo", "hutchinson"):
        fimfast.zero_diag_fim(model)
        est = fimfast.DiagFisher(model, t, seed=5, **extra)
        for _ in range(2):
            fimfast.diag_fim_step(model, batch, t, fim_opts=dict(seed=5, **extra))
            est.step(batch)
        F, R = fimfast.get_diag_fim(model, t), est.result()
        assert R.meta["count"] == 2 * int((y != -100).sum())
        for n in R:
            assert torch.equal(F[n], R[n]), (t, n)


def test_gradient_checkpointing_non_reentrant_exact_reentrant_refused():
    model, batches, fwd, opts = hf_tiny.build("mistral")
    batch = batches[0]
    rows = jacobian_rows(model, batch, fwd)
    y = batch[1].reshape(-1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # Hugging Face checkpoints in train mode only (dropout 0 here)
    for t in ("exact", "empirical"):
        est = fimfast.DiagFisher(model, t, seed=7, forward_fn=fwd, **opts)
        est.step(batch)
        assert rel(dict(est.result().items()), rows_oracle(rows, y[y != -100], t, 7, 0))[0] \
            <= F32_INSIDE
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    est = fimfast.DiagFisher(model, "exact", forward_fn=fwd, **opts)
    with pytest.raises(fimfast.UnsupportedModelError, match="use_reentrant"):
        est.step(batch)
    assert est.state.steps == 0
    est = fimfast.DiagFisher(model, "hutchinson", seed=7, forward_fn=fwd, **opts)
    est.step(batch)  # one backward of the probe: reentrant segments give it
    ref = rows_oracle(rows, y[y != -100], "hutchinson", 7, 0)
    assert rel(dict(est.result().items()), ref)[0] <= F32_INSIDE


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
def test_sequence_rows_sum_the_tokens_of_a_sequence(fim_type):
    model, batches, fwd, opts = hf_tiny.build("bloom")
    batch = batches[0]
    names, shapes, J, z = jacobian_rows(model, batch, fwd)
    y = batch[1].reshape(-1)
    valid = y != -100
    seq = torch.arange(batch[1].shape[0]).repeat_interleave(batch[1].shape[1])[valid]
    if fim_type == "empirical":
        u = torch.nn.functional.one_hot(y[valid], z.shape[-1]).double() - torch.softmax(z, -1)
    else:
        u = probe_logit_grad_torch(z, "mc", 7, 0, 1)[0]
    g = torch.zeros(int(seq.max()) + 1, J.shape[-1], dtype=J.dtype)
    g.index_add_(0, seq, torch.einsum("rcp,rc->rp", J, u))
    flat = (g**2).sum(0)
    ref = dict(zip(names, (v.reshape(s) for v, s in zip(flat.split([s.numel() for s in shapes]),
                                                          shapes))))
    est = fimfast.DiagFisher(model, fim_type, seed=7, forward_fn=fwd, sequence_rows=True, **opts)
    est.step(batch)
    assert rel(dict(est.result().items()), ref)[0] <= F32_INSIDE
