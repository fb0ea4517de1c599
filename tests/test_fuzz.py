"""Differential fuzzing of the per-sample estimators (EXACT, EMPIRICAL, MONTE_CARLO).

Random architectures from the grammar of ``tests/fuzz/grammar.py`` (Linear, Bilinear, convolutions
and transposed convolutions, embeddings and bags, every norm layer in both modes, PReLU, attention
and encoder layers batch- and sequence-first, recurrent layers, residuals, reused and tied modules,
functional calls on bare parameters, pruned layers, user hooks, dict/tuple/``.logits`` outputs,
checkpointing, ``torch.compile``; class and padded token logits; sizes that coincide on purpose)
are checked, in float64, against the brute-force oracle of ``tests/oracle.py`` to a relative error
of 1e-10 per parameter tensor, and every step must leave the model's parameters, buffers,
gradients, modes and hooks as they were (see ``tests/fuzz/runner.py`` and docs/fuzzing.md).

Runs:

* default (CI): a fixed set of about 200 models: the first 200 seeds that do not compile with
  inductor, and the first seed of any construct they lack (``REQUIRED``);
  seeds on which the engine is known to fail are ``xfail(strict=True)`` with the reason
  (``tests/fuzz/known.py``): a fix turns them into XPASS, which fails until the entry is removed;
* long run: ``FIMFAST_FUZZ=5000 pytest tests/test_fuzz.py -q`` checks seeds 0..4999 (inductor
  models included; ``FIMFAST_FUZZ_START`` moves the first seed); ``python -m fuzz`` in ``tests/``
  does the same with a summary by failure category and ``--shrink``;
* replay: ``FIMFAST_FUZZ_SEED=123 pytest tests/test_fuzz.py -q`` (several: ``123,456``) checks the
  model that a failure names (every failure prints its seed and a one-line description).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from fuzz.grammar import Spec, build, describe, features, plan
from fuzz.known import KNOWN
from fuzz.runner import Snapshot, check, check_seed, check_spec, clear_refusal

import fimfast

CI_COUNT = 200

# constructs every CI run contains (tags of fuzz.grammar.features)
REQUIRED = {f"stem:{k}" for k in ("vec", "tokens", "fseq", "bag", "sig", "img", "vol")}
REQUIRED |= {"task:cls", "task:token", "token:mask", "kpm", "bag:offsets=True",
             "bag:offsets=False"}
REQUIRED |= {f"out:{o}" for o in ("tensor", "tuple", "dict", "hf")}
REQUIRED |= {"batch:tuple", "batch:dict", "mode:train", "mode:eval"}
REQUIRED |= {"head:linear", "head:flinear", "head:tied_emb", "head:temp"}
REQUIRED |= {"compile:eager", "compile:aot_eager"}
REQUIRED |= {f"op:{o}" for o in ("linear", "flinear", "norm", "act", "reuse", "tied", "mix",
                                 "mha", "tel", "rnn", "conv_t", "conv", "convT", "pool")}
REQUIRED |= {f"{o}:{lay}" for o in ("mha", "tel", "rnn") for lay in ("bf", "sf")}
REQUIRED |= {"rnn:rnn", "rnn:lstm", "rnn:gru"}
REQUIRED |= {f"norm:{k}" for k in ("layer", "rms", "group", "batch")}
REQUIRED |= {"norm:batch:train=True", "norm:batch:train=False"}
REQUIRED |= {"norm:instance", "norm:instance:train=True", "norm:instance:train=False",
             "norm:instance:affine+running", "norm:instance:affine=False"}
REQUIRED |= {"act:prelu:1", "act:prelu:c", "linear:bilinear", "linear:flat:bf", "linear:flat:sf"}
REQUIRED |= {"conv1d", "conv2d", "conv3d", "convT1d", "convT2d"}
REQUIRED |= {"tied:same", "tied:transpose", "mix:cumsum", "mix:mean", "mix:roll"}
REQUIRED |= {"res", "ckpt:reentrant=True", "ckpt:reentrant=False", "hook:out", "hook:pre"}
REQUIRED |= {"sizes:T==N==C", "sizes:d==N", "input:sf"}


def ci_seeds(count: int = CI_COUNT) -> list[int]:
    """The first ``count`` seeds whose model does not compile with inductor (too slow for CI),
    then, for each construct of :data:`REQUIRED` they lack, the first seed that has it."""
    ok = (s for s in itertools.count() if not plan(s).inductor)
    seeds = list(itertools.islice(ok, count))
    seen = set().union(*(features(plan(s)) for s in seeds))
    for tag in sorted(REQUIRED - seen):
        if tag in seen:
            continue
        s = next(s for s in itertools.count(seeds[-1] + 1)
                 if not plan(s).inductor and tag in features(plan(s)))
        seeds.append(s)
        seen |= features(plan(s))
    return seeds


def _selected() -> list[int]:
    replay = os.environ.get("FIMFAST_FUZZ_SEED", "").strip()
    if replay:
        return [int(s) for s in replay.replace(" ", ",").split(",") if s]
    n = os.environ.get("FIMFAST_FUZZ", "").strip()
    if n:
        start = int(os.environ.get("FIMFAST_FUZZ_START", "0"))
        return list(range(start, start + int(n)))
    return ci_seeds()


def _params():
    for s in _selected():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[s])] if s in KNOWN else []
        yield pytest.param(s, marks=marks, id=f"seed{s}")


@pytest.mark.parametrize("seed", list(_params()))
def test_fuzz_model(seed):
    out = check_seed(seed)
    assert out.ok, "\n" + out.report()


# --------------------------------------------------------------------------------------------- #
# the fuzzer itself
# --------------------------------------------------------------------------------------------- #
def test_ci_seeds_cover_the_grammar():
    """Every construct of the grammar appears in the CI models (plans only: cheap)."""
    seen: set[str] = set()
    for s in ci_seeds():
        seen |= features(plan(s))
    assert REQUIRED <= seen, sorted(REQUIRED - seen)
    # the first CI_COUNT seeds alone cover all but a few
    first = set().union(*(features(plan(s)) for s in ci_seeds()[:CI_COUNT]))
    assert len(REQUIRED - first) <= 3, sorted(REQUIRED - first)


def test_known_failures_are_ci_seeds():
    assert set(KNOWN) <= set(ci_seeds())


def test_replay_is_deterministic():
    for s in (3, 11, 17):
        a, b = build(plan(s)), build(plan(s))
        assert describe(a.spec) == describe(b.spec)
        for (n, p), (m, q) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
            assert n == m and torch.equal(p, q)
        xa = a.batch["input_ids"] if isinstance(a.batch, dict) else a.batch[0]
        xb = b.batch["input_ids"] if isinstance(b.batch, dict) else b.batch[0]
        assert torch.equal(xa, xb) and torch.equal(a.labels, b.labels)


def _mlp_spec() -> Spec:
    lin = {"op": "linear", "din": 4, "dout": 5, "bias": True, "act": "tanh", "res": False,
           "ckpt": None, "hook": None}
    return Spec(seed=7, N=4, T=1, C=3, stem={"kind": "vec", "F": 4}, blocks=[lin],
                head={"type": "linear", "din": 5, "temp": None, "hook": None})


def test_checker_passes_a_plain_mlp():
    out = check_spec(_mlp_spec())
    assert out.status == "pass", out.report()
    assert max(out.errors.values()) <= 1e-12


def test_checker_catches_a_wrong_estimate(monkeypatch):
    real = fimfast.DiagFisher.result

    def off(self):
        F = real(self)
        name = next(iter(F))
        F[name].mul_(1 + 1e-8)  # far below float32 rounding, far above float64's
        return F

    monkeypatch.setattr(fimfast.DiagFisher, "result", off)
    out = check_spec(_mlp_spec())
    assert out.status == "fail"
    assert {"exact:value", "empirical:value", "monte_carlo:value"} <= out.signature


def test_checker_catches_state_changes(monkeypatch):
    spec = _mlp_spec()
    spec.vblocks = [{"op": "norm", "kind": "batch", "train": True, "affine": True,
                     "stats": True, "momentum": 0.1, "res": False, "ckpt": None, "hook": None}]
    spec.head["din"] = 5
    real = fimfast.DiagFisher.step

    def leaky(self, batch):
        real(self, batch)
        bn = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm1d)][0]
        with torch.no_grad():
            bn.running_mean.add_(1.0)
        bn.eval()
        next(self.model.parameters()).grad = None

    monkeypatch.setattr(fimfast.DiagFisher, "step", leaky)
    out = check_spec(spec, types=("exact",))
    assert out.status == "fail"
    assert {"exact:state:buffer", "exact:state:mode", "exact:state:grad"} <= out.signature


def test_snapshot_restore_round_trip():
    case = build(plan(3))
    snap = Snapshot.of(case.model)
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(1.0)
    case.model.train(not case.model.training)
    assert snap.diff(case.model)
    snap.restore(case.model)
    assert snap.diff(case.model) == []


def _raise_in(filename: str, exc: BaseException):
    ns: dict = {}
    exec(compile("def f(e):\n    raise e\n", filename, "exec"), ns)  # noqa: S102
    try:
        ns["f"](exc)
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("not raised")


def test_refusal_must_be_fimfast_and_name_the_construct():
    case = build(plan(5))  # attention, sequence first
    inside = os.path.join(os.path.dirname(fimfast.__file__), "persample.py")
    ok = _raise_in(inside, NotImplementedError("MultiheadAttention with kdim != embed_dim"))
    assert clear_refusal(ok, case)
    assert not clear_refusal(_raise_in(inside, ValueError("unsupported model")), case)
    assert not clear_refusal(_raise_in(inside, RuntimeError("multiheadattention")), case)
    assert not clear_refusal(_raise_in(__file__, ValueError("multiheadattention")), case)
    wrapped = _raise_in(inside, ValueError("multiheadattention"))
    wrapped.__cause__ = _raise_in(__file__, RuntimeError("shape mismatch"))
    assert not clear_refusal(wrapped, case)


def test_sequence_rows_oracle_is_another_matrix():
    """The per-sequence oracle differs from the per-token one (the check can tell them apart)."""
    from fuzz.runner import oracles

    seed = next(s for s in ci_seeds() if plan(s).task == "token" and plan(s).T > 1)
    refs, _ = oracles(build(plan(seed)))
    a = torch.cat([v.reshape(-1) for v in refs["empirical"].values()])
    b = torch.cat([v.reshape(-1) for v in refs["empirical+seq"].values()])
    assert (a - b).norm() > 1e-3 * a.norm()


def test_check_reports_the_seed_and_description():
    out = check(build(_mlp_spec()), types=("exact",))
    assert "FIMFAST_FUZZ_SEED=7" in out.report() and describe(_mlp_spec()) in out.report()
