"""The attention's node with a batched backward (fimfast/rules/attention_node.py), against torch's
own backward in float64: a training backward (torch's op itself), the engine's batched backward
(``is_grads_batched`` and the engine's own call, :func:`fimfast.persample.stream.batched_grads`)
for every mask torch's MultiheadAttention forms (none, shared, per sample as a key padding mask,
per head, causal, a fully masked row), a backward to some of the inputs only, columns split to
bound the scores' memory, where it does not apply; then EXACT on MultiheadAttention with
``add_bias_kv``, ``add_zero_attn`` and both masks against the float64 oracle and against the
same steps without the node, and a failing node that leaves the estimate as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle
from oracle import rel_error as _rel
from test_mha_bias_kv import AttnNet, _case
from tolerances import DET_REL_F64

from fimfast import DiagFisher, chunks
from fimfast.persample import stream
from fimfast.rules import attention_node

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

N, H, L, S, HD = 3, 2, 4, 5, 3
MASKS = ["none", "shared", "padding", "per_head", "causal", "causal_square", "masked_row", "bool"]


def _inputs(mask: str, seed: int = 0):
    """``(leaves, (q, k, v), sources, kwargs)``: float64 query, key and value ``(N, H, *, HD)``
    as the rule forms them (transposed views of a projection, its output ``(N, *, H HD)`` in
    ``sources``), and the attention's mask arguments."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(N, n, H * HD, generator=g, dtype=torch.float64, requires_grad=True)
              for n in (L, S, S)]
    src = [torch.tanh(t) for t in leaves]
    if mask == "causal_square":
        src = [src[0], src[1][:, :L], src[2][:, :L]]
    qkv = [t.reshape(N, -1, H, HD).transpose(1, 2) for t in src]
    kw: dict = {}
    if mask == "shared":
        kw["attn_mask"] = torch.randn(L, S, generator=g, dtype=torch.float64)
    elif mask == "padding":  # a key padding mask as MultiheadAttention merges it
        pad = torch.zeros(N, 1, 1, S, dtype=torch.float64)
        pad[1, ..., -2:] = float("-inf")
        kw["attn_mask"] = pad
    elif mask == "per_head":
        kw["attn_mask"] = torch.randn(N, H, L, S, generator=g, dtype=torch.float64)
    elif mask == "causal":  # top-left aligned, L < S
        kw["is_causal"] = True
    elif mask == "causal_square":
        kw["is_causal"] = True
    elif mask == "masked_row":  # every key of one query masked: a zero output row
        am = torch.zeros(N, 1, L, S, dtype=torch.float64)
        am[0, 0, 1] = float("-inf")
        kw["attn_mask"] = am
    elif mask == "bool":
        kw["attn_mask"] = torch.rand(L, S, generator=g) > 0.3
        kw["attn_mask"][:, 0] = True
    return leaves, qkv, attention_node.Sources.of(*src), kw


def _both(mask: str, scale: float | None = None):
    """``(leaves, torch's output, the node's output)``, the same values."""
    leaves, (q, k, v), src, kw = _inputs(mask)
    y = F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    z = attention_node.fold(q, k, v, F.scaled_dot_product_attention(q, k, v, scale=scale, **kw),
                            src)
    assert type(z.grad_fn).__name__ == "NodeBackward"
    assert torch.equal(y, z)
    return leaves, y, z


def _spy(monkeypatch) -> list:
    """Record the columns of each call of the batched backward's products."""
    seen: list = []
    real = attention_node._batched

    def wrapper(G, flat, want):
        seen.append(G.shape[0])
        return real(G, flat, want)

    monkeypatch.setattr(attention_node, "_batched", wrapper)
    return seen


def _close(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", MASKS)
def test_training_backward_is_torchs(mask, monkeypatch):
    seen = _spy(monkeypatch)
    leaves, y, z = _both(mask)
    G = torch.randn_like(y)
    want = torch.autograd.grad(torch.sin(y), leaves, G, retain_graph=True)
    got = torch.autograd.grad(torch.sin(z), leaves, G)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert seen == []


@pytest.mark.parametrize("engine", ["autograd", "stream", "not_unwrapped"])
@pytest.mark.parametrize("mask", MASKS)
def test_batched_backward_matches_torch(mask, engine, monkeypatch):
    """``not_unwrapped``: a batched gradient the node does not unwrap (batched at another level
    than the innermost one): torch's op and the sources' gradients run under torch's batching."""
    seen = _spy(monkeypatch)
    if engine == "not_unwrapped":
        monkeypatch.setattr(attention_node, "batch_level", lambda g: None)
    leaves, y, z = _both(mask, scale=0.7 if mask == "shared" else None)
    cot = torch.randn(5, *y.shape, dtype=torch.float64)
    want = torch.autograd.grad(torch.sin(y), leaves, cot, is_grads_batched=True,
                               retain_graph=True)
    if engine == "stream":
        got = stream.batched_grads(torch.sin(z), leaves, cot, False)
    else:
        got = torch.autograd.grad(torch.sin(z), leaves, cot, is_grads_batched=True)
    _close(got, want)
    assert seen == ([] if engine == "not_unwrapped" else [5])
    if mask == "masked_row":
        assert float(want[0][:, 0].abs().max()) > 0  # only row 1 of sample 0 is zero
        assert torch.equal(got[0][:, 0, 1], torch.zeros_like(got[0][:, 0, 1]))


@pytest.mark.parametrize("which", [[0], [1], [2], [0, 2], [1, 2]])
def test_batched_backward_to_some_inputs(which, monkeypatch):
    """Only the gradients asked for are formed; each equals torch's."""
    calls: list = []
    real = attention_node._batched

    def wrapper(G, flat, want):
        calls.append(list(want))
        return real(G, flat, want)

    monkeypatch.setattr(attention_node, "_batched", wrapper)
    leaves, y, z = _both("padding")
    ins = [leaves[i] for i in which]
    cot = torch.randn(3, *y.shape, dtype=torch.float64)
    want = torch.autograd.grad(y, ins, cot, is_grads_batched=True, retain_graph=True)
    _close(torch.autograd.grad(z, ins, cot, is_grads_batched=True), want)
    assert calls == [[i in which for i in range(3)]]


@pytest.mark.parametrize("small,parts", [(None, [7]), (1, [4, 3])])
def test_columns_split_to_bound_the_scores(small, parts, monkeypatch):
    """Seven columns run together where their scores fit ``chunks.SMALL_BYTES``; with no room
    beyond the columns' own gradient (``7 N H L HD`` elements, 4 columns of scores of ``N H L
    S``), as 4 + 3; torch's values either way."""
    seen = _spy(monkeypatch)
    if small is not None:
        monkeypatch.setattr(chunks, "SMALL_BYTES", small)
    leaves, y, z = _both("per_head")
    cot = torch.randn(7, *y.shape, dtype=torch.float64)
    want = torch.autograd.grad(y, leaves, cot, is_grads_batched=True, retain_graph=True)
    _close(torch.autograd.grad(z, leaves, cot, is_grads_batched=True), want)
    assert seen == parts


def test_probabilities_formed_once_for_the_chunks(monkeypatch):
    """Two batched backwards through one graph (two chunks of a step) form ``P`` once."""
    calls: list = []
    real = attention_node._flat
    monkeypatch.setattr(attention_node, "_flat", lambda *a: calls.append(1) or real(*a))
    leaves, y, z = _both("causal")
    for M in (3, 2):
        cot = torch.randn(M, *y.shape, dtype=torch.float64)
        want = torch.autograd.grad(y, leaves, cot, is_grads_batched=True, retain_graph=True)
        _close(torch.autograd.grad(z, leaves, cot, is_grads_batched=True, retain_graph=True),
               want)
    assert calls == [1]


def test_where_it_does_not_apply():
    """torch's math attention, dropout, a mask with a gradient: the output itself."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, (q, k, v), src, _ = _inputs("none")
    with sdpa_kernel(SDPBackend.MATH):
        y = F.scaled_dot_product_attention(q, k, v)
    assert attention_node.fold(q, k, v, y, src) is y
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert attention_node.fold(q, k, v, y, src) is y
    am = torch.zeros(L, S, dtype=torch.float64, requires_grad=True)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
    assert attention_node.fold(q, k, v, y, src) is y
    y = F.scaled_dot_product_attention(q, k, v)
    assert attention_node.fold(q * 1, k, v, y, src) is y  # not the query the output was made of


VARIANTS = [  # add_bias_kv and add_zero_attn, with a key padding mask and an attention mask
    dict(bias_kv=True, zero=True, mask="float3d"),
    dict(bias_kv=True, zero=True, batch_first=False, mask="causal"),
    dict(bias_kv=True, zero=False, batch_first=False, mask="float3d"),
    dict(bias_kv=False, zero=True, mask="causal", kdim=5),
    dict(bias_kv=True, zero=True, mask="none", bias=False),
    dict(bias_kv=True, zero=True, mask="float3d", kdim=4),  # packed key-value projection
]
IDS = ["-".join(f"{k}={v}" for k, v in d.items()) for d in VARIANTS]


def _model(task: str, v: dict) -> AttnNet:
    torch.manual_seed(0)
    m = AttnNet(task, **v)
    if m.attn.bias_k is not None:
        with torch.no_grad():
            m.attn.bias_k.normal_()
            m.attn.bias_v.normal_()
    return m


def _steps(case, steps: int, **opts) -> dict:
    est = DiagFisher(case.model, "exact", class_dim=-1, forward_fn=lambda m, b: m(b[0], b[2]),
                     **opts)
    for _ in range(steps):
        est.step(case.batch)
    assert not est._persample.last_plan.generic
    return {n: t / steps for n, t in est.result().items()}


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
@pytest.mark.parametrize("task", ["cls", "tag"])
def test_exact_matches_oracle_and_the_loop(v, task, monkeypatch):
    """EXACT in batched chunks of two columns, three steps (the node from the first on): the
    float64 oracle, and torch's per-column loop (the rule without the node) to rounding."""
    case = _case(_model(task, v)).to(torch.float64)
    seen = _spy(monkeypatch)
    got = _steps(case, 3, class_chunk=2)
    assert seen and min(seen) > 1  # the batched products ran
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    monkeypatch.setattr(attention_node, "fold", lambda q, k, v, o, src: o)
    ref = _steps(case, 3, class_chunk=2)
    assert _rel(got, ref) <= 1e-13


def _packed(zero: bool):
    """``(leaves, y, z)``: self-attention of a packed projection ``(N, L, 3 E)`` with
    ``bias_k``/``bias_v`` rows appended to the keys and values (then a zero row), by torch and
    as the node whose inputs are the projection and the expanded rows."""
    g = torch.Generator().manual_seed(1)
    E = H * HD
    leaves = [torch.randn(N, L, 3 * E, generator=g, dtype=torch.float64, requires_grad=True),
              *(torch.randn(1, 1, E, generator=g, dtype=torch.float64, requires_grad=True)
                for _ in range(2))]
    qkv = torch.tanh(leaves[0])
    bk, bv = (t.expand(N, 1, E) for t in leaves[1:])
    q, k, v = qkv.unflatten(-1, (3, E)).unbind(-2)
    k, v = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
    if zero:
        k, v = (torch.cat([t, t.new_zeros(N, 1, E)], 1) for t in (k, v))
    q, k, v = (t.reshape(N, -1, H, HD).transpose(1, 2) for t in (q, k, v))
    src = attention_node.Sources([qkv, bk, bv], ((0, 0), (0, E), (0, 2 * E)), (1, 2), L)
    y = F.scaled_dot_product_attention(q, k, v)
    z = attention_node.fold(q, k, v, F.scaled_dot_product_attention(q, k, v), src)
    assert type(z.grad_fn).__name__ == "NodeBackward"
    return leaves, y, z


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("which", [[0, 1, 2], [1, 2], [1], [0]])
@pytest.mark.parametrize("batched", [False, True, "not_unwrapped"])
def test_packed_projection_and_appended_rows(zero, which, batched, monkeypatch):
    """The gradients of a packed projection and of appended ``bias_k``/``bias_v`` rows (all, or
    some only: the node forms the key's and value's gradients for the rows alone), one column,
    batched, and batched at a level the node does not unwrap: torch's."""
    seen = _spy(monkeypatch)
    if batched == "not_unwrapped":
        monkeypatch.setattr(attention_node, "batch_level", lambda g: None)
    leaves, y, z = _packed(zero)
    ins = [leaves[i] for i in which]
    if batched:
        cot = torch.randn(4, *y.shape, dtype=torch.float64)
        want = torch.autograd.grad(torch.sin(y), ins, cot, is_grads_batched=True,
                                   retain_graph=True)
        got = torch.autograd.grad(torch.sin(z), ins, cot, is_grads_batched=True)
    else:
        cot = torch.randn_like(y)
        want = torch.autograd.grad(torch.sin(y), ins, cot, retain_graph=True)
        got = torch.autograd.grad(torch.sin(z), ins, cot)
    _close(got, want)
    assert seen == ([4] if batched is True else [])


def test_one_column_per_chunk_drops_the_node(monkeypatch):
    """EMPIRICAL (one column) takes the node in its first step only: the last step's columns per
    chunk decide; EXACT keeps it."""
    made: list = []
    real = attention_node.Node.apply
    monkeypatch.setattr(attention_node.Node, "apply", lambda *a: made.append(1) or real(*a))
    case = _case(_model("cls", VARIANTS[0])).to(torch.float64)
    for kind, counts in (("empirical", [1, 0, 0]), ("exact", [1, 1, 1])):
        est = DiagFisher(case.model, kind, class_dim=-1, forward_fn=lambda m, b: m(b[0], b[2]),
                         class_chunk=2)
        got = []
        for _ in range(3):
            made.clear()
            est.step(case.batch)
            got.append(len(made))
        assert got == counts, kind


def _est(case) -> DiagFisher:
    return DiagFisher(case.model, "exact", class_dim=-1, class_chunk=2,
                      forward_fn=lambda m, b: m(b[0], b[2]))


def _failing(real, after: int, calls: list):
    def failing(*args):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("attention backward failed")
        return real(*args)

    return failing


def test_a_failing_batched_backward_runs_as_a_loop(monkeypatch):
    """An error in the node's batched products (a chunk after the first): the engine runs that
    chunk's columns one by one (torch's own backward in the node), the same estimate."""
    case = _case(_model("tag", VARIANTS[0])).to(torch.float64)
    ref = _est(case)
    ref.step(case.batch)
    ref.step(case.batch)
    calls: list = []
    monkeypatch.setattr(attention_node, "_batched", _failing(attention_node._batched, 1, calls))
    e = _est(case)
    e.step(case.batch)
    e.step(case.batch)
    assert len(calls) > 2
    for (n, a), (_, b) in zip(e.result().items(), ref.result().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=n)


def test_a_failing_node_leaves_the_estimate_unchanged(monkeypatch):
    """An error in the node's backward, batched and column by column alike, aborts the step with
    that error and leaves the accumulated estimate as it was; the next step adds to it as if
    nothing happened (the same as two steps of a fresh estimator)."""
    case = _case(_model("tag", VARIANTS[0])).to(torch.float64)
    e = _est(case)
    e.step(case.batch)
    before = {n: t.clone() for n, t in e.result().items()}
    batched, one = attention_node._batched, attention_node._torch_backward
    calls: list = []
    monkeypatch.setattr(attention_node, "_batched", _failing(batched, 1, calls))
    monkeypatch.setattr(attention_node, "_torch_backward", _failing(one, 0, []))
    with pytest.raises(RuntimeError, match="attention backward failed"):
        e.step(case.batch)
    assert len(calls) == 2  # the second chunk failed
    monkeypatch.setattr(attention_node, "_batched", batched)
    monkeypatch.setattr(attention_node, "_torch_backward", one)
    for n, t in e.result().items():
        assert torch.equal(t, before[n]), n
    e.step(case.batch)
    ref = _est(case)
    ref.step(case.batch)
    ref.step(case.batch)
    for (n, a), (_, b) in zip(e.result().items(), ref.result().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=n)
