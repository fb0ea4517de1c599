"""``lm_head`` on models that copy the head's output before returning it (OPT's
``self.lm_head(h).contiguous()``, a ``.clone()``): the copy is the head's output, the fused step
equals the unfused one; any transform of the values (a scale, an offset, a clamp however wide, a
soft cap, a shift, a half-precision round trip, a masked fill) is still refused, nothing kept."""

from __future__ import annotations

import pytest
import torch
from tolerances import LM_HEAD_EST_REL

import fimfast

V, D = 300, 12


class CopyLM(torch.nn.Module):
    """Embedding, one tanh layer, a Linear head, then ``post`` on its output."""

    def __init__(self, post):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.mid = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V)
        self.post = post
        self.register_buffer("offset", torch.full((V,), 1e-3))

    def forward(self, ids):
        return self.post(self, self.head(torch.tanh(self.mid(self.emb(ids)))))


def _batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (4, 5), generator=g)
    labels = torch.randint(0, V, (4, 5), generator=g)
    labels[0, :2] = -100
    return ids, labels


def _rel(a, b) -> float:
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b.keys())
    den = sum(float((b[n].double() ** 2).sum()) for n in b.keys())
    return (num / den) ** 0.5


COPIES = {
    "contiguous": lambda m, z: z.contiguous(),
    "clone": lambda m, z: z.clone(),
    "contiguous_view": lambda m, z: z.contiguous().view(z.shape),
    "times_one": lambda m, z: z * 1.0,
}


@pytest.mark.parametrize("name", list(COPIES))
@pytest.mark.parametrize("fim_type", ["hutchinson", "hutchinson_dg"])
def test_copied_logits_take_the_fused_head(name, fim_type):
    torch.manual_seed(0)
    model = CopyLM(COPIES[name])
    plain = fimfast.DiagFisher(model, fim_type, seed=5, class_dim=-1)
    fused = fimfast.DiagFisher(model, fim_type, seed=5, class_dim=-1, lm_head="head")
    for _ in range(2):
        plain.step(_batch())
        fused.step(_batch())
    assert fused.offset == plain.offset
    ref = plain.result()
    assert float(ref["head.weight"].abs().sum()) > 0
    assert _rel(fused.result(), ref) <= LM_HEAD_EST_REL


TRANSFORMS = {
    "scale": lambda m, z: z * 0.5,
    "offset_buffer": lambda m, z: z + m.offset,
    "clamp_narrow": lambda m, z: z.clamp(-30, 30),
    "clamp_wide": lambda m, z: z.clamp(-1e4, 1e4),
    "soft_cap": lambda m, z: 30 * torch.tanh(z / 30),
    "shift": lambda m, z: z - z.max(-1, keepdim=True).values,
    "half_round_trip": lambda m, z: z.half().float(),
    "bfloat16_round_trip": lambda m, z: z.bfloat16().float(),
    "masked_fill": lambda m, z: z.masked_fill(
        torch.arange(z.shape[-1]) == 7, float("-inf")),
    "detached_copy_plus_zero_param": lambda m, z: z.contiguous() + 0 * m.mid.bias.sum(),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transformed_copies_are_refused_and_nothing_is_kept(name):
    torch.manual_seed(0)
    model = CopyLM(TRANSFORMS[name])
    est = fimfast.DiagFisher(model, "hutchinson", seed=5, class_dim=-1, lm_head="head")
    with pytest.raises(ValueError, match="lm_head.*not the head's output"):
        est.step(_batch())
    assert "forward" not in model.head.__dict__
    assert est.offset == 0 and est.state.count == 0


def test_opt_takes_the_fused_head():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, max_position_embeddings=32,
                                 word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))

    def fwd(m, b):
        return m(input_ids=b[0]).logits

    kw = dict(seed=3, class_dim=-1, forward_fn=fwd, shift_labels=True)
    plain = fimfast.DiagFisher(model, "hutchinson", **kw)
    fused = fimfast.DiagFisher(model, "hutchinson", lm_head="lm_head", **kw)
    plain.step((ids, ids))
    fused.step((ids, ids))
    assert _rel(fused.result(), plain.result()) <= LM_HEAD_EST_REL
