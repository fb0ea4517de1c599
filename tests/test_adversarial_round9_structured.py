"""The structured Fisher on what the earlier rounds did not use: exact against the float64
oracle or the brute force of its definition, or refused naming the cause.

* KFAC's input factor of a sequence classifier ((N, C) logits) fed a mapping batch with an
  ``attention_mask``: docs/structured.md gives padded positions the weight 0 for every Linear
  whose input is ``(N, T, I)`` with the mask's shape; before, the mask was used for token-level
  ``(N, T, C)`` logits only, so the padded positions entered ``A`` (expand: off by 0.029 of the
  largest entry on a tiny MPNet, reduce: 0.079).
* ``EKFACFIM.to_nngeometry``: the ``PMatEKFAC`` it returned had NNGeometry's ``DummyGenerator``,
  which has no ``get_dtype``, so its ``to_torch()`` raised an ``AttributeError``; now the
  matrix in the model's dtype, equal to ``to_dense()``.
* A vector on another device than the matrix (``meta`` here, which every machine has): before,
  ``kfac`` / ``ekfac`` returned ``meta`` tensors as the product (no values, no error),
  ``block_diag``'s ``solve`` called the matrix singular, the others raised torch's device error
  without naming ``v``; a sparse vector raised torch's missing-kernel errors. Now refused, naming
  ``v`` (or its entry).
* ``to_dense()`` of ``kfac``, ``ekfac`` and ``quasi_diag`` above the dense limit formed every
  layer's ``(O I', O I')`` block before the size check refused (a 300-200-3 MLP: a 29 GB
  allocation failed instead of the limit's message); now refused before any block is formed.
* ``LowRankFIM.frobenius_norm`` formed the ``m x m`` Gram matrix ``L L^T`` of its ``m`` rows
  whatever ``P``: for the 100000 rows ``max_rows`` allows, 80 GB in float64 on a model whose
  ``P x P`` matrix is small; now the Gram matrix of the smaller side.
* A Hugging Face encoder-decoder (T5) fed a mapping batch ``{input_ids, attention_mask, labels}``
  (the decoder inputs made from the labels, as DiagFisher runs it): the structured forward took
  the labels out of the model's inputs (T5 raised "You must specify exactly one of input_ids or
  inputs_embeds") and, with a ``forward_fn``, read the encoder's ``attention_mask`` as the
  decoder logits' mask (encoder and decoder of the same length: 12 rows instead of 15, the
  block-diagonal Fisher off by 0.38 against the oracle). Now as DiagFisher: the decoder's mask.
* A Linear that a branch skips on some batches (its weight unused there): refused, as before, but
  the message said its weights were used functionally; now it names the skipped call, with
  nothing of the batch added.
* ``kfac_approx="reduce"`` with a sample whose positions are all padding (attention mask 0):
  it has no mean input, yet it was counted in ``N`` of ``A = (1/N) sum_n abar_n abar_n^T``
  (Linear, LayerNorm and an embedding's rows alike), so adding such a sample to a batch of 3
  scaled the matrix by 3/4 (off by 0.25), while every other representation is unchanged by it.
  Now only samples with a position of nonzero weight count, as under ``expand``.
* ``KFACFIM.inverse`` of a model with an embedding under ``reduce`` is a ``DenseFIM``, which had
  no ``sample`` (docs/structured.md: the draws of ``F.inverse(prior).sample()``), an
  ``AttributeError``; now ``DenseFIM.sample`` draws ``N(0, F)`` as ``EKFACFIM.sample`` does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from kfac_brute import kfac as brute

import fimfast

C = 3


def _rel(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max())


# -- the attention mask of a sequence classifier ------------------------------------------------- #
class _Pooled(nn.Module):
    """Frozen embedding, a Linear on every position, a masked mean, a head: (N, C) logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.l, self.o = nn.Embedding(9, 4), nn.Linear(4, 5), nn.Linear(5, C)
        self.e.weight.requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.l(self.e(input_ids)))
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.o((h * w).sum(1) / (w.sum(1) + 1))  # finite for a sample without tokens


def _pooled_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, t in ((3, 5), (2, 4)):
        mask = torch.ones(n, t, dtype=torch.long)
        for i in range(n):
            mask[i, t - i:] = 0
        out.append({"input_ids": torch.randint(0, 9, (n, t), generator=g),
                    "attention_mask": mask, "labels": torch.randint(0, C, (n,), generator=g)})
    return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_classifier_mask_weights_the_input_factor(approx):
    model = _Pooled().double()
    data = _pooled_batches()
    got = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum",
                         kfac_approx=approx)
    want = brute(model, data, approx, "exact", "sum",
                 logits=lambda m, b: m(b["input_ids"], b["attention_mask"]),
                 labels=lambda b: b["labels"], weights=lambda b: b["attention_mask"])
    assert _rel(got.to_dense(), want) < 1e-10


def test_sequence_classifier_sample_without_positions_expand():
    """A sample whose positions are all padding adds nothing to ``A`` (``expand``)."""
    model = _Pooled().double()
    data = _pooled_batches()
    data[0]["attention_mask"][1] = 0
    got = fimfast.fisher(model, data, "exact", representation="kfac", reduction="mean")
    want = brute(model, data, "expand", "exact", "mean",
                 logits=lambda m, b: m(b["input_ids"], b["attention_mask"]),
                 labels=lambda b: b["labels"], weights=lambda b: b["attention_mask"])
    assert _rel(got.to_dense(), want) < 1e-10


def test_sequence_classifier_mask_hf_mpnet():
    """The same on a tiny Hugging Face sequence classifier (its Linears trainable)."""
    pytest.importorskip("transformers")
    import hf_tiny

    model, batches, _, _ = hf_tiny.build("mpnet")
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(type(m) is nn.Linear)
    data = [{"input_ids": b[0], "labels": b[1], "attention_mask": b[2]} for b in batches]
    for approx in ("expand", "reduce"):
        got = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum",
                             kfac_approx=approx)
        want = brute(model, data, approx, "exact", "sum",
                     logits=lambda m, b: m(input_ids=b["input_ids"],
                                           attention_mask=b["attention_mask"]).logits,
                     labels=lambda b: b["labels"], weights=lambda b: b["attention_mask"])
        assert _rel(got.to_dense(), want) < 1e-10, approx


# -- NNGeometry ---------------------------------------------------------------------------------- #
def test_ekfac_to_nngeometry_to_torch():
    pytest.importorskip("nngeometry")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4),
                          nn.Tanh(), nn.Linear(4, C, bias=False)).double()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, C, (5,), generator=g))]
    F = fimfast.fisher(model, data, "exact", representation="ekfac", reduction="mean")
    M = F.to_nngeometry(model).to_torch()
    assert M.dtype == torch.float64
    assert _rel(M, F.to_dense()) < 1e-12


# -- vectors ------------------------------------------------------------------------------------- #
def _mlp(d_in: int, hidden: int, N: int):
    """A float64 ``d_in``-``hidden``-``C`` MLP and one batch of ``N`` samples (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, C)).double()
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(N, d_in, generator=g, dtype=torch.float64),
                    torch.randint(0, C, (N,), generator=g))]


@pytest.mark.parametrize("rep", ["dense", "block_diag", "low_rank", "kfac", "ekfac", "quasi_diag"])
def test_vector_on_another_device_or_sparse_is_refused(rep):
    model, data = _mlp(4, 3, 4)
    F = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean")
    P = F.numel()
    meta, v = torch.empty(P, device="meta"), torch.randn(P, dtype=torch.float64)
    parts = F.unflat(v.clone())
    parts["2.bias"] = parts["2.bias"].to("meta")
    for op in ("mv", "vTMv", "solve"):
        with pytest.raises(ValueError, match=r"^v is on device meta; the matrix is on cpu"):
            getattr(F, op)(meta)
        with pytest.raises(ValueError, match=r"^v\['2.bias'\] is on device meta"):
            getattr(F, op)(parts)
        with pytest.raises(ValueError, match=r"^v must be a dense tensor; got layout "
                                             r"torch.sparse_coo"):
            getattr(F, op)(v.to_sparse())
    D = F.to_dense()
    assert _rel(F.mv(v), D @ v) < 1e-12 and F.device == torch.device("cpu")


# -- the dense limit ----------------------------------------------------------------------------- #
@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_to_dense_above_the_limit_refused_before_the_blocks(rep, monkeypatch):
    """With the limit lowered to 50 (P = 99), nothing near a layer's ``72 x 72`` block is
    allocated before the refusal."""
    from largest_alloc import LargestAlloc

    model, data = _mlp(8, 8, 6)
    F = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean")
    monkeypatch.setattr(fimfast.structured.base, "DENSE_LIMIT", 50)
    with LargestAlloc() as m, pytest.raises(ValueError, match=r"needs a dense \(99 x 99\)"):
        F.to_dense()
    assert m.bytes < 50 * 50 * 8, (m.op, m.shape)


def test_low_rank_frobenius_norm_from_the_smaller_gram():
    """120 rows (40 samples, 3 classes) of P = 27: no ``120 x 120`` matrix is formed."""
    from largest_alloc import LargestAlloc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, C)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(40, 4, generator=g, dtype=torch.float64),
             torch.randint(0, C, (40,), generator=g))]
    F = fimfast.fisher(model, data, "exact", representation="low_rank", reduction="sum")
    assert tuple(F.factor.shape) == (120, 27)
    with LargestAlloc() as m:
        got = F.frobenius_norm()
    assert m.bytes < 120 * 120 * 8, (m.op, m.shape)
    assert abs(got - float(F.to_dense().norm())) <= 1e-12 * got


# -- an encoder-decoder's mapping batch ---------------------------------------------------------- #
def test_encoder_decoder_mapping_batch_takes_the_decoder_rows():
    pytest.importorskip("transformers")
    import hf_tiny
    from adversarial import jacobian_rows
    from oracle import core_matrix

    model, batches, _, _ = hf_tiny.build("t5")
    ids, _, mask, _ = batches[0]  # mask: padding at the end of rows 1 and 2
    labels = torch.randint(2, 16, ids.shape, generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for n, p in model.named_parameters():
        p.requires_grad_("decoder.block.1.layer.2" in n)

    def fwd(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 labels=b["labels"]).logits

    _, _, J, z = jacobian_rows(model, (ids, labels), lambda m, b: fwd(m, batch),
                               rows=list(range(labels.numel())))
    want = torch.einsum("rcp,rcd,rdq->pq", J, core_matrix(z, "categorical"), J)
    for kw in ({"forward_fn": fwd}, {}):
        got = fimfast.fisher(model, [batch], "exact", representation="dense", reduction="sum",
                             class_dim=-1, shift_labels=False, **kw)
        assert got.meta["count"] == labels.numel()
        assert _rel(got.to_dense(), want) < 1e-5, kw  # T5 computes in float32 inside


# -- a layer skipped on some batches ------------------------------------------------------------- #
class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.some, self.o = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, C)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(torch.tanh(self.some(h)) if x.shape[0] == 3 else h)


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_a_layer_skipped_on_a_batch_is_refused_naming_the_skip(rep):
    from fimfast.structured import FisherAccumulator

    model = _Branch().double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 4, generator=g, dtype=torch.float64),
             torch.randint(0, C, (n,), generator=g)) for n in (3, 2)]
    acc = FisherAccumulator(model, "monte_carlo", rep, "sum", seed=0)
    acc.update(data[0])
    count, offset = acc.stream.count, acc.stream.offset
    with pytest.raises(ValueError, match=r"module 'some' \(Linear\) .*never called on this "
                                         r"batch, nor is its weight used \(a branch"):
        acc.update(data[1])
    assert (acc.stream.count, acc.stream.offset) == (count, offset)


# -- reduce: a sample that is all padding -------------------------------------------------------- #
class _TokenLN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.ln, self.o = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, C)

    def forward(self, input_ids, attention_mask):
        return self.o(torch.tanh(self.ln(self.e(input_ids))))


def _with_empty_sample():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (4, 4), generator=g)
    mask = torch.ones(4, 4, dtype=torch.long)
    mask[1, 2:] = 0
    mask[3] = 0  # the last sample: all padding
    labels = torch.randint(0, C, (4, 4), generator=g).masked_fill(mask == 0, -100)
    full = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return full, {k: v[:3] for k, v in full.items()}


@pytest.mark.parametrize("frozen", [False, True])
def test_reduce_leaves_out_a_sample_that_is_all_padding(frozen):
    """The embedding, LayerNorm and Linear factors unchanged by the all-padding sample; with the
    embedding and LayerNorm frozen, equal to the brute force on the three other samples."""
    model = _TokenLN().double()
    for p in (*model.e.parameters(), *model.ln.parameters()):
        p.requires_grad_(not frozen)
    full, three = _with_empty_sample()
    kw = dict(representation="kfac", reduction="mean", kfac_approx="reduce", class_dim=-1,
              shift_labels=False)
    got = fimfast.fisher(model, [full], "exact", **kw).to_dense()
    assert _rel(got, fimfast.fisher(model, [three], "exact", **kw).to_dense()) < 1e-12
    if frozen:
        want = brute(model, [three], "reduce", "exact", "mean",
                     logits=lambda m, b: m(b["input_ids"], b["attention_mask"]),
                     labels=lambda b: b["labels"], weights=lambda b: b["attention_mask"])
        assert _rel(got, want) < 1e-10


# -- draws of a dense matrix --------------------------------------------------------------------- #
def test_kfac_reduce_embedding_inverse_draws():
    model = _TokenLN().double()
    full, _ = _with_empty_sample()
    F = fimfast.fisher(model, [full], "exact", representation="kfac", reduction="mean",
                       kfac_approx="reduce", class_dim=-1, shift_labels=False)
    inv = F.inverse(damping=0.5)
    assert isinstance(inv, fimfast.structured.DenseFIM)
    s = inv.sample(20000, generator=torch.Generator().manual_seed(0))
    again = inv.sample(20000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20000, inv.numel()) and torch.equal(s, again)
    D = inv.to_dense()
    se = (D.diagonal().unsqueeze(1) * D.diagonal().unsqueeze(0) + D**2).sqrt() / 20000**0.5
    assert float(((s.T @ s / 20000 - D).abs() / se).max()) < 5  # entrywise, in standard errors
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        inv.sample(0)
