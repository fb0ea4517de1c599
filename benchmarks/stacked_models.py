"""Models whose experts are stacked 3-D parameters called by ``F.linear`` on a slice, for tests
and benchmarks.

* :func:`mixtral`: a tiny Hugging Face Mixtral (``MixtralConfig``: width 32, 2 layers, 4
  experts, top-2), as a token LM (:class:`HFLogits` of ``MixtralForCausalLM``: ``(N, T, V)``
  logits) or a sequence classifier (``MixtralForSequenceClassification``: ``(N, C)``).
* :class:`StackedMoE`: the same pattern written out (``MixtralExperts.forward``): a router on
  a bare parameter, top-``k`` experts (``k > 1``: the gates renormalised), each expert
  ``F.linear(x[idx], W[e], b[e])`` on the tokens routed to it (``W`` ``(E, O, I)``, an
  optional bias ``b`` ``(E, O)``), the outputs times their gate weights added back by
  ``index_add_``; ``mlp=True``: SwiGLU experts as
  Mixtral's (a stacked ``gate_up`` ``(E, 2H, d)`` chunked in two, ``down`` ``(E, d, H)``).
* :class:`StackedClassifier`: embedding, a :class:`StackedMoE` block, mean pool, linear head.
"""

from __future__ import annotations

import torch
from torch import nn

F = nn.functional


class HFLogits(nn.Module):
    """``model(ids).logits`` of a Hugging Face model (an attention mask of ones)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def mixtral(kind: str = "lm", V: int = 16, C: int = 3, layers: int = 2, E: int = 4, k: int = 2,
            seed: int = 0) -> nn.Module:
    """A tiny Mixtral (width 32, 4 heads, 2 key/value heads, intermediate 48), eager attention,
    experts ``experts_implementation="eager"`` (the loop of ``MixtralExperts.forward``),
    as :class:`HFLogits` of the causal LM (``kind="lm"``) or of the sequence classifier
    (``kind="cls"``, ``C`` labels, pad token 0)."""
    from transformers import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification

    cfg = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=E, num_experts_per_tok=k, max_position_embeddings=64,
                        num_labels=C, pad_token_id=0, tie_word_embeddings=False,
                        experts_implementation="eager")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = MixtralForCausalLM if kind == "lm" else MixtralForSequenceClassification
    return HFLogits(cls(cfg).eval())


class StackedMoE(nn.Module):
    """See the module docstring; ``force``: an expert every token goes to (``None``: the
    router's choice), ``twice``: each expert's slice called twice on its rows (summed)."""

    def __init__(self, d: int = 8, h: int = 12, E: int = 3, k: int = 1, bias: bool = False,
                 mlp: bool = False):
        super().__init__()
        self.router = nn.Parameter(torch.randn(E, d) / d**0.5)
        self.E, self.k, self.mlp = E, k, mlp
        if mlp:
            self.gate_up = nn.Parameter(torch.randn(E, 2 * h, d) / d**0.5)
            self.down = nn.Parameter(torch.randn(E, d, h) / h**0.5)
        else:
            self.w = nn.Parameter(torch.randn(E, d, d) / d**0.5)
        self.b = nn.Parameter(torch.randn(E, d) * 0.1) if bias else None
        self.force: int | None = None
        self.twice = False

    def expert(self, x, e):
        b = None if self.b is None else self.b[e]
        if not self.mlp:
            y = F.linear(x, self.w[e], b)
            return y + F.linear(x, self.w[e], b) if self.twice else y
        gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e], b)

    def forward(self, h):
        shape = h.shape
        f = h.reshape(-1, shape[-1])
        probs = F.linear(f, self.router).softmax(-1)
        top, choice = probs.topk(self.k, dim=-1)
        if self.force is not None:
            choice = torch.full_like(choice, self.force)
        if self.k > 1:  # Mixtral's renormalised gates (top-1: Switch's probability)
            top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(f)
        with torch.no_grad():
            mask = F.one_hot(choice, self.E).permute(2, 1, 0)
            hit = (mask.sum((-1, -2)) > 0).nonzero()
        for e in hit:
            e = e[0]
            pos, idx = torch.where(mask[e])
            y = self.expert(f[idx], e) * top[idx, pos, None]
            out.index_add_(0, idx, y)
        return out.reshape(shape)


class StackedClassifier(nn.Module):
    """Embedding (vocabulary ``V``, width ``d``), a :class:`StackedMoE`, mean pool, linear head
    of ``C`` classes; ``lm=True``: a head per token instead (``(N, T, C)`` logits)."""

    def __init__(self, V: int = 11, d: int = 8, C: int = 3, lm: bool = False, **moe):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.moe = StackedMoE(d, **moe)
        self.head = nn.Linear(d, C)
        self.lm = lm

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.moe(h)
        return self.head(h if self.lm else h.mean(1))
