"""Adversarial checks, eighth round: graph, set and sequence models written by hand, against the
float64 oracle (tests/adversarial_arch8.py: every diagonal type, ``dense`` and ``block_diag``,
relative error below 1e-10 per parameter tensor, the oracle nonzero).

Graphs: a GCN aggregating with ``index_add``, ``scatter_add``, ``torch.sparse.mm`` or a dense
block-diagonal adjacency, a GIN with a learned epsilon, a GAT (``scatter_reduce`` max, softmax over
the edges), a GraphSAGE with ``scatter_reduce`` max, an attention over a sparse adjacency; graphs of
several sizes batched as one node list with a segment-mean readout (``index_add``), one graph per
sample (``forward_fn``). Sets: DeepSets with masked padding (sum, max, mean), a Set Transformer
(``key_padding_mask``, a learned seed as the pooling query), a PointNet (``Conv1d`` k=1, max over
points). Sequences: a selective scan (softplus, exp, ``cumsum`` / ``cumprod`` / a loop,
``einsum`` over time), a log-space scan (``logcumsumexp``), an FFT long convolution with a complex
kernel from real parameters, a TCN (causal dilated ``Conv1d``, left ``F.pad``, both
``weight_norm`` forms), attention pooling with a learned query, Perceiver cross-attention
(``kdim``/``vdim`` not ``embed_dim``, a latent array as the query), hypernetworks (``bmm`` and
``einsum`` on per-sample weights), a top-2 mixture of experts (``torch.where`` or index routing),
capsule routing by agreement.

The layer rules take a model (``generic=()``) except where named: node-level layers (their rows
are nodes of several samples: no dimension is the batch) and parameters read outside a module call
take the generic path, exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adversarial_arch8 import DT, PER_SAMPLE, RANDOM, batches, check
from cases import Fn
from torch.nn.utils import parametrizations as PZ

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")


# -- graphs: one graph per sample, batched as one node list ---------------------------------- #
def _graphs(seed: int, N: int = 3, F_: int = 3, C: int = 4) -> tuple:
    g = torch.Generator().manual_seed(seed)
    xs, src, dst, gid, off = [], [], [], [], 0
    for i in range(N):
        n = int(torch.randint(2, 5, (1,), generator=g))
        xs.append(torch.randn(n, F_, generator=g, dtype=DT))
        for a in range(n):
            for b in range(n):
                if a != b and torch.rand(1, generator=g) < 0.7:
                    src.append(off + a)
                    dst.append(off + b)
        gid += [i] * n
        off += n
    batch = {"x": torch.cat(xs), "edge_index": torch.tensor([src, dst]),
             "batch": torch.tensor(gid), "num_graphs": N}
    return batch, torch.randint(0, C, (N,), generator=g)


def _fwd(model, batch):
    return model(batch[0])


def _seg_mean(h, b):
    gid, N = b["batch"], b["num_graphs"]
    s = h.new_zeros(N, h.shape[1]).index_add(0, gid, h)
    return s / h.new_zeros(N).index_add(0, gid, torch.ones_like(gid, dtype=h.dtype))[:, None]


def _loops(b):
    (src, dst), M = b["edge_index"], b["x"].shape[0]
    return torch.cat([src, torch.arange(M)]), torch.cat([dst, torch.arange(M)])


def _prop(h, b, agg):
    src, dst = _loops(b)
    M = h.shape[0]
    deg = h.new_zeros(M).index_add(0, dst, torch.ones_like(dst, dtype=h.dtype))
    w = (deg[src] * deg[dst]).rsqrt()
    if agg == "index_add":
        return h.new_zeros(h.shape).index_add(0, dst, h[src] * w[:, None])
    if agg == "scatter_add":
        return h.new_zeros(h.shape).scatter_add(0, dst[:, None].expand(-1, h.shape[1]),
                                                h[src] * w[:, None])
    if agg == "sparse.mm":
        return torch.sparse.mm(torch.sparse_coo_tensor(torch.stack([dst, src]), w, (M, M)), h)
    return h.new_zeros(M, M).index_put((dst, src), w, accumulate=True) @ h


def _gcn(agg):
    def fwd(s, b):
        h = torch.relu(_prop(s.l1(b["x"]), b, agg))
        return s.o(_seg_mean(torch.tanh(_prop(s.l2(h), b, agg)), b))
    return fwd


def _gin(s, b):
    x, (src, dst) = b["x"], b["edge_index"]
    h = torch.tanh(s.mlp((1 + s.eps) * x + torch.zeros_like(x).index_add(0, dst, x[src])))
    return s.o(h.new_zeros(b["num_graphs"], h.shape[1]).index_add(0, b["batch"], h))


def _gat(s, b):
    src, dst = _loops(b)
    M, H = b["x"].shape[0], 2
    h = s.W(b["x"]).view(M, H, -1)
    e = F.leaky_relu((h * s.a_src).sum(-1)[src] + (h * s.a_dst).sum(-1)[dst], 0.2)
    emax = torch.full((M, H), -1e30, dtype=e.dtype).scatter_reduce(
        0, dst[:, None].expand(-1, H), e, "amax")
    w = torch.exp(e - emax[dst])
    alpha = w / torch.zeros(M, H, dtype=e.dtype).index_add(0, dst, w)[dst]
    out = torch.zeros_like(h).index_add(0, dst, alpha[..., None] * h[src])
    return s.o(_seg_mean(F.elu(out.reshape(M, -1)), b))


def _sage(s, b):
    x, (src, dst) = b["x"], b["edge_index"]
    hn = s.n(x)
    agg = torch.zeros(x.shape[0], hn.shape[1], dtype=x.dtype).scatter_reduce(
        0, dst[:, None].expand(-1, hn.shape[1]), hn[src], "amax", include_self=False)
    return s.o(_seg_mean(torch.tanh(s.l(x) + agg), b))


def _sparse_attention(s, b):
    src, dst = _loops(b)
    M = b["x"].shape[0]
    hn = s.n(b["x"])
    A = torch.sparse_coo_tensor(torch.stack([dst, src]),
                                torch.tanh((hn[src] * hn[dst]) @ s.att).exp(), (M, M))
    agg = torch.sparse.mm(A, hn) / torch.sparse.sum(A, 1).to_dense()[:, None]
    return s.o(_seg_mean(torch.tanh(s.l(b["x"]) + agg), b))


def _lin(a, b):
    return lambda: nn.Linear(a, b)


def _par(*shape):
    return lambda: nn.Parameter(torch.randn(*shape) * 0.5)


GCN = {"l1": _lin(3, 4), "l2": _lin(4, 4), "o": _lin(4, 4)}
GRAPHS = {  # name: (forward, modules, parameters on the generic path)
    **{f"GCN, {agg}": (_gcn(agg), GCN, ("l1.weight", "l1.bias", "l2.weight", "l2.bias"))
       for agg in ("index_add", "scatter_add", "sparse.mm", "dense adjacency")},
    "GIN, learned epsilon": (_gin, {"eps": lambda: nn.Parameter(torch.tensor(0.1)),
                                    "mlp": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(),
                                                                 nn.Linear(4, 4)),
                                    "o": _lin(4, 4)}, None),
    "GAT, two heads": (_gat, {"W": lambda: nn.Linear(3, 8, bias=False), "a_src": _par(2, 4),
                              "a_dst": _par(2, 4), "o": _lin(8, 4)}, None),
    "GraphSAGE, max aggregation": (_sage, {"l": _lin(3, 4), "n": _lin(3, 4), "o": _lin(4, 4)},
                                   None),
    "attention over a sparse adjacency": (_sparse_attention, {
        "l": _lin(3, 4), "n": _lin(3, 4), "att": _par(4), "o": _lin(4, 4)}, None),
}


def _make(fwd, mods):
    def make():
        torch.manual_seed(0)
        return Fn(fwd, **{k: v() for k, v in mods.items()}).to(DT).eval()
    return make


def _rotate(i):
    return PER_SAMPLE + (RANDOM[i % 5], RANDOM[(i + 2) % 5])


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_models_one_graph_per_sample_exact(name):
    fwd, mods, generic = GRAPHS[name]
    check(_make(fwd, mods), [_graphs(1), _graphs(2)], _rotate(list(GRAPHS).index(name)),
          logits_fn=_fwd, generic=generic)


# -- sets and sequences ---------------------------------------------------------------------- #
def _deepsets(pool):
    def fwd(s, x):
        mask = x[..., 0] > -0.8  # padding: first feature below -0.8
        h = s.phi(x)
        if pool == "max":
            p = h.masked_fill(~mask[..., None], float("-inf")).amax(1)
        else:
            p = (h * mask[..., None]).sum(1)
            p = p / mask.sum(1, keepdim=True).clamp_min(1) if pool == "mean" else p
        return s.rho(p)
    return fwd


def _set_transformer(s, x):
    pad = x[..., 0] < -0.8
    pad[:, 0] = False
    h = s.inp(x)
    h = s.ln(h + s.sab(h, h, h, key_padding_mask=pad, need_weights=False)[0])
    q = s.seed.expand(x.shape[0], -1, -1)
    return s.o(s.pma(q, h, h, key_padding_mask=pad, need_weights=False)[0][:, 0])


def _pointnet(s, x):
    return s.o(s.mlp(x.transpose(1, 2)).max(2)[0])


def _bn1d(c):
    b = nn.BatchNorm1d(c)
    with torch.no_grad():
        b.running_mean.uniform_(-0.3, 0.3)
        b.running_var.uniform_(0.5, 1.5)
    return b


def _scan(kind):
    def fwd(s, x):
        u = F.silu(s.inp(x))
        dt = F.softplus(s.dt(u))
        dA = dt[..., None] * -torch.exp(s.A_log)  # (N, T, E, S)
        Bx = torch.einsum("nts,nte->ntes", s.B(u), dt * u)
        if kind == "cumsum":
            cs = torch.cumsum(dA, 1)
            T = x.shape[1]
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, :, :, None, None]
            W = torch.exp(cs[:, :, None] - cs[:, None]).masked_fill(~causal, 0)
            h = torch.einsum("ntkes,nkes->ntes", W, Bx)
        elif kind == "cumprod":
            P = torch.cumprod(torch.exp(dA), 1)
            h = P * torch.cumsum(Bx / P, 1)
        else:
            hs, h = [], torch.zeros_like(Bx[:, 0])
            for t in range(x.shape[1]):
                h = torch.exp(dA[:, t]) * h + Bx[:, t]
                hs.append(h)
            h = torch.stack(hs, 1)
        return s.o((torch.einsum("ntes,nts->nte", h, s.Cp(u)) + s.D * u).mean(1))
    return fwd


SCAN = {"inp": _lin(3, 4), "dt": _lin(4, 4), "B": lambda: nn.Linear(4, 3, bias=False),
        "Cp": lambda: nn.Linear(4, 3, bias=False), "o": _lin(4, 4),
        "A_log": lambda: nn.Parameter(torch.log(torch.arange(1.0, 4.0)).repeat(4, 1)),
        "D": lambda: nn.Parameter(torch.ones(4))}


def _heinsen(s, x):
    a_star = torch.cumsum(-F.softplus(s.a(x)), 1)
    return s.o(torch.exp(a_star + torch.logcumsumexp(s.b(x) - a_star, 1))[:, -1])


def _fft_conv(s, x):
    u = s.inp(x).transpose(1, 2)
    L = u.shape[-1]
    A = torch.complex(s.A_re, s.A_im)
    dA = s.log_dt.exp()[:, None] * A
    K = (2 * (torch.view_as_complex(s.Cc) * (torch.exp(dA) - 1) / A)[..., None]
         * torch.exp(dA[..., None] * torch.arange(L))).sum(1).real
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)
    return s.o(F.gelu(y[..., :L]).mean(-1))


def _tcn(s, x):
    x = x.transpose(1, 2)
    h = torch.tanh(s.c1(F.pad(x, (1, 0))))
    h = torch.tanh(s.c2(F.pad(h, (2, 0))))
    return s.o(torch.tanh(h + s.down(x))[:, :, -1])


def _tcn_mods(wn):
    def conv(i, o, d):
        return lambda: wn(nn.Conv1d(i, o, 2, dilation=d))
    return {"c1": conv(3, 4, 1), "c2": conv(4, 4, 2), "down": lambda: nn.Conv1d(3, 4, 1),
            "o": _lin(4, 4)}


def _attn_pool(s, x):
    h = torch.tanh(s.e(x))
    return s.o((torch.softmax(h @ s.q / 2.0, 1)[..., None] * h).sum(1))


def _perceiver(s, x):
    q = s.lat.unsqueeze(0).expand(x.shape[0], -1, -1)
    return s.o(s.ca(q, x, torch.tanh(s.v(x)), need_weights=False)[0].mean(1))


def _hyper(kind):
    def fwd(s, x):
        c = torch.tanh(s.cond(x))
        W = s.hyper(c).view(-1, 4, 3)
        if kind == "bmm":
            h = torch.bmm(W, x.unsqueeze(-1)).squeeze(-1) + s.hb(c)
        else:
            h = torch.einsum("nhd,nd->nh", W, x) - s.hb(c)
        return s.o(torch.tanh(h))
    return fwd


def _moe(style):
    def fwd(s, x):
        top, idx = torch.softmax(s.gate(x), -1).topk(2, -1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, ex in enumerate(s.ex):
            w = torch.where(idx == e, top, torch.zeros_like(top)).sum(-1, keepdim=True)
            if style == "where":
                out = out + torch.where(w > 0, w * ex(x), torch.zeros_like(x))
            else:
                rows = (idx == e).any(-1).nonzero().squeeze(-1)
                out = out.index_add(0, rows, w[rows] * ex(x[rows]))
        return s.o(torch.tanh(out))
    return fwd


def _squash(v):
    n2 = (v * v).sum(-1, keepdim=True)
    return n2 / (1 + n2) * v / torch.sqrt(n2 + 1e-9)


def _capsules(s, x):
    uhat = torch.einsum("iodk,nik->niod", s.W, _squash(s.prim(x).view(-1, 4, 3)))
    b = torch.zeros(uhat.shape[:3], dtype=x.dtype)
    for r in range(3):
        v = _squash((torch.softmax(b, 2)[..., None] * uhat).sum(1))
        b = b + (uhat * v[:, None]).sum(-1) if r < 2 else b
    return s.scale * v.norm(dim=-1)


SEQ = (5, 3)
MODELS = {  # name: (forward, modules, input shape, parameters on the generic path)
    **{f"DeepSets, masked {p}": (_deepsets(p), {
        "phi": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)),
        "rho": lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))}, SEQ, ())
       for p in ("sum", "max", "mean")},
    "Set Transformer": (_set_transformer, {
        "inp": _lin(3, 4), "sab": lambda: nn.MultiheadAttention(4, 2, batch_first=True),
        "ln": lambda: nn.LayerNorm(4), "seed": _par(1, 1, 4),
        "pma": lambda: nn.MultiheadAttention(4, 2, batch_first=True), "o": _lin(4, 4)}, SEQ, ()),
    "PointNet": (_pointnet, {"mlp": lambda: nn.Sequential(
        nn.Conv1d(3, 4, 1), _bn1d(4), nn.ReLU(), nn.Conv1d(4, 5, 1)), "o": _lin(5, 4)},
        (6, 3), ()),
    **{f"selective scan, {k}": (_scan(k), SCAN, SEQ, ()) for k in ("cumsum", "cumprod", "loop")},
    "log-space scan": (_heinsen, {"a": _lin(3, 4), "b": _lin(3, 4), "o": _lin(4, 4)}, SEQ, ()),
    "FFT long convolution": (_fft_conv, {
        "inp": _lin(3, 3), "log_dt": lambda: nn.Parameter(torch.randn(3) * .1 - 1),
        "A_re": lambda: nn.Parameter(-0.5 * torch.ones(3, 2)), "A_im": _par(3, 2),
        "Cc": _par(3, 2, 2), "o": _lin(3, 4)}, SEQ, ("log_dt", "A_re", "A_im", "Cc")),
    "TCN, weight_norm": (_tcn, _tcn_mods(nn.utils.weight_norm), SEQ, None),
    "TCN, parametrizations.weight_norm": (_tcn, _tcn_mods(PZ.weight_norm), SEQ, None),
    "attention pooling, learned query": (_attn_pool, {"e": _lin(3, 4), "q": _par(4),
                                                      "o": _lin(4, 4)}, SEQ, ("q",)),
    "Perceiver cross-attention": (_perceiver, {
        "lat": _par(2, 4), "v": _lin(3, 5), "o": _lin(4, 4),
        "ca": lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)}, SEQ, ()),
    **{f"hypernetwork, {k}": (_hyper(k), {"cond": _lin(3, 2), "hyper": _lin(2, 12),
                                          "hb": _lin(2, 4), "o": _lin(4, 4)}, (3,), None)
       for k in ("bmm", "einsum")},
    **{f"top-2 mixture of experts, {k}": (_moe(k), {
        "gate": _lin(4, 3), "ex": lambda: nn.ModuleList(nn.Linear(4, 4) for _ in range(3)),
        "o": _lin(4, 4)}, (4,), None) for k in ("where", "index")},
    "capsule routing": (_capsules, {"prim": _lin(6, 12), "W": _par(4, 4, 3, 3),
                                    "scale": lambda: nn.Parameter(torch.tensor(2.0))}, (6,),
                        None),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_set_and_sequence_models_exact(name):
    fwd, mods, shape, generic = MODELS[name]
    check(_make(fwd, mods), batches(shape), _rotate(list(MODELS).index(name)), generic=generic)


# -- node lists folded by size: equal-size graphs, then graphs of other sizes ------------------ #
def _sized(sizes, seed, C=4):
    """One batch of complete graphs of ``sizes`` nodes (one graph per sample)."""
    g = torch.Generator().manual_seed(seed)
    src, dst, off = [], [], 0
    for n in sizes:
        pairs = [(off + a, off + b) for a in range(n) for b in range(n) if a != b]
        src += [p[0] for p in pairs]
        dst += [p[1] for p in pairs]
        off += n
    batch = {"x": torch.randn(off, 3, generator=g, dtype=DT),
             "edge_index": torch.tensor([src, dst]),
             "batch": torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
             "num_graphs": len(sizes)}
    return batch, torch.randint(0, C, (len(sizes),), generator=g)


def _normed(s, b):
    """F.linear on a bare weight, LayerNorm and RMSNorm on the node rows."""
    (src, dst) = b["edge_index"]
    h = s.ln(torch.tanh(F.linear(b["x"], s.W)))
    return s.o(_seg_mean(s.rms(h + torch.zeros_like(h).index_add(0, dst, h[src])), b))


GRAPHS["F.linear, LayerNorm, RMSNorm on nodes"] = (_normed, {
    "W": _par(4, 3), "ln": lambda: nn.LayerNorm(4), "rms": lambda: nn.RMSNorm(4),
    "o": _lin(4, 4)}, None)


@pytest.mark.parametrize("name", ["GCN, index_add", "GCN, sparse.mm", "GIN, learned epsilon",
                                  "GraphSAGE, max aggregation",
                                  "F.linear, LayerNorm, RMSNorm on nodes"])
def test_node_list_folded_by_size_is_probed_at_every_step(name):
    """Three graphs of 3 nodes fold as ``(N * 3)`` node rows sample by sample, so the probe lets
    the node-level layers take the rules; graphs of 2, 4 and 3 nodes give the same shapes, with
    node 2 in the second graph. That verdict, kept for the later batches of the same structure,
    squared node 2 into the first sample's gradient (GCN 2%, GIN 31%, GraphSAGE 11%, the norms
    and ``F.linear`` 78% off the oracle); now such rows are probed at every step
    (fimfast/rules/fold_rows.py)."""
    fwd, mods, _ = GRAPHS[name]
    data = [_sized([3, 3, 3], 1), _sized([2, 4, 3], 2), _sized([3, 3, 3], 3),
            _sized([4, 3, 2], 4)]
    check(_make(fwd, mods), data, PER_SAMPLE, reps=(), logits_fn=_fwd)


def _refolds(est) -> list[bool]:
    return [getattr(t, "refold", False) for c in est._persample.last_plan.calls for t in c.taps]


def _tokens(s, x):
    """Tokens flattened by a view, a residual MLP and a LayerNorm on the folded rows."""
    h = x.reshape(-1, x.shape[-1])
    h = s.ln(h + s.b(F.dropout(torch.relu(s.a(h)), 0.5, s.training)) * s.g)
    return s.o(h.view(x.shape[0], -1, h.shape[-1]).mean(1))


def test_rows_folded_by_a_view_keep_the_verdict_node_lists_do_not():
    """``x.reshape(-1, d)`` of ``(N, T, d)`` tokens, then a row-by-row function of the layers'
    folded outputs: proven rows, probed once per structure (the rules, exact); the node list of
    three equal-size graphs: the rules too, re-probed at every step."""
    make = _make(_tokens, {"a": _lin(3, 5), "b": _lin(5, 3), "ln": lambda: nn.LayerNorm(3),
                           "g": lambda: nn.Parameter(torch.full((3,), 0.7)), "o": _lin(3, 4)})
    check(make, batches(SEQ), ("exact", "empirical", "hutchinson"), reps=(), generic=("g",))
    est = fimfast.DiagFisher(make(), "exact", seed=0)
    est.step(batches(SEQ)[0])
    assert len(_refolds(est)) == 3 and not any(_refolds(est))
    fwd, mods, _ = GRAPHS["GCN, index_add"]
    est = fimfast.DiagFisher(_make(fwd, mods)(), "exact", seed=0, forward_fn=_fwd)
    est.step(_sized([3, 3, 3], 1))
    assert not est._persample.last_plan.generic and all(_refolds(est)) and _refolds(est)
