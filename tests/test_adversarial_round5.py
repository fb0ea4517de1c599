"""Adversarial checks, fifth round: the models of tests/test_adversarial_round4.py (every
parameter through a computed weight, -inf written into left-out token rows, recurrent outputs
written in place, models changed between steps) under the random types round4 leaves out:
HUTCHINSON_SQRT, HUTCHINSON_RANKK (both solvers, ``top_k`` 1 to C - 1), HUTCHINSON_RANK1 against
the float64 per-step oracle of tests/adversarial_bounds.py (the factor of each type from its
definition, with the estimator's own signs), and MONTE_CARLO with several probes against the one
of tests/adversarial.py (the labels it drew), through the object API and the seed API (options
changed between steps), with ``ema``, ``reduction`` and ``ignore_index``: to 1e-10 relative per
parameter tensor, the oracle nonzero (or zero where the model makes it so, checked). Also:
``sequence_rows``, sequence-first token rows, Hugging Face mapping batches, ``train_step``,
``lm_head`` on a head whose weight or bias is computed, and ``fimfast.analysis.bounds``."""

from __future__ import annotations

import adversarial as adv
import adversarial_bounds as ab
import adversarial_models5 as M5
import pytest
import test_adversarial_round4 as R4
import torch

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

THREE = ["hutchinson_sqrt", "hutchinson_rankk", "hutchinson_rank1"]


def _c(make, batches, kw):
    """The number of classes of the model's logits."""
    z = make()(batches[0][0])
    return z.shape[kw.get("class_dim", -1)]


def _split(kw):
    """``(estimator options, logits_fn)``."""
    kw = dict(kw)
    return kw, kw.pop("logits_fn", None)


# (make, batches, before, kw, zero): round4's builders
MODELS = {**{n: (m, b, None, kw, ()) for n, (m, b, kw) in R4.COMPUTED_ONLY.items()},
          **{n: (m, b, bf, kw, ()) for n, (m, b, bf, kw) in R4.PANEL.items()},
          **{n: (lambda k=k, o=o, kw=kw: R4._RnnInPlace(k, o, **kw),
                 R4._batches(shape=(3, 3), classes=3), None, {}, ())
             for n, (k, o, kw) in R4.RNN_IN_PLACE.items()},
          "-inf in left-out token rows": (lambda: R4._Padded(fill=True), R4._padded_batches(),
                                          None, {"class_dim": -1}, ("k.bias",)),
          **M5.EXTRA}
NAMES = list(MODELS)


def _variants(i: int, C: int) -> list[tuple[str, dict]]:
    """The options each model is checked with, cycled over the models: every ``top_k`` of
    RANKK from 1 to C - 1, both solvers, probes, ``ema`` and ``reduction``."""
    ks = list(range(1, C))
    k = ks[i % len(ks)]
    red = [{}, {"reduction": "mean"}, {"ema": 0.6}, {"ema": 0.6, "reduction": "mean"}][i % 4]
    return [
        ("hutchinson_sqrt", {"num_probes": 1 + i % 3, **red}),
        ("hutchinson_rankk", {"top_k": k, "num_probes": 2, **red}),
        ("hutchinson_rankk", {"top_k": C - 1, "rankk_solver": "power",
                              "lr_power_itrs": 1 + 2 * (i % 4)}),
        ("hutchinson_rankk", {"top_k": ks[(i + 1) % len(ks)], "rankk_solver": "power",
                              **red}),
        ("hutchinson_rank1", {"num_probes": 3, **red}),
    ]


def _zero_ok(est, ref, zero):
    got = dict(est.result().items())
    for k in zero:
        assert float(ref[k].abs().max()) < 1e-25 and float(got[k].abs().max()) < 1e-25
    kept = {k: v for k, v in ref.items() if k not in zero}
    assert adv.nonzero(kept)
    return kept


@pytest.mark.parametrize("name", NAMES)
def test_random_types_against_the_per_step_oracle(name):
    make, batches, before, kw, zero = MODELS[name]
    C = _c(make, batches, kw)
    kw, fn = _split(kw)
    for fim_type, opts in _variants(NAMES.index(name), C):
        if fim_type == "hutchinson_sqrt" and "likelihood" in kw:
            continue  # refused: tests/test_adversarial_bounds.py
        est, ref = ab.run(make(), batches, fim_type, before=before, logits_fn=fn, **kw, **opts)
        kept = _zero_ok(est, ref, zero)
        err = ab.max_rel(est, kept)
        assert err < 1e-10, (fim_type, opts, err)


@pytest.mark.parametrize("name", [n for n in NAMES if "likelihood" not in MODELS[n][3]])
def test_monte_carlo_with_several_probes(name):
    make, batches, before, kw, zero = MODELS[name]
    kw, fn = _split(kw)
    est, ref = adv.run(make(), batches, "monte_carlo", before=before, logits_fn=fn,
                       num_probes=2 + NAMES.index(name) % 3, **kw)
    kept = _zero_ok(est, ref, zero)
    assert adv.max_rel(est, kept) < 1e-10


def _seed_api(make, batches, fim_type, steps_opts, before=None, ema=None, reduction="sum",
              kw=None):
    """The seed API over ``batches`` (the options of step ``i``: ``steps_opts[i]``, changed
    between steps) against the oracle of its steps, combined as ``ema`` and ``reduction`` say."""
    kw = kw or {}
    model = make()
    fimfast.zero_diag_fim(model, fim_type)
    steps, counts = [], []
    for i, (b, opts) in enumerate(zip(batches, steps_opts)):
        if before is not None:
            before(i, model)
        est = fimfast.get_estimator(model, fim_type)
        offset = 0 if est is None or getattr(est, "_restart", False) else est.offset
        state = torch.get_rng_state()
        fimfast.diag_fim_step(model, b, fim_type, {"seed": 5, **kw, **opts}, ema=ema,
                              reduction=reduction)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        ii = {**kw, **opts}.get("ignore_index", -100)
        if fim_type == "monte_carlo":
            one = adv.step_oracle(model, b, fim_type, 5, offset, opts.get("num_probes", 1), ii)
        else:
            fo = {v: opts[k] for k, v in ab._FACTOR_KEYS.items() if k in opts}
            one = ab.step_oracle(model, b, fim_type, 5, offset, ignore_index=ii, **fo)
        torch.set_rng_state(after)
        steps.append(one)
        counts.append(int((b[1].reshape(-1) != ii).sum()))
    ref = {}
    mean = reduction == "mean"
    for n in steps[-1]:
        if ema is None:
            ref[n] = sum(st[n] for st in steps) / (sum(counts) if mean else 1)
        else:
            m = 0
            for st, c in zip(steps, counts):
                m = ema * m + (1 - ema) * (st[n] / c if mean else st[n])
            ref[n] = m / (1 - ema ** len(steps))
    got = fimfast.get_diag_fim(model, fim_type)
    assert adv.nonzero(ref)
    for n, r in ref.items():
        err = float((got[n].double() - r).norm() / r.norm())
        assert err < 1e-10, (n, err)


SEED = ["weight_norm on every bias-free layer", "token logits, weight_norm only",
        "lstm proj_size add_", "BatchNorm eval, running statistics moved",
        "functional_call fast weights p - 0.1 sin p", "learned latents, L == N"]


@pytest.mark.parametrize("fim_type", THREE + ["monte_carlo"])
@pytest.mark.parametrize("name", SEED)
def test_seed_api_with_options_changed_between_steps(name, fim_type):
    make, batches, before, kw, zero = MODELS[name]
    C = _c(make, batches, kw)
    i = SEED.index(name)
    per = {"hutchinson_sqrt": [{"num_probes": 2}, {"num_probes": 3}, {}],
           "hutchinson_rank1": [{"num_probes": 3}, {}, {"num_probes": 2}],
           "monte_carlo": [{"num_probes": 3}, {"num_probes": 2}, {}],
           "hutchinson_rankk": [{"top_k": C - 1, "num_probes": 2}, {"top_k": 1},
                                {"top_k": max(1, C - 2), "rankk_solver": "power",
                                 "lr_power_itrs": 2}]}[fim_type]
    red = [("sum", None), ("mean", None), ("sum", 0.5), ("mean", 0.8)][i % 4]
    _seed_api(make, batches, fim_type, per, before, red[1], red[0], kw)


def _masked_tokens():
    """Token batches with several ignored labels, a custom ``ignore_index``, one whole sample
    ignored."""
    out = []
    for ids, lab in R4._token_batches():
        lab = lab.clone()
        lab[lab == -100] = 3
        lab[:, 0] = 3
        out.append((ids, lab))
    out[1][1][2] = 3
    return out


@pytest.mark.parametrize("fim_type", THREE + ["monte_carlo"])
def test_custom_ignore_index_on_token_rows(fim_type):
    """``ignore_index=3`` (a class index the model has: its rows left out, the class kept)."""
    make = R4.COMPUTED_ONLY["token logits, weight_norm only"][0]
    B = _masked_tokens()
    kw = {"class_dim": -1, "ignore_index": 3, "num_probes": 2}
    if fim_type == "monte_carlo":
        est, ref = adv.run(make(), B, fim_type, **kw)
        assert adv.nonzero(ref) and adv.max_rel(est, ref) < 1e-10
    else:
        est, ref = ab.run(make(), B, fim_type, reduction="mean", **kw)
        assert est.state.count == sum(int((b[1] != 3).sum()) for b in B)
        assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10
    _seed_api(make, B, fim_type, [{"num_probes": 2}] * len(B), ema=0.7,
              kw={"class_dim": -1, "ignore_index": 3})


@pytest.mark.parametrize("fim_type", THREE + ["monte_carlo"])
def test_nan_from_left_out_rows_is_refused_and_state_kept(fim_type):
    B = R4._padded_batches()
    model = R4._Padded()
    est = fimfast.DiagFisher(model, fim_type, seed=3, class_dim=-1, num_probes=2)
    est.step(B[0])
    before, offset = {k: v.clone() for k, v in est.result().items()}, est.offset
    with pytest.raises(ValueError, match="left out of the Fisher.*non-finite logit"):
        est.step(B[1])
    assert est.offset == offset
    assert all(torch.equal(before[k], v) for k, v in est.result().items())
    est.step(B[2])
    assert all(bool(torch.isfinite(v).all()) for _, v in est.result().items())


def test_monte_carlo_sequence_rows_with_several_probes():
    """``sequence_rows``: per sequence and probe, the score columns of its valid tokens summed
    (the labels MONTE_CARLO drew for every token), then squared."""
    from fimfast.ops.torch_ref import probe_logit_grad_torch

    for make, B in [(M5._MhaTokens, M5._padded_tokens()),
                    (M5._hf("roberta tokens"), M5._tokens(classes=3, vocab=11))]:
        est = fimfast.DiagFisher(make(), "monte_carlo", seed=7, class_dim=-1, num_probes=3,
                                 sequence_rows=True)
        ref = 0
        for b, off in adv.stepped(est, est.model, B):
            _, _, J, z = adv.jacobian_rows(est.model, b)
            y = b[1]
            seq = (y.reshape(-1) != -100).nonzero().squeeze(-1) // y.shape[1]
            g = torch.einsum("rcp,src->srp", J, probe_logit_grad_torch(z, "mc", est.seed, off, 3))
            G = torch.zeros(3, y.shape[0], J.shape[-1], dtype=g.dtype).index_add_(1, seq, g)
            ref = ref + (G ** 2).sum(1).mean(0)
        got = torch.cat([v.reshape(-1) for v in est.result().values()]).double()
        assert float(ref.abs().min()) >= 0 and float(ref.norm()) > 0
        assert float((got - ref).norm() / ref.norm()) < 1e-10


# -- lm_head on a computed head weight ------------------------------------------------------- #
class _Shift(torch.nn.Module):
    def forward(self, b):
        return 2 * b + 0.1


def _head_computed(how):
    def make():
        from torch.nn.utils import parametrizations as pz
        from torch.nn.utils import parametrize as P

        m = M5._MhaTokens()
        if how == "bias":
            P.register_parametrization(m.h, "bias", _Shift())
        elif how == "old weight_norm":  # a forward pre-hook sets the computed weight
            torch.nn.utils.weight_norm(m.h)
        elif how == "weight_norm, only the head trained":  # no backward through the input
            m.e.requires_grad_(False)
            m.a.requires_grad_(False)
            pz.weight_norm(m.h)
            m.h.parametrizations.weight.original0.requires_grad_(False)
        else:
            getattr(pz, how)(m.h)
        return m.train(how == "spectral_norm")
    return make


@pytest.mark.parametrize("fim_type", ["hutchinson_sqrt", "hutchinson", "hutchinson_dg"])
@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "bias", "old weight_norm",
                                 "weight_norm, only the head trained"])
def test_lm_head_whose_weight_or_bias_is_computed(how, fim_type):
    """The fused head's weight (``weight_norm``; ``spectral_norm`` in training mode: one power
    iteration per step, as the plain forward) or bias computed by a parametrization: the op's
    gradient pulled back to the parameters behind it (before: never added, relative error 1.0
    on those parameters, every other one right), the buffers as the unfused step leaves them."""
    make, B = _head_computed(how), M5._padded_tokens()
    est, ref = ab.run(make(), B, fim_type, class_dim=-1, lm_head="h", num_probes=2)
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10
    fused, plain = make(), make()
    a = fimfast.DiagFisher(fused, fim_type, seed=3, class_dim=-1, lm_head="h", num_probes=2)
    b = fimfast.DiagFisher(plain, fim_type, seed=3, class_dim=-1, num_probes=2)
    for bt in B:
        a.step(bt)
        b.step(bt)
    assert all(float((a.result()[n] - v).norm() / v.norm()) < 1e-12 for n, v in b.result().items())
    assert all(torch.equal(x, y) for x, y in zip(fused.buffers(), plain.buffers()))
    seeded = make()
    for bt in B:
        fimfast.diag_fim_step(seeded, bt, fim_type, {"seed": 3, "class_dim": -1, "lm_head": "h",
                                                    "num_probes": 2})
    got = fimfast.get_diag_fim(seeded, fim_type)
    assert all(float((got[n] - v).norm() / v.norm()) < 1e-12 for n, v in b.result().items())


def _mc_columns(z, likelihood, sigma2, seed, offset, S):
    """MONTE_CARLO's drawn scores ``(S, R, C)`` from their definition: ``y ~ Bernoulli(s)``,
    ``y - s``; ``y = z + sigma eps`` (Box-Muller on counters ``offset + i``, ``offset + SRC + i``),
    ``(y - z) / sigma2``."""
    import math

    from fimfast.ops import rng

    R, C = z.shape
    if likelihood == "bernoulli":
        s = torch.sigmoid(z)
        return (rng.uniform(seed, offset, (S, R, C), z.dtype) < s).to(z.dtype) - s
    u1 = rng.uniform(seed, offset, (S, R, C), z.dtype)
    u2 = rng.uniform(seed, offset + S * R * C, (S, R, C), z.dtype)
    y = z + sigma2 ** 0.5 * (-2 * torch.log1p(-u1)).sqrt() * torch.cos(2 * math.pi * u2)
    return (y - z) / sigma2


@pytest.mark.parametrize("name", [n for n in NAMES if "likelihood" in MODELS[n][3]])
def test_monte_carlo_diagonal_likelihoods_with_several_probes(name):
    make, batches, _, kw, _ = MODELS[name]
    sigma2 = kw.get("sigma2", 1.0)
    for red in ("sum", "mean"):
        est = fimfast.DiagFisher(make(), "monte_carlo", seed=9, num_probes=3, reduction=red, **kw)
        ref, rows = 0, 0
        for b, off in adv.stepped(est, est.model, batches):
            _, _, J, z = adv.jacobian_rows(est.model, b)
            u = _mc_columns(z, kw["likelihood"], sigma2, est.seed, off, 3)
            ref = ref + (torch.einsum("rcp,src->srp", J, u) ** 2).sum(1).mean(0)
            rows += z.shape[0]
        ref = ref / (rows if red == "mean" else 1)
        got = torch.cat([v.reshape(-1) for v in est.result().values()]).double()
        assert float(ref.norm()) > 0
        assert float((got - ref).norm() / ref.norm()) < 1e-10


class _SeqFirst(torch.nn.Module):
    """Sequence-first token logits ``(T, N, C)`` through self-attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = torch.nn.Embedding(7, 6)
        self.a = torch.nn.MultiheadAttention(6, 2)
        self.h = torch.nn.Linear(6, 4)
        self.double()

    def forward(self, ids):
        h = self.e(ids)
        return self.h(h + self.a(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("fim_type,opts", [("hutchinson_sqrt", {"num_probes": 2}),
                                           ("hutchinson_rankk", {"top_k": 2, "num_probes": 2}),
                                           ("hutchinson_rank1", {"ema": 0.5}),
                                           ("monte_carlo", {"num_probes": 3})])
def test_sequence_first_token_rows(fim_type, opts):
    """``batch_dim=1``, ``(T, N)`` ids and labels: the rows (and so the draws) in batch order,
    sample by sample, as for ``(N, T)`` logits."""
    B = [(x.t().contiguous(), y.t().contiguous()) for x, y in M5._tokens()]
    est = fimfast.DiagFisher(_SeqFirst(), fim_type, seed=7, class_dim=-1, batch_dim=1, **opts)
    steps = []
    for b, off in adv.stepped(est, est.model, B):
        nt = (b[0], b[1].t())

        def fn(m, bt):
            return m(bt[0]).transpose(0, 1)
        if fim_type == "monte_carlo":
            steps.append(adv.step_oracle(est.model, nt, fim_type, 7, off, 3, logits_fn=fn))
        else:
            fo = {v: opts[k] for k, v in ab._FACTOR_KEYS.items() if k in opts}
            steps.append(ab.step_oracle(est.model, nt, fim_type, 7, off, logits_fn=fn, **fo))
    ema = opts.get("ema")
    ref = {}
    for n in steps[0]:
        if ema is None:
            ref[n] = sum(st[n] for st in steps)
        else:
            m = 0
            for st in steps:
                m = ema * m + (1 - ema) * st[n]
            ref[n] = m / (1 - ema ** len(steps))
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10


class _TiedComputed(torch.nn.Module):
    """Token logits whose head weight is computed in the forward from the embedding table and
    is that table too (``F.normalize(E)`` or ``1.5 E``, set as ``h.weight`` each forward)."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.E = torch.nn.Parameter(torch.randn(7, 6))
        self.h, self.l = torch.nn.Linear(6, 7), torch.nn.Linear(6, 6)
        del self.h.weight
        self.double()

    def forward(self, ids):
        W = torch.nn.functional.normalize(self.E, dim=1) * 3 if self.how == "norm" else 1.5 * self.E
        self.h.weight = W
        return self.h(torch.tanh(self.l(torch.nn.functional.embedding(ids, W))))


@pytest.mark.parametrize("fim_type", ["hutchinson_sqrt", "hutchinson"])
@pytest.mark.parametrize("how", ["norm", "scale"])
@pytest.mark.parametrize("S", [1, 2])
def test_lm_head_weight_computed_in_the_forward_from_the_embedding(S, how, fim_type):
    """The head's weight computed in the forward and shared with the input lookup: the head's
    gradient pulled back through the graph the lookup also goes through (before: dropped,
    relative error 0.32 to 0.69 on the table; then autograd's "backward through the graph a
    second time" once the last probe had freed the shared graph)."""
    est, ref = ab.run(_TiedComputed(how), M5._padded_tokens(classes=7), fim_type, class_dim=-1,
                      lm_head="h", num_probes=S)
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10


@pytest.mark.parametrize("fim_type", THREE + ["monte_carlo"])
@pytest.mark.parametrize("ema", [None, 0.6])
def test_seed_api_ignore_index_changed_between_steps(ema, fim_type):
    """``ignore_index`` 3 (a class of the model), -100, then -1 over three steps of the seed
    API with ``reduction="mean"``: each step's rows and count follow its own option."""
    B = M5._padded_tokens()
    B2 = [(B[0][0], B[0][1].masked_fill(B[0][1] == -100, 3)), B[1],
          (B[0][0], B[0][1].masked_fill(B[0][1] == -100, -1).masked_fill(B[0][1] == 2, -1))]
    steps = [{"ignore_index": 3, "num_probes": 2}, {"ignore_index": -100},
             {"ignore_index": -1, "num_probes": 3}]
    if fim_type == "hutchinson_rankk":
        steps[2]["top_k"] = 1
    _seed_api(M5._MhaTokens, B2, fim_type, steps, ema=ema, reduction="mean",
              kw={"class_dim": -1})


@pytest.mark.parametrize("fim_type", ["hutchinson_sqrt", "hutchinson"])
def test_seed_api_seed_and_lm_head_changed_between_steps(fim_type):
    """A new ``seed`` restarts the stream at offset 0; ``lm_head`` on, off and on again draws
    the probes of the plain step."""
    B, model, ref = M5._padded_tokens(), M5._MhaTokens(), {}
    plan = [{"seed": 5, "num_probes": 2}, {"seed": 9, "lm_head": "h"}, {"seed": 9},
            {"seed": 9, "lm_head": "h", "num_probes": 3}]
    for i, o in enumerate(plan):
        b, est = B[i % 2], fimfast.get_estimator(model, fim_type)
        off = 0 if est is None or est.seed != o["seed"] else est.offset
        fimfast.diag_fim_step(model, b, fim_type, {"class_dim": -1, **o})
        one = ab.step_oracle(model, b, fim_type, o["seed"], off, num_probes=o.get("num_probes", 1))
        ref = {n: ref.get(n, 0) + v for n, v in one.items()}
    got = fimfast.get_diag_fim(model, fim_type)
    assert adv.nonzero(ref)
    assert max(float((got[n].double() - r).norm() / r.norm()) for n, r in ref.items()) < 1e-10


@pytest.mark.parametrize("fim_type", THREE + ["monte_carlo"])
def test_train_step_on_tied_token_attention(fim_type):
    import torch.nn.functional as F

    est = fimfast.DiagFisher(M5._MhaTokens(tied=True), fim_type, seed=3, class_dim=-1,
                             num_probes=2)
    ref: dict = {}
    for b in M5._padded_tokens(classes=7):
        off = est.offset
        est.train_step(b, lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1),
                                                       label_smoothing=0.2))
        one = (adv.step_oracle(est.model, b, fim_type, est.seed, off, 2)
               if fim_type == "monte_carlo"
               else ab.step_oracle(est.model, b, fim_type, est.seed, off, num_probes=2))
        ref = {n: ref.get(n, 0) + v for n, v in one.items()}
    assert adv.nonzero(ref) and adv.max_rel(est, ref) < 1e-10


def _roberta_mapping_batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2):
        ids = torch.randint(2, 11, (3, 5), generator=g)
        lab = torch.randint(0, 3, (3, 5), generator=g)
        am = torch.ones(3, 5, dtype=torch.long)
        am[1, 3:], ids[1, 3:], am[2, 4], ids[2, 4] = 0, 1, 0, 1  # padded, labels kept
        lab[0, 2] = -100
        out.append({"input_ids": ids, "attention_mask": am, "labels": lab})
    return out


@pytest.mark.parametrize("fim_type,opts", [("hutchinson_sqrt", {"num_probes": 2}),
                                           ("hutchinson_rankk", {"top_k": 2, "num_probes": 2}),
                                           ("hutchinson_rank1", {"num_probes": 3}),
                                           ("monte_carlo", {"num_probes": 3})])
def test_hugging_face_mapping_batches_with_attention_mask(fim_type, opts):
    """RoBERTa token classification on ``{input_ids, attention_mask, labels}``: the rows of
    ``attention_mask`` 0 left out although their labels are classes."""
    from fimfast.ops.torch_ref import probe_logit_grad_torch

    model = M5._hf("roberta tokens")().m

    def fn(m, b):
        return m(input_ids=b[0]["input_ids"], attention_mask=b[0]["attention_mask"]).logits
    est = fimfast.DiagFisher(model, fim_type, seed=4, class_dim=-1, **opts)
    ref: dict = {}
    for b, off in adv.stepped(est, model, _roberta_mapping_batches()):
        rows = ((b["labels"] != -100) & (b["attention_mask"] != 0)).reshape(-1)
        names, shapes, J, z = adv.jacobian_rows(model, (b,), fn, rows=rows.nonzero()[:, 0].tolist())
        if fim_type == "monte_carlo":
            u = probe_logit_grad_torch(z, "mc", 4, off, 3)
            out = (torch.einsum("rcp,src->srp", J, u) ** 2).sum(1).mean(0)
        else:
            fo = {v: opts[k] for k, v in ab._FACTOR_KEYS.items() if k in opts}
            u = ab.factor(z, fim_type, 4, off, **fo)
            out = (torch.einsum("rcp,src->sp", J, u) ** 2).mean(0)
        ref = {n: ref.get(n, 0) + v for n, v in ab._split(names, shapes, out).items()}
    assert est.state.count == 22
    key = "roberta.encoder.layer.0.attention.self.key.bias"
    assert float(ref.pop(key).abs().max()) < 1e-25 and float(est.result()[key].abs().max()) < 1e-25
    assert adv.nonzero(ref) and adv.max_rel(est, ref) < 1e-10


BOUNDS = ["lora, parametrization on a trainable base", "slices of one parameter as every weight",
          "sdpa grouped-query", "mha token logits, key padding and causal masks",
          "weight_norm on every bias-free layer", "-inf in left-out token rows"]


@pytest.mark.parametrize("name", BOUNDS)
def test_bounds_are_the_expectations(name):
    """``fimfast.analysis.bounds``: RANKK's expectation (every ``top_k``), EXACT and DG."""
    from fimfast.analysis import bounds

    make, B, _, kw, _ = MODELS[name]
    model = make()
    names, _, J, z = ab.jacobian_rows(model, B[0], _split(kw)[1])
    for k in range(1, z.shape[-1]):
        b = bounds(model, B[0], top_k=k)
        for got, ref in ((b.lower, ab.expectation(J, z, "rankk", k)),
                         (b.exact, ab.expectation(J, z, "exact")),
                         (b.upper, ab.expectation(J, z, "dg"))):
            flat = torch.cat([got[n].reshape(-1) for n in names]).double()
            assert float(ref.norm()) > 0
            assert float((flat - ref).norm() / ref.norm()) < 1e-10, (k, name)
