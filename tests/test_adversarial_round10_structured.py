"""The structured Fisher on the blocks of today's transformers and of parameter-efficient
fine-tuning, written by hand in plain PyTorch, against the float64 references (the exact dense
Fisher from every valid row's Jacobian, tests/kfac_brute.py for KFAC and EKFAC).

* A layer called once more with its output detached (or under ``torch.no_grad()``) while its
  weight also reaches the logits through a functional use (``F.linear(x, A.weight, A.bias)``):
  the uses reaching the logits (1 functional) equalled the calls (2), so the check of tied and
  functional uses passed; the quasi-diagonal was off by 0.18 of the largest entry and KFAC and
  EKFAC took the detached call's inputs and the zero gradient of its output (the functional
  use's gradient left out); under ``torch.no_grad()`` the quasi-diagonal was off the same and
  ``kfac``/``ekfac`` raised torch's "One of the differentiated Tensors does not require grad".
  Now refused, naming the module, with nothing added; the dense family stays exact.
* A bias also used outside its module (``h + m.bias``): only the weight's uses were counted
  (the quasi-diagonal off by 0.64 of its largest entry); now refused, naming the module.
* A reentrant checkpoint segment: refused naming ``use_reentrant=True`` (before, as a tied or
  functional use the model does not have).
* Hooks mode (a scripted submodule, ``nn.DataParallel``): the capture's forward hook now runs
  before the user's (a hook doubling a Linear's output made the quasi-diagonal off by 0.33) and
  reads an input passed by keyword (an ``IndexError`` before); a scripted submodule no longer
  makes every representation raise a ``TypeError`` in the walk of the modules.
* ``nn.Embedding(sparse=True)``: the dense family raised torch's reshape error; now exact.
* Found clean: decoder blocks (rotary tables, grouped-query attention, QK-norm, SDPA with causal,
  boolean and float masks, SwiGLU, parallel attention and MLP, layer scale, last-token and
  token-level logits) and a LoRA encoder with an adapter applied twice, every representation
  against the references, ``expand`` and ``reduce``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adversarial import jacobian_rows
from kfac_brute import dense_exact
from kfac_brute import kfac as brute
from oracle import core_matrix

import fimfast
from fimfast.structured import FisherAccumulator

C = 3


def _close(got, want, tol=1e-10):
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert scale > 0 and err <= tol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


def _tokens(N, T, seed, V=11, token_labels=False):
    """``input_ids``, ``attention_mask`` (right padding on the last samples) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, T), generator=g)
    am = torch.ones(N, T, dtype=torch.long)
    am[-1, -2:] = 0
    if N > 2:
        am[1, -1:] = 0
    if token_labels:
        lab = torch.randint(0, C, (N, T), generator=g)
        lab[am == 0] = -100
    else:
        lab = torch.randint(0, C, (N,), generator=g)
    return {"input_ids": ids, "attention_mask": am, "labels": lab}


def _logits(m, b):
    return m(b["input_ids"], b["attention_mask"])


def dense_oracle(model, data, reduction="mean"):
    """``sum_r J_r^T (diag p - p p^T) J_r`` over the valid rows (float64), ``/R`` for mean."""
    out, R = 0, 0
    for b in data:
        rows = (b["labels"].reshape(-1) != -100).nonzero().squeeze(-1).tolist()
        _, _, J, z = jacobian_rows(model, (b, None), lambda m, bb: _logits(m, bb[0]), rows=rows)
        out = out + torch.einsum("rcp,rcd,rdq->pq", J, core_matrix(z.double(), "categorical"), J)
        R += len(rows)
    return out / R if reduction == "mean" else out


# -- a detached (or no-grad) call next to a functional use of the same weight --------------- #
class _DetachedCall(nn.Module):
    """``A`` called once with its output detached (a stop-gradient target) or under
    ``torch.no_grad()``; its weight also used by ``F.linear`` on the path to the logits."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6).requires_grad_(False)
        self.A, self.head, self.how = nn.Linear(6, 6), nn.Linear(6, C), how

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        if self.how == "detach":
            t = self.A(h).detach()
        else:
            with torch.no_grad():
                t = self.A(h)
        h2 = torch.tanh(F.linear(h, self.A.weight, self.A.bias)) + 0.5 * t
        return self.head(h2.mean(1))


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_detached_call_next_to_a_functional_use_refused(how, rep):
    model = _DetachedCall(how).double()
    data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
    acc = FisherAccumulator(model, "monte_carlo", rep, "mean", seed=0)
    with pytest.raises(ValueError, match=r"module 'A' .*does not reach the logits"):
        acc.update(data[0])
    assert acc.stream.count == 0 and acc.stream.offset == 0 and all(s.empty for s in acc.sums)
    with pytest.raises(ValueError, match=r"module 'A'"):
        fimfast.fisher(model, data, "exact", representation=rep, reduction="mean")


class _DetachedOnly(nn.Module):
    """``A`` called twice, one output detached; no other use of its weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6).requires_grad_(False)
        self.A, self.head = nn.Linear(6, 6), nn.Linear(6, C)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        return self.head(torch.tanh(self.A(h) + 0.5 * self.A(h.flip(1)).detach()).mean(1))


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
def test_detached_call_alone_refused_with_its_cause(rep):
    """Before: refused as a tied or functional use ("reaches the logits through 1 uses but the
    module was called 2 time(s)"), which the model does not have."""
    with pytest.raises(ValueError, match=r"a call of module 'A' .*does not reach the logits"):
        fimfast.fisher(_DetachedOnly().double(), [_tokens(3, 4, 0)], "exact",
                       representation=rep)


@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_detached_call_dense_family_exact(how):
    model = _DetachedCall(how).double()
    data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
    want = dense_oracle(model, data)
    for rep in ("dense", "block_diag", "low_rank"):
        got = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean")
        full = got.to_dense().double()
        if rep == "block_diag":  # the head's and A's blocks
            n = model.A.weight.numel() + model.A.bias.numel()
            want_b = torch.zeros_like(want)
            want_b[:n, :n], want_b[n:, n:] = want[:n, :n], want[n:, n:]
            _close(full, want_b)
        else:
            _close(full, want)


# -- a bias also used outside its module ----------------------------------------------------- #
class _BiasOut(nn.Module):
    """A Linear's bias also added to the activations (``"hidden"``), or the head's bias added to
    the logits once more (``"head"``)."""

    def __init__(self, where):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6).requires_grad_(False)
        self.l, self.head, self.where = nn.Linear(6, 6), nn.Linear(6, C), where

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.l(self.emb(input_ids)))
        if self.where == "hidden":
            return self.head((h + self.l.bias).mean(1))
        return self.head(h.mean(1)) + 0.5 * self.head.bias


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
@pytest.mark.parametrize("where", ["hidden", "head"])
def test_bias_used_outside_its_module_refused(where, rep):
    """Before: only the weight's uses were counted; the factors took the bias's gradient at the
    module's output alone (the quasi-diagonal off by 0.64 / 0.56 of its largest entry, KFAC and
    EKFAC likewise missing the other use). Now refused naming the module, nothing added; the
    dense family exact."""
    model = _BiasOut(where).double()
    module = "l" if where == "hidden" else "head"
    acc = FisherAccumulator(model, "monte_carlo", rep, "mean", seed=0)
    with pytest.raises(ValueError, match=rf"the bias of module '{module}' reaches the logits "
                                         r"through 2 uses"):
        acc.update(_tokens(3, 4, 0))
    assert acc.stream.count == 0 and acc.stream.offset == 0 and all(s.empty for s in acc.sums)
    if rep == "kfac":
        data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
        got = fimfast.fisher(model, data, "exact", representation="dense", reduction="mean")
        _close(got.to_dense().double(), dense_oracle(model, data))


# -- a reentrant checkpoint segment ------------------------------------------------------------ #
class _Reentrant(nn.Module):
    """A SwiGLU block under ``torch.utils.checkpoint(..., use_reentrant=True)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.up, self.down, self.head = nn.Linear(6, 8, bias=False), nn.Linear(4, 6), \
            nn.Linear(6, C)

    def _block(self, h):
        g, u = self.up(h).chunk(2, -1)
        return h + self.down(F.silu(g) * u)

    def forward(self, input_ids, attention_mask):
        h = torch.utils.checkpoint.checkpoint(self._block, self.emb(input_ids), use_reentrant=True)
        return self.head(h.mean(1))


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag"])
def test_reentrant_checkpoint_refused_naming_it(rep):
    """Before: refused as a tied or functional use of ``up`` ("reaches the logits through 0
    uses"), which the model does not have."""
    model = _Reentrant().double()
    acc = FisherAccumulator(model, "exact", rep, "mean")
    with pytest.raises(ValueError, match="use_reentrant=True"):
        acc.update(_tokens(3, 4, 0))
    assert acc.stream.count == 0 and all(s.empty for s in acc.sums)


# -- hooks mode: a scripted submodule, nn.DataParallel, a user's hook replacing an output ---- #
class _Hooked(nn.Module):
    """A Linear whose output a forward hook of the user's doubles (as hook-based adapters and
    steering do); ``scripted``: the activation a ``torch.jit.script`` module, which makes the
    capture take forward hooks instead of instance forwards; ``plain``: the same function with
    the doubling written in the forward (no hook)."""

    def __init__(self, scripted=False, plain=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6).requires_grad_(False)
        self.l, self.head, self.plain = nn.Linear(6, 6), nn.Linear(6, C), plain
        self.act = torch.jit.script(nn.Tanh()) if scripted else nn.Tanh()
        if not plain:
            self.l.register_forward_hook(lambda m, i, o: o * 2.0)

    def forward(self, input_ids, attention_mask):
        h = self.l(self.emb(input_ids))
        return self.head(self.act(h * 2.0 if self.plain else h).mean(1))


def _quasi_against(got, want):
    """The quasi-diagonal: the exact diagonal, and the exact entries where it has any."""
    _close(got.diagonal(), want.diagonal())
    _close(got, want * (got != 0))


HOOKED = {"scripted submodule": lambda: _Hooked(scripted=True),
          "DataParallel": lambda: nn.DataParallel(_Hooked())}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", list(HOOKED))
def test_hook_mode_takes_the_output_before_the_users_hook(name):
    """Before: in hooks mode the capture's hook ran after the user's and tapped the doubled
    output, so every output gradient was halved (the quasi-diagonal off by 0.33 of the largest
    entry); a scripted submodule first made every representation, ``dense`` and ``diag``
    included, raise a ``TypeError`` from the walk of the modules (a ScriptModule's parameter
    table has no ``__iter__``). Now the quasi-diagonal is exact and KFAC and EKFAC equal those
    of the model written plainly (float64 brute force)."""
    model = HOOKED[name]().double()
    data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
    want = dense_oracle(model, data)
    _close(fimfast.fisher(model, data, "exact", representation="dense",
                          reduction="mean").to_dense().double(), want)
    _quasi_against(fimfast.fisher(model, data, "exact", representation="quasi_diag",
                                  reduction="mean").to_dense().double(), want)
    diag = fimfast.fisher(model, data, "exact", representation="diag", reduction="mean")
    _close(torch.cat([t.reshape(-1) for t in diag.values()]).double(), want.diagonal())
    plain = _Hooked(plain=True).double()
    plain.load_state_dict((model.module if name == "DataParallel" else model).state_dict())
    kw = {"logits": _logits, "labels": lambda b: b["labels"],
          "weights": lambda b: b["attention_mask"]}
    for rep in ("kfac", "ekfac"):
        got = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean")
        basis = None if rep == "kfac" else [(ua, ug) for ua, ug in zip(got.UA, got.UG)]
        _close(got.to_dense().double(),
               brute(plain, data, "expand", "exact", "mean", basis=basis, **kw))


class _Keyword(nn.Module):
    """A Linear called with its input by keyword (``l(input=h)``)."""

    def __init__(self, scripted):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6).requires_grad_(False)
        self.l, self.head = nn.Linear(6, 6), nn.Linear(6, C)
        self.act = torch.jit.script(nn.Tanh()) if scripted else nn.Tanh()

    def forward(self, input_ids, attention_mask):
        return self.head(self.act(self.l(input=self.emb(input_ids))).mean(1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hook_mode_input_by_keyword():
    """Before: in hooks mode (a scripted submodule) the capture's hook read ``inputs[0]`` of an
    empty tuple, an ``IndexError`` in kfac, ekfac and quasi_diag. Now the same matrices as with
    instance forwards, the quasi-diagonal exact."""
    data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
    hooked, plain = _Keyword(True).double(), _Keyword(False).double()
    want = dense_oracle(plain, data)
    for rep in ("quasi_diag", "kfac", "ekfac"):
        got = fimfast.fisher(hooked, data, "exact", representation=rep, reduction="mean")
        ref = fimfast.fisher(plain, data, "exact", representation=rep, reduction="mean")
        _close(got.to_dense(), ref.to_dense(), 1e-12)
        if rep == "quasi_diag":
            _quasi_against(got.to_dense().double(), want)


# -- nn.Embedding(sparse=True) in the dense family -------------------------------------------- #
class _Sparse(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6, sparse=True, padding_idx=0)
        self.l, self.head = nn.Linear(6, 6), nn.Linear(6, C)

    def forward(self, input_ids, attention_mask):
        return self.head(torch.tanh(self.l(self.emb(input_ids))).mean(1))


@pytest.mark.parametrize("chunk", [None, 1])
def test_sparse_embedding_gradients_in_the_dense_family(chunk):
    """Before: ``dense``, ``block_diag`` and ``low_rank`` raised torch's "reshape is not
    implemented for sparse tensors" (the lookup's gradient is a sparse tensor). Now exact; the
    Kronecker family was already."""
    model = _Sparse().double()
    data = [_tokens(3, 4, 0), _tokens(2, 5, 1)]
    want = dense_oracle(model, data)
    n = model.emb.weight.numel()
    blocks = torch.zeros_like(want)
    blocks[:n, :n] = want[:n, :n]
    blocks[n:n + 42, n:n + 42] = want[n:n + 42, n:n + 42]
    blocks[n + 42:, n + 42:] = want[n + 42:, n + 42:]
    for rep, ref in (("dense", want), ("low_rank", want), ("block_diag", blocks)):
        got = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean",
                             pair_chunk=chunk)
        _close(got.to_dense().double(), ref)


# -- found clean: the blocks of today's decoders and fine-tuning against the references ------- #
def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)


class _Decoder(nn.Module):
    """Embedding, RMSNorm (frozen), a fused qkv Linear split three ways, grouped-query attention
    (k/v heads by ``repeat_interleave`` or ``expand`` + ``reshape``), QK-norm, rotary tables
    (buffers, ``rotate_half``), ``F.scaled_dot_product_attention`` (``is_causal``, a boolean or
    a float mask), a SwiGLU MLP (one Linear to 2 ff chunked), optionally parallel attention and
    MLP with a layer scale; logits of the last non-pad token (gathered by index) or of every
    token."""

    def __init__(self, gqa="repeat", mask="causal", parallel=False, tokens=False):
        super().__init__()
        torch.manual_seed(0)
        D, self.H, self.KV, self.hd = 8, 2, 1, 4
        self.emb = nn.Embedding(11, D)
        self.g1, self.g2, self.gq = (nn.Parameter(torch.ones(d), requires_grad=False)
                                     for d in (D, D, self.hd))
        self.qkv = nn.Linear(D, (self.H + 2 * self.KV) * self.hd, bias=False)
        self.o, self.up = nn.Linear(D, D, bias=False), nn.Linear(D, 12, bias=False)
        self.down, self.head = nn.Linear(6, D, bias=False), nn.Linear(D, C)
        f = torch.outer(torch.arange(8.0), 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4))
        self.register_buffer("cos", torch.cat([f, f], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([f, f], -1).sin(), persistent=False)
        self.ls = nn.Parameter(torch.full((D,), 0.5), requires_grad=False)
        self.gqa, self.mask, self.parallel, self.tokens = gqa, mask, parallel, tokens

    def _rms(self, x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def _heads(self, t, n):
        N, T, _ = t.shape
        return t.view(N, T, n, self.hd).transpose(1, 2)

    def _attn(self, h, am):
        N, T, D = h.shape
        q, k, v = self.qkv(h).split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], -1)
        q, k, v = self._heads(q, self.H), self._heads(k, self.KV), self._heads(v, self.KV)
        cos, sin = self.cos[:T].to(h.dtype), self.sin[:T].to(h.dtype)
        q, k = (self._rms(t, self.gq) for t in (q, k))
        q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
        r = self.H // self.KV
        if self.gqa == "repeat":
            k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        else:
            k, v = (t[:, :, None].expand(N, self.KV, r, T, self.hd).reshape(N, self.H, T, self.hd)
                    for t in (k, v))
        allowed = (am[:, None, None, :] > 0) & torch.ones(T, T, dtype=torch.bool).tril()
        if self.mask == "causal":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mask == "bool":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            m = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, -1e9)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return self.o(a.transpose(1, 2).reshape(N, T, D))

    def _mlp(self, h):
        g, u = self.up(h).chunk(2, -1)
        return self.down(F.silu(g) * u)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        a = self._attn(self._rms(h, self.g1), attention_mask) * self.ls
        if self.parallel:
            h = h + a + self._mlp(self._rms(h, self.g1))
        else:
            h = h + a
            h = h + self._mlp(self._rms(h, self.g2))
        if self.tokens:
            return self.head(h)
        return self.head(h[torch.arange(h.shape[0]), attention_mask.sum(1) - 1])


class _LoraEncoder(nn.Module):
    """Frozen base projections with trainable LoRA ``A``, ``B`` Linears on q and v, a frozen
    key, a trainable LayerNorm, a bottleneck adapter and a masked-mean classifier; the shared
    adapter applied twice (ALBERT-like)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6).requires_grad_(False)
        self.q, self.k, self.v = (nn.Linear(6, 6).requires_grad_(False) for _ in range(3))
        self.qa, self.qb, self.va, self.vb = (nn.Linear(*s, bias=False)
                                              for s in ((6, 2), (2, 6), (6, 2), (2, 6)))
        self.ln, self.down, self.upp = nn.LayerNorm(6), nn.Linear(6, 3), nn.Linear(3, 6)
        self.head = nn.Linear(6, C)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        q = self.q(h) + 2.0 * self.qb(self.qa(h))
        v = self.v(h) + 2.0 * self.vb(self.va(h))
        s = (q @ self.k(h).transpose(1, 2) / 6 ** 0.5).masked_fill(
            attention_mask[:, None, :] == 0, -1e9)
        h = self.ln(h + torch.softmax(s, -1) @ v)
        for _ in range(2):
            h = h + self.upp(F.gelu(self.down(h)))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


CLEAN = {
    "decoder": lambda: _Decoder(),
    "decoder expand-gqa bool-mask": lambda: _Decoder(gqa="expand", mask="bool"),
    "decoder float-mask parallel": lambda: _Decoder(mask="float", parallel=True),
    "decoder token logits": lambda: _Decoder(tokens=True),
    "lora encoder": _LoraEncoder,
}


def _blocks_of(model, D):
    """``D`` restricted to the module blocks (names up to the last dot)."""
    out, o, mods = torch.zeros_like(D), 0, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            mods.setdefault(n.rpartition(".")[0], []).append(torch.arange(o, o + p.numel()))
            o += p.numel()
    for idx in mods.values():
        i = torch.cat(idx)
        out[i[:, None], i[None]] = D[i[:, None], i[None]]
    return out


def _linear_index(model):
    """Flat indices of the Linear layers' parameters (what tests/kfac_brute.py covers)."""
    o, offs = 0, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            offs[n], o = torch.arange(o, o + p.numel()), o + p.numel()
    return torch.cat([offs[k] for n, m in model.named_modules() if isinstance(m, nn.Linear)
                      for k in (f"{n}.weight", f"{n}.bias") if k in offs])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(CLEAN))
def test_transformer_and_peft_blocks_against_the_references(name, approx):
    """Two batches of different lengths and padding, ``reduction="mean"``: the dense family and
    the quasi-diagonal against the exact dense Fisher, KFAC and EKFAC (embedding left out of
    EKFAC under ``reduce``, where it is refused) against the float64 brute force."""
    model = CLEAN[name]().double()
    tok = name.endswith("token logits")
    data = [_tokens(3, 4, 0, token_labels=tok), _tokens(2, 5, 1, token_labels=tok)]
    want = dense_oracle(model, data)
    if approx == "expand":
        for rep, ref in (("dense", want), ("low_rank", want),
                         ("block_diag", _blocks_of(model, want))):
            got = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean")
            _close(got.to_dense().double(), ref)
        _quasi_against(fimfast.fisher(model, data, "exact", representation="quasi_diag",
                                      reduction="mean").to_dense().double(), want)
    if approx == "reduce":
        model.emb.requires_grad_(False)
    idx = _linear_index(model)
    kw = {"logits": _logits, "labels": lambda b: b["labels"],
          "weights": lambda b: b["attention_mask"]}
    for rep in ("kfac", "ekfac"):
        got = fimfast.fisher(model, data, "exact", representation=rep, reduction="mean",
                             kfac_approx=approx)
        basis = None
        if rep == "ekfac":
            by = {info["name"]: (ua, ug) for info, ua, ug in zip(got.layers, got.UA, got.UG)}
            basis = [by[n] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and m.weight.requires_grad]
        ref = brute(model, data, approx, "exact", "mean", basis=basis, **kw)
        _close(got.to_dense().double()[idx[:, None], idx[None]], ref[idx[:, None], idx[None]])


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
def test_bias_check_on_a_root_layer_and_root_attention(rep):
    """The bias of a model that is itself the layer (``<root>``) is found too; KFAC of a root
    ``nn.Linear`` on one sample is its exact Fisher."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    got = fimfast.fisher(lin, [(x, torch.tensor([1]))], "exact", representation=rep)
    want = dense_exact(lin, [x])
    if rep == "kfac":
        _close(got.to_dense().double(), want)
    else:
        _quasi_against(got.to_dense().double(), want)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    batch = (torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 4, (3, 5)))
    F = fimfast.fisher(mha, [batch], "exact", representation=rep,
                       forward_fn=lambda m, b: m(b[0], b[0], b[0], need_weights=False)[0])
    assert float(F.trace()) > 0
