"""KFAC with ``kfac_approx="reduce"`` on an nn.Embedding: the input factor kept as sparse rows
``a_bar_n / sqrt(N)`` (fimfast/structured/gram.py, docs/structured.md "KFAC").

* A bag-of-words model (embedding mean-pooled) gives every position of a sample the same output
  gradient, so ``reduce`` is exact on one sample: the float64 oracle's embedding block.
* One token per sample: ``a_bar_n`` is the one-hot itself, so ``reduce`` equals ``expand``.
* ``A`` against the counts by hand; mv, solve, inverse, diag, trace, Frobenius norm and the file
  against the dense matrix; refusals name the argument and give the numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case
from oracle import core_matrix, row_jacobians
from torch import nn

import fimfast
from fimfast.structured import StructuredFIM, gram


class Bag(nn.Module):
    def __init__(self, V=9, D=4, C=3):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


def _case(ids, seed=0):
    case = make_case("encoder", N=ids.shape[0], seed=seed)
    torch.manual_seed(seed)
    case.model = Bag().double()
    y = torch.randint(0, 3, (ids.shape[0],), generator=torch.Generator().manual_seed(seed))
    case.batch = (ids, y)
    return case


def _kfac(case, approx="reduce", data=None):
    return fimfast.fisher(case.model, data or [case.batch], "exact", "kfac", "sum",
                          kfac_approx=approx)


def test_exact_on_one_sample_of_a_bag_of_words():
    case = _case(torch.tensor([[3, 5, 3, 0, 7, 3]]))  # repeats and a padding token
    rj = row_jacobians(case)
    ref = torch.einsum("rcp,rcd,rdq->pq", rj.J, core_matrix(rj.z, case.likelihood), rj.J)
    F = _kfac(case)
    assert F.A[0].is_sparse and F.A[0].shape == (1, 9)
    p = F._pos[0].reshape(-1)
    blk = ref[p][:, p]
    assert float(blk.abs().max()) > 0
    torch.testing.assert_close(F.to_dense()[p][:, p], blk, rtol=1e-10, atol=1e-14)
    E = _kfac(case, "expand")  # expand is not exact here (the repeated token)
    assert float((E.to_dense()[p][:, p] - blk).abs().max()) > 1e-3 * float(blk.abs().max())


def test_one_token_per_sample_equals_expand():
    case = _case(torch.tensor([[3], [5], [3], [0], [8]]))
    R, E = _kfac(case), _kfac(case, "expand")
    torch.testing.assert_close(R.to_dense(), E.to_dense(), rtol=1e-12, atol=1e-15)


def _batches():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 9, (4, 5), generator=g), torch.randint(0, 9, (3, 2), generator=g)]


def test_input_factor_by_hand_and_operations(tmp_path):
    ids = _batches()
    case = _case(ids[0])
    data = [(x, torch.randint(0, 3, (x.shape[0],))) for x in ids]
    F = _kfac(case, data=data)
    abar = []
    for x in ids:
        c = torch.nn.functional.one_hot(x, 9).double().sum(1)
        c[:, 0] = 0
        abar.append(c / x.shape[1])
    abar = torch.cat(abar)
    torch.testing.assert_close(gram.dense_a(F.A[0]), abar.T @ abar / 7, rtol=1e-12, atol=1e-15)
    M = F.to_dense()
    eye = torch.eye(F.numel(), dtype=M.dtype)
    v = torch.randn(F.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(F.mv(v), M @ v)
    torch.testing.assert_close(F.solve(v, 0.1), torch.linalg.solve(M + 0.1 * eye, v))
    torch.testing.assert_close(F.solve(v, 1e-4), torch.linalg.solve(M + 1e-4 * eye, v))
    torch.testing.assert_close(F.inverse(0.1).to_dense() @ (M + 0.1 * eye), eye)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in F.diag().values()]),
                               M.diagonal())
    assert math.isclose(F.trace(), float(M.trace()), rel_tol=1e-10)
    assert math.isclose(F.frobenius_norm(), float(M.norm()), rel_tol=1e-10)
    F.save(tmp_path / "F.safetensors")
    G = StructuredFIM.load(tmp_path / "F.safetensors")
    assert G.A[0].is_sparse
    torch.testing.assert_close(G.to_dense(), M)


def test_refusals(monkeypatch):
    case = _case(_batches()[0])
    with pytest.raises(ValueError, match=r"representation='ekfac' with kfac_approx='reduce' is "
                                         r"not available for module 'emb' \(Embedding\)"):
        fimfast.fisher(case.model, [case.batch], "exact", "ekfac", kfac_approx="reduce")
    F = _kfac(case)
    with pytest.raises(ValueError, match=r"layers \['emb'\] \(nn.Embedding, kfac_approx="):
        F.to_ekfac()
    v = torch.randn(F.numel(), dtype=torch.float64)
    with pytest.raises(ValueError, match="damping must be > 0"):
        F.solve(v, 0.0)
    monkeypatch.setattr(gram, "DENSE_LIMIT", 3)
    F = _kfac(case)  # 4 samples
    F.mv(v)  # no Gram matrix needed
    with pytest.raises(ValueError, match=r"4 x 4 Gram matrix of its 4 samples; the limit is 3"):
        F.solve(v, 0.1)


def test_solve_with_every_layer_kind():
    """Embedding rows next to LayerNorm, attention projections and a Linear: ``solve`` layer by
    layer equals the dense solve of ``to_dense()``."""
    from test_structured_layers import _stack_case

    case = _stack_case(N=3, T=4).to(torch.float64)
    F = fimfast.fisher(case.model, [case.batch], "exact", "kfac", "mean", kfac_approx="reduce")
    assert [a.is_sparse for a in F.A] == [True] + [False] * (len(F.A) - 1)
    M = F.to_dense()
    v = torch.randn(F.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eye = torch.eye(F.numel(), dtype=M.dtype)
    torch.testing.assert_close(F.solve(v, 1e-2), torch.linalg.solve(M + 1e-2 * eye, v))
    torch.testing.assert_close(F.mv(v), M @ v)


def test_padding_mask_weights_the_rows():
    """Masked positions (attention mask 0) are left out of ``a_bar_n``: counts over the valid
    positions divided by their number."""
    case = make_case("token_lm").to(torch.float64)
    model = case.model
    model.out = nn.Linear(8, 9, bias=False).double()  # untie the head
    b = case.batch
    F = fimfast.fisher(model, [b], "exact", "kfac", "sum", kfac_approx="reduce")
    ids, mask = b["input_ids"], b["attention_mask"].double()
    assert float(mask.min()) == 0
    abar = torch.einsum("nt,ntv->nv", mask, nn.functional.one_hot(ids, 9).double())
    abar = abar / mask.sum(1, keepdim=True)
    N = ids.shape[0]
    torch.testing.assert_close(gram.dense_a(F.A[0]), abar.T @ abar / N, rtol=1e-12, atol=1e-15)
