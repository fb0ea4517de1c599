"""KFAC, EKFAC and quasi-diagonal for nn.Embedding, nn.LayerNorm and nn.MultiheadAttention.

* One sample, one token: every linear-kind layer (Embedding, the attention projections, Linear)
  sees a single input vector, so KFAC is its true Fisher block, and so is a LayerNorm's
  ``G o A`` (float64 oracle).
* Any batch: EKFAC's refitted ``D`` is the diagonal of the true block in the Kronecker eigenbasis,
  and quasi-diagonal is the true diagonal plus weight-bias cross entries (float64 oracle, layer
  layouts rebuilt from the module tree here, independently of the library).
* nn.MultiheadAttention equals curvlinops' ``KFACLinearOperator`` on the same attention written
  with four nn.Linear projections.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case
from oracle import core_matrix, row_jacobians
from torch import nn

import fimfast
from fimfast.structured import StructuredFIM

F64 = 1e-10


def _oracle(case) -> torch.Tensor:
    rj = row_jacobians(case)
    return torch.einsum("rcp,rcd,rdq->pq", rj.J, core_matrix(rj.z, case.likelihood), rj.J)


def _close(a, b, rel=F64):
    err = float((a - b).abs().max())
    assert err <= rel * max(float(b.abs().max()), 1e-30), (err, float(b.abs().max()))


def _layouts(model: nn.Module, F: StructuredFIM):
    """``(kind, (O, I') positions)`` of every layer in module order, from the module tree."""
    def sl(name):
        s = F.slice_of(name)
        return torch.arange(s.start, s.stop)

    out, skip = [], set()
    for mname, m in model.named_modules():
        p = f"{mname}." if mname else ""
        if id(m) in skip:
            continue
        if isinstance(m, nn.Embedding):
            out.append(("embedding", sl(p + "weight").reshape(m.num_embeddings, -1).T))
        elif isinstance(m, nn.LayerNorm):
            cols = [sl(p + "weight")] + ([sl(p + "bias")] if m.bias is not None else [])
            out.append(("layernorm", torch.stack(cols, 1)))
        elif isinstance(m, nn.MultiheadAttention):
            E = m.embed_dim
            for r, w in enumerate(("q", "k", "v")):
                if m._qkv_same_embed_dim:
                    pos = sl(p + "in_proj_weight").reshape(3 * E, -1)[r * E:(r + 1) * E]
                else:
                    pos = sl(f"{p}{w}_proj_weight").reshape(E, -1)
                b = sl(p + "in_proj_bias")[r * E:(r + 1) * E]
                out.append(("linear", torch.cat([pos, b.unsqueeze(1)], 1)))
            o = m.out_proj
            out.append(("linear", torch.cat([sl(p + "out_proj.weight").reshape(E, -1),
                                             sl(p + "out_proj.bias").unsqueeze(1)], 1)))
            skip.add(id(o))
        elif isinstance(m, nn.Linear):
            pos = sl(p + "weight").reshape(m.out_features, -1)
            if m.bias is not None:
                pos = torch.cat([pos, sl(p + "bias").unsqueeze(1)], 1)
            out.append(("linear", pos))
    return out


class Stack(nn.Module):
    """Embedding, LayerNorm, self-attention (or cross-attention with kdim != embed_dim) and a
    Linear head on the mean over positions."""

    def __init__(self, cross: bool = False):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.side = nn.Linear(4, 3) if cross else None
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, kdim=3 if cross else None,
                                          vdim=3 if cross else None)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        x = self.norm(self.emb(ids))
        kv = torch.tanh(self.side(x)) if self.side is not None else x
        a, _ = self.attn(x, kv, kv, need_weights=False)
        return self.head(torch.tanh(x + a).mean(1))


def _stack_case(cross=False, N=3, T=4, seed=0):
    case = make_case("encoder", N=N, seed=seed)
    torch.manual_seed(seed)
    case.model = Stack(cross).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 7, (N, T), generator=g)
    ids[0, -1] = 0  # a padding token
    case.batch = (ids, case.batch[1][:N])
    return case


def _fisher(case, rep, **kw):
    c = case.to(torch.float64)
    return fimfast.fisher(c.model, [c.batch], "exact", representation=rep, reduction="sum", **kw)


@pytest.mark.parametrize("case_name", ["encoder", "stack", "cross"])
def test_kfac_exact_on_one_sample_one_token(case_name):
    """``sum_k (a a^T) (x) (g_k g_k^T) = (a a^T) (x) G`` for a single input vector."""
    if case_name == "encoder":
        case = make_case("encoder", N=1)
        case.batch = (case.batch[0][:, :1], case.batch[1])
    else:
        case = _stack_case(case_name == "cross", N=1, T=1, seed=3)
        case.batch = (torch.tensor([[5]]), case.batch[1])
    ref = _oracle(case)
    P = ref.shape[0]
    mask = torch.zeros(P, P, dtype=torch.bool)
    for _, pos in _layouts(case.model, _fisher(case, "kfac")):
        r = pos.reshape(-1)
        mask[r.unsqueeze(1), r.unsqueeze(0)] = True
    assert float((ref * mask).abs().sum()) > 0.2 * float(ref.abs().sum())
    for rep in ("kfac", "ekfac"):
        _close(_fisher(case, rep).to_dense(), ref * mask, 1e-9)


@pytest.mark.parametrize("case_name", ["encoder", "stack", "cross"])
def test_ekfac_refit_is_the_diagonal_in_its_basis(case_name):
    case = make_case("encoder") if case_name == "encoder" else _stack_case(case_name == "cross")
    ref = _oracle(case)
    E = _fisher(case, "ekfac")
    lays = _layouts(case.model, E)
    assert len(lays) == len(E.D)
    for (kind, pos), ua, ug, d in zip(lays, E.UA, E.UG, E.D):
        if kind == "layernorm":  # the eigenbasis of the whole (D I', D I') block
            p = pos.reshape(-1)
            want = (ua.T @ ref[p][:, p] @ ua).diagonal().reshape(d.shape)
        else:
            ua = torch.eye(pos.shape[1], dtype=d.dtype) if ua is None else ua
            K = torch.kron(ug.contiguous(), ua.contiguous())
            p = pos.reshape(-1)
            want = (K.T @ ref[p][:, p] @ K).diagonal().reshape(d.shape)
        assert float(d.abs().max()) > 0
        _close(d, want)


@pytest.mark.parametrize("case_name", ["encoder", "stack"])
def test_quasi_diag_oracle(case_name):
    case = make_case("encoder") if case_name == "encoder" else _stack_case()
    ref = _oracle(case)
    Q = _fisher(case, "quasi_diag")
    P = Q.numel()
    mask = torch.eye(P, dtype=torch.bool)
    for kind, pos in _layouts(case.model, Q):
        if kind != "embedding" and pos.shape[1] > 1:
            w, b = pos[:, :-1], pos[:, -1:].expand_as(pos[:, :-1])
            mask[w.reshape(-1), b.reshape(-1)] = True
            mask[b.reshape(-1), w.reshape(-1)] = True
    _close(Q.to_dense(), ref * mask)


def test_embedding_factors_by_hand():
    """``A``: token frequencies over the positions (padding id at 0), ``G``: output gradients
    of every (sample, column) pair; LayerNorm ``A``: mean of ``vec(a) vec(a)^T`` with ``a`` the
    ``(D, 2)`` matrix of rows ``(x_hat_d, 1)``."""
    case = _stack_case().to(torch.float64)
    ids = case.batch[0]
    F = _fisher(case, "kfac")
    counts = torch.bincount(ids.reshape(-1), minlength=7).double()
    counts[0] = 0
    torch.testing.assert_close(F.A[0], counts / ids.numel(), rtol=1e-12, atol=1e-14)
    emb = case.model.emb(ids)
    xh = nn.functional.layer_norm(emb, (4,)).reshape(-1, 4)
    a = torch.stack([xh, torch.ones_like(xh)], -1).reshape(-1, 8)  # (NT, D * 2)
    torch.testing.assert_close(F.A[1], a.T @ a / ids.numel(), rtol=1e-12, atol=1e-14)
    assert F.G[1].shape == (4, 4) and F.G[0].shape == (4, 4)


def test_layernorm_factors_against_the_oracle():
    """With ``kfac_approx="reduce"`` a LayerNorm's ``G = sum_q (sum_t g_t)(sum_t g_t)^T`` is the
    true ``(beta, beta)`` block on any batch, and ``A`` the mean over samples of ``vec(a_bar)
    vec(a_bar)^T`` (``a_bar``: the sample's mean ``(x_hat_d, 1)`` rows); the KFAC block is
    ``G[d, e] A[(d, i), (e, j)]``."""
    case = _stack_case(N=3, T=4).to(torch.float64)
    case.model.emb.weight.requires_grad_(False)
    ref = _oracle(case)
    F = _fisher(case, "kfac", kfac_approx="reduce")
    assert F.layers[0]["name"] == "norm"
    pos = torch.stack([torch.arange(F.slice_of(n).start, F.slice_of(n).stop)
                       for n in ("norm.weight", "norm.bias")], 1)
    torch.testing.assert_close(F.G[0], ref[pos[:, 1]][:, pos[:, 1]], rtol=1e-10, atol=1e-14)
    xh = nn.functional.layer_norm(case.model.emb(case.batch[0]), (4,))
    abar = torch.stack([xh, torch.ones_like(xh)], -1).mean(1).reshape(3, 8)
    torch.testing.assert_close(F.A[0], abar.T @ abar / 3, rtol=1e-12, atol=1e-14)
    p = pos.reshape(-1)
    want = torch.kron(F.G[0], torch.ones(2, 2, dtype=torch.float64)) * F.A[0]
    torch.testing.assert_close(F.to_dense()[p][:, p], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_input_factor_with_position_weights(bias):
    """``sum_t w_t vec(a_t) vec(a_t)^T`` with 0/1 position weights (padding left out)."""
    from types import SimpleNamespace

    from fimfast.structured import sums

    g = torch.Generator().manual_seed(0)
    xh = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    w = (torch.rand(3, 5, generator=g) > 0.3).double()
    s = sums.LayerSums()
    sums.add_inputs(SimpleNamespace(kind="layernorm", In=1 + bias), s, xh, w, "expand",
                    torch.float64)
    a = torch.stack([xh, torch.ones_like(xh)], -1) if bias else xh.unsqueeze(-1)
    a = a.reshape(15, -1)
    torch.testing.assert_close(s.A, (a * w.reshape(-1, 1)).T @ a, rtol=1e-12, atol=1e-14)
    assert s.npos == float(w.sum())


def test_operations_and_files(tmp_path):
    case = _stack_case()
    for rep in ("kfac", "ekfac", "quasi_diag"):
        F = _fisher(case, rep)
        M = F.to_dense()
        v = torch.randn(F.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(F.mv(v), M @ v)
        torch.testing.assert_close(F.solve(v, 0.1), torch.linalg.solve(
            M + 0.1 * torch.eye(F.numel(), dtype=M.dtype), v))
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in F.diag().values()]),
                                   M.diagonal())
        assert math.isclose(F.trace(), float(M.trace()), rel_tol=1e-10)
        assert math.isclose(F.frobenius_norm(), float(M.norm()), rel_tol=1e-10)
        if rep != "quasi_diag":
            torch.testing.assert_close(F.inverse(0.1).to_dense() @ (M + 0.1 * torch.eye(
                F.numel(), dtype=M.dtype)), torch.eye(F.numel(), dtype=M.dtype))
        F.save(tmp_path / f"{rep}.safetensors")
        torch.testing.assert_close(StructuredFIM.load(tmp_path / f"{rep}.safetensors")
                                   .to_dense(), M)


def test_padding_mask_weights_the_embedding_factor():
    """Padded positions (attention mask 0) are left out of the embedding's token counts."""
    case = make_case("token_lm").to(torch.float64)
    model = case.model
    model.out = nn.Linear(8, 9, bias=False).double()  # untie the head
    b = case.batch
    F = fimfast.fisher(model, [b], "exact", representation="kfac", reduction="sum")
    ids, mask = b["input_ids"], b["attention_mask"]
    counts = torch.zeros(9, dtype=torch.float64).index_add_(0, ids[mask != 0],
                                                            torch.ones(int(mask.sum()),
                                                                       dtype=torch.float64))
    torch.testing.assert_close(F.A[0], counts / mask.sum(), rtol=1e-12, atol=1e-14)


# -- curvlinops ---------------------------------------------------------------------------------- #
class LinearAttention(nn.Module):
    """The self-attention of ``nn.MultiheadAttention`` with four ``nn.Linear`` projections."""

    def __init__(self, E=4, H=2, C=3):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.head = nn.Linear(E, C)
        self.H = H

    def forward(self, x):
        N, L, E = x.shape
        H, hd = self.H, E // self.H

        def heads(t):
            return t.reshape(N, L, H, hd).transpose(1, 2)

        att = torch.softmax(heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2)
                            / math.sqrt(hd), -1)
        ctx = (att @ heads(self.v(x))).transpose(1, 2).reshape(N, L, E)
        return self.head(torch.tanh(x + self.o(ctx)).mean(1))


class MHAModel(nn.Module):
    def __init__(self, E=4, H=2, C=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(x + a).mean(1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_attention_matches_curvlinops(approx):
    pytest.importorskip("curvlinops")
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    ours, peer = MHAModel().double().eval(), LinearAttention().double()
    E = 4
    with torch.no_grad():
        W, b = ours.attn.in_proj_weight, ours.attn.in_proj_bias
        for r, lin in enumerate((peer.q, peer.k, peer.v)):
            lin.weight.copy_(W[r * E:(r + 1) * E])
            lin.bias.copy_(b[r * E:(r + 1) * E])
        peer.o.load_state_dict(ours.attn.out_proj.state_dict())
        peer.head.load_state_dict(ours.head.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 5, E, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    torch.testing.assert_close(ours(data[0][0]), peer(data[0][0]))
    K = KFACLinearOperator(peer, nn.CrossEntropyLoss(reduction="sum"), list(peer.parameters()),
                           data, fisher_type="type-2", kfac_approx=approx,
                           separate_weight_and_bias=False, check_deterministic=False)
    P = sum(p.numel() for p in peer.parameters())
    ref = K @ torch.eye(P, dtype=torch.float64)
    F = fimfast.fisher(ours, data, "exact", representation="kfac", reduction="sum",
                       kfac_approx=approx)
    # peer order: q.w q.b k.w k.b v.w v.b o.w o.b head.w head.b -> ours
    s = {n: F.slice_of(n) for n in F.names}
    w0, b0 = s["attn.in_proj_weight"].start, s["attn.in_proj_bias"].start
    idx = []
    for r in range(3):
        idx += list(range(w0 + r * E * E, w0 + (r + 1) * E * E)) + list(range(b0 + r * E,
                                                                           b0 + (r + 1) * E))
    for n in ("attn.out_proj.weight", "attn.out_proj.bias", "head.weight", "head.bias"):
        idx += list(range(s[n].start, s[n].stop))
    idx = torch.tensor(idx)
    torch.testing.assert_close(F.to_dense()[idx][:, idx], ref, rtol=1e-10, atol=1e-12)


# -- errors -------------------------------------------------------------------------------------- #
def test_ekfac_reduce_refused_for_an_embedding():
    case = _stack_case()
    with pytest.raises(ValueError, match=r"kfac_approx='reduce'.*'emb' \(Embedding\)"):
        fimfast.fisher(case.model, [case.batch], representation="ekfac", kfac_approx="reduce")


def test_attention_with_bias_kv_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True)

        def forward(self, x):
            return self.attn(x, x, x)[0].mean(1)

    x = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match=r"module 'attn' \(MultiheadAttention\).*add_bias_kv"):
        fimfast.fisher(M(), [x], representation="kfac")


def test_attention_dropout_in_training_refused():
    model = MHAModel()
    model.attn.dropout = 0.1
    model.train()
    x = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match=r"'attn.q'.*never called.*model.eval\(\)"):
        fimfast.fisher(model, [(x, torch.tensor([0, 1, 2]))], representation="kfac")


def test_layernorm_frozen_bias_refused():
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    model[1].bias.requires_grad_(False)
    x = (torch.randn(4, 5), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"module '1' \(LayerNorm\) has a frozen weight or bias"):
        fimfast.fisher(model, [x], representation="kfac")


def test_layernorm_without_bias_and_frozen_attention_input_projection():
    """LayerNorm(bias=False) has one input per feature; a frozen in_proj leaves the attention
    with its out_proj alone (float64 EKFAC identity on the layers that remain)."""
    case = _stack_case()
    case.model.norm = nn.LayerNorm(4, bias=False)
    case.model.attn.in_proj_weight.requires_grad_(False)
    case.model.attn.in_proj_bias.requires_grad_(False)
    F = _fisher(case, "kfac")
    assert [i["name"] for i in F.layers] == ["emb", "norm", "attn.out_proj", "head"]
    assert F.A[1].shape == (4, 4) and F.G[1].shape == (4, 4)
    ref = _oracle(case)
    Q = _fisher(case, "quasi_diag")
    _close(Q.to_dense().diagonal(), ref.diagonal())


def test_nngeometry_refuses_the_new_layers():
    pytest.importorskip("nngeometry")
    case = make_case("encoder")
    F = fimfast.fisher(case.model, [case.batch], representation="kfac")
    with pytest.raises(ValueError, match=r"layer 'emb' \(embedding\) has no NNGeometry"):
        F.to_nngeometry(case.model)


def test_blocked_gram_factors(monkeypatch):
    """Factors wider than the blocked-Gram threshold (upper block rows summed in place over
    batches, mirrored when read) equal the plain products: ``A`` against the inputs by hand,
    ``G`` against the unblocked path."""
    from fimfast.structured import sums

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(700, 650), nn.Tanh(), nn.Linear(650, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 700, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    F = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum")
    x = torch.cat([torch.cat([b[0], torch.ones(4, 1, dtype=torch.float64)], 1) for b in data])
    torch.testing.assert_close(F.A[0], x.T @ x / 8, rtol=1e-12, atol=1e-13)
    assert torch.equal(F.A[0], F.A[0].T) and torch.equal(F.G[0], F.G[0].T)
    monkeypatch.setattr(sums, "_BLOCKED", 10**9)
    P = fimfast.fisher(model, data, "exact", representation="kfac", reduction="sum")
    for a, b in zip(F.A + F.G, P.A + P.G):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


class _InPlace(nn.Module):
    """Linear -> ReLU(inplace) -> Linear whose output is scaled in place, then a head; with
    ``inplace=False`` the same function without in-place operations."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.l1, self.l2, self.head = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        h = self.l2(self.act(self.l1(x)))
        h = h.mul_(2.0) if self.inplace else h * 2.0
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_layer_outputs_modified_in_place(rep):
    """The gradients at the layer outputs are taken before later in-place operations on those
    outputs (ReLU(inplace=True), ``mul_``): the same Fisher as the model without them (float64;
    EXACT, so KFAC's G is a sum over the output-side columns, no sampling)."""
    torch.manual_seed(0)
    a, b = _InPlace(True).double(), _InPlace(False).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 5, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (7,)))]
    Fa, Fb = (fimfast.fisher(m, data, "exact", representation=rep) for m in (a, b))
    v = torch.randn(Fa.numel(), dtype=torch.float64)
    torch.testing.assert_close(Fa.mv(v), Fb.mv(v), rtol=1e-12, atol=1e-14)
    assert Fb.mv(v).abs().max() > 1e-3
