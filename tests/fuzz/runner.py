"""Check one fuzzed model: fimfast's per-sample estimators against the float64 oracle.

For each of EXACT, EMPIRICAL and MONTE_CARLO, ``fimfast.DiagFisher(model, t, reduction="sum")``
takes one ``step`` on the case's batch and its result is compared, parameter tensor by parameter
tensor, with the brute-force oracle of ``tests/oracle.py`` (every valid row's full Jacobian, one
output coordinate at a time, on the eager model without checkpointing):

* EXACT: ``sum_r diag(J_r^T I(z_r) J_r)``, evaluated as ``sum_r sum_c p_rc (J_rc - Jbar_r)^2``
  with ``Jbar_r = sum_c p_rc J_rc`` (the same number; the form ``J^T (diag p - p p^T) J`` of
  ``oracle.quad_diag`` loses ``eps / (1 - max p)`` to cancellation, ~1e-10 at a softmax
  saturated to ``1 - p = 1e-6``, which the fuzzer's models reach);
* EMPIRICAL: ``sum_r (J_r^T (e_{y_r} - p_r))^2``;
* MONTE_CARLO (``seed`` fixed, ``num_probes = 2``): the same-seed oracle, which draws the labels
  from the documented counter-based stream (:func:`fimfast.ops.rng.uniform`, counter
  ``s * R + r`` for draw ``s`` of row ``r``) by its own inverse CDF and sums
  ``(J_r^T (e_yhat - p_r))^2 / S``. A row whose uniform falls within 1e-12 of a step of the CDF
  (where rounding could pick the neighbouring class) makes the check inconclusive: it is skipped.
* token-level models, where fimfast has the option ``sequence_rows`` (one row per sequence, the
  scores of its tokens summed before the square), also ``empirical+seq`` and
  ``monte_carlo+seq``: ``sum_n (sum_{t in n} J_nt^T u_nt)^2`` with the scores above.

A tensor passes when ``|got - ref| <= REL * |ref|`` (Frobenius norms) with ``REL = 1e-10``, or
when ``|got - ref| <= REL * FLOOR * |ref of all|`` (``FLOOR = 1e-3``: within 1e-13 of the whole
estimate). The second bound covers parameters that are nearly invariant by a symmetry (the bias
of a Linear in front of a train-mode BatchNorm, weights in front of a normalisation over two
values or of batch statistics over two samples): their small entries are the rounding noise of
much larger, cancelling terms, and two correct evaluations (row by row, or batched) differ there
by up to ~1e-8 relative.

Around every step the model must be left as it was: parameter values and objects, buffers
(BatchNorm running statistics), ``.grad`` (set to sentinels before), ``requires_grad``, the
train/eval mode of every module, and its hooks.

A step may instead *refuse* the model: that passes only if the error is a ``ValueError``,
``TypeError`` or ``NotImplementedError`` raised by fimfast itself (its whole cause chain) whose
message names one of the model's constructs (a module class, ``checkpoint``, ``hook``,
``compile``, ...), and the model is left as it was. Anything else is a failure.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

import fimfast
from fimfast.ops import rng
from fuzz.grammar import Case, Spec, build, describe, logits_of, plan, without_checkpoint

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from oracle import RowJacobians, oracle_flat, row_jacobians  # noqa: E402

REL = 1e-10
FLOOR = 1e-3
MC_SEED = 20261206
MC_PROBES = 2
MC_BOUNDARY = 1e-12
TYPES = ("exact", "empirical", "monte_carlo", "empirical+seq", "monte_carlo+seq")
SEQ_TYPES = ("empirical+seq", "monte_carlo+seq")
_FIMFAST_DIR = os.path.dirname(os.path.abspath(fimfast.__file__))


@dataclass
class Outcome:
    """The verdict on one model.

    Attributes:
        seed, desc: the model (``desc`` is :func:`fuzz.grammar.describe`).
        status: ``pass``, ``refused`` (a clear fimfast error: passes) or ``fail``.
        failures: one line per problem, each starting with ``<type>:`` and a category
            (``value``, ``state``, ``error``, ``harness``).
        errors: relative error per type (the worst tensor).
        seconds: wall time of the check.
    """

    seed: int
    desc: str
    status: str = "pass"
    failures: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    @property
    def signature(self) -> frozenset[str]:
        """Categories of the failures (``exact:value``, ``empirical:state:buffer``, ...)."""
        return frozenset(_category(f) for f in self.failures)

    def report(self) -> str:
        """A readable report with the replay command."""
        lines = [f"fuzz model FIMFAST_FUZZ_SEED={self.seed}: {self.status}", f"  {self.desc}"]
        lines += [f"  - {f}" for f in self.failures]
        lines += [f"  refused: {r}" for r in self.refusals]
        return "\n".join(lines)


def _category(failure: str) -> str:
    t, rest = failure.split(":", 1)
    cat, _, detail = rest.partition(":")
    if cat in ("state", "error"):
        cat += ":" + detail.strip().split(" ")[0].rstrip(":")
    return f"{t}:{cat}"


# --------------------------------------------------------------------------------------------- #
# oracle
# --------------------------------------------------------------------------------------------- #
class _OracleCase:
    """What tests/oracle.py reads from a case."""

    def __init__(self, case: Case):
        self.model = without_checkpoint(case.net)
        self.batch = case.batch
        self.valid = case.valid
        self.labels = case.labels
        self.likelihood = "categorical"
        self.token_sf = case.spec.seq_first_input and case.spec.task == "token"

    def batch_double(self) -> Any:
        return self.batch  # already float64

    def logits_fn(self, model, batch):
        if isinstance(batch, dict):
            z = logits_of(model(**{k: v for k, v in batch.items() if k != "labels"}))
        else:
            z = logits_of(model(batch[0]))
        if self.token_sf:  # (T, N, C) -> (N, T, C): the rows in fimfast's order
            z = z.transpose(0, 1)
        return z


def exact_oracle(rj: RowJacobians) -> torch.Tensor:
    """Flat EXACT estimate ``sum_r sum_c p_rc (J_rc - Jbar_r)^2`` (no cancellation)."""
    p = torch.softmax(rj.z, -1)
    dev = rj.J - torch.einsum("rc,rcp->rp", p, rj.J).unsqueeze(1)
    return torch.einsum("rc,rcp->p", p, dev.square())


def mc_oracle(rj: RowJacobians, seed: int, offset: int, S: int,
              sample: torch.Tensor | None = None) -> torch.Tensor | None:
    """Flat MONTE_CARLO estimate for ``seed`` (``None``: a uniform lies at a CDF step); with
    ``sample`` (the sequence of every row), the scores of a sequence's rows are summed before
    the square."""
    z = rj.z
    R, C = z.shape
    p = torch.softmax(z, -1)
    u = rng.uniform(seed, offset, (S, R), torch.float64)
    cdf = torch.cumsum(p, -1)
    if float((cdf[:, :-1].unsqueeze(0) - u.unsqueeze(-1)).abs().min()) < MC_BOUNDARY:
        return None
    y = (cdf.unsqueeze(0) <= u.unsqueeze(-1)).sum(-1).clamp_max(C - 1)  # (S, R)
    score = torch.nn.functional.one_hot(y, C).double() - p.unsqueeze(0)
    g = torch.einsum("src,rcp->srp", score, rj.J)
    if sample is not None:
        g = _by_sequence(g, sample)
    return g.square().sum((0, 1)) / S


def _by_sequence(g: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """``(S, R, P)`` per-row terms -> ``(S, N, P)`` sums over the rows of each sequence."""
    out = torch.zeros(g.shape[0], int(sample.max()) + 1, g.shape[2], dtype=g.dtype)
    return out.index_add_(1, sample, g)


def oracles(case: Case) -> tuple[dict[str, dict[str, torch.Tensor] | None], list[str]]:
    """``{type: {name: tensor}}`` for every type (``None``: inconclusive) and the names."""
    rj = row_jacobians(_OracleCase(case))
    out: dict[str, dict[str, torch.Tensor] | None] = {}
    out["exact"] = rj.split(exact_oracle(rj))
    out["empirical"] = rj.split(oracle_flat(rj, "categorical", "empirical"))
    mc = mc_oracle(rj, MC_SEED, 0, MC_PROBES)
    out["monte_carlo"] = None if mc is None else rj.split(mc)
    if case.spec.task == "token":
        T = case.valid.shape[1]
        sample = case.valid.reshape(-1).nonzero().squeeze(-1) // T
        p = torch.softmax(rj.z, -1)
        score = torch.nn.functional.one_hot(rj.labels.long(), rj.z.shape[-1]).double() - p
        g = torch.einsum("rc,rcp->rp", score, rj.J).unsqueeze(0)
        out["empirical+seq"] = rj.split(_by_sequence(g, sample).square().sum((0, 1)))
        mc = mc_oracle(rj, MC_SEED, 0, MC_PROBES, sample)
        out["monte_carlo+seq"] = None if mc is None else rj.split(mc)
    return out, rj.names


# --------------------------------------------------------------------------------------------- #
# the model's state around a step
# --------------------------------------------------------------------------------------------- #
def _hooks(m: torch.nn.Module) -> tuple:
    return tuple(len(getattr(m, a, {}) or {}) for a in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_load_state_dict_pre_hooks"))


@dataclass
class Snapshot:
    params: dict[str, tuple[int, torch.Tensor, bool]]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor | None]
    modes: dict[str, bool]
    hooks: dict[str, tuple]
    global_hooks: tuple

    @classmethod
    def of(cls, model: torch.nn.Module) -> Snapshot:
        from torch.nn.modules import module as M

        named = list(model.named_parameters())
        return cls(
            params={n: (id(p), p.detach().clone(), p.requires_grad) for n, p in named},
            grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in named},
            buffers={n: None if b is None else b.detach().clone()
                     for n, b in model.named_buffers()},
            modes={n: m.training for n, m in model.named_modules()},
            hooks={n: _hooks(m) for n, m in model.named_modules()},
            global_hooks=tuple(len(getattr(M, a, {})) for a in (
                "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")),
        )

    def diff(self, model: torch.nn.Module) -> list[str]:
        """What ``model`` changed since the snapshot (``state:<what> ...`` lines)."""
        now = Snapshot.of(model)
        out = []
        live = dict(model.named_parameters())
        for n, (pid, v, rg) in self.params.items():
            if n not in now.params:
                out.append(f"state:param {n} is gone")
                continue
            if id(live[n]) != pid:
                out.append(f"state:param {n} was replaced by another tensor")
            if not torch.equal(now.params[n][1], v):
                out.append(f"state:param {n} changed (max |delta| "
                           f"{float((now.params[n][1] - v).abs().max()):.3g})")
            if now.params[n][2] != rg:
                out.append(f"state:requires_grad of {n} changed to {now.params[n][2]}")
        for n, g in self.grads.items():
            h = now.grads.get(n)
            if (g is None) != (h is None) or (g is not None and not torch.equal(g, h)):
                out.append(f"state:grad of {n} changed ({'set' if g is None else 'modified'})")
        for n, b in self.buffers.items():
            c = now.buffers.get(n)
            if (b is None) != (c is None) or (b is not None and (
                    b.shape != c.shape or not torch.equal(b, c))):
                what = "" if b is None or c is None or b.shape != c.shape else (
                    f" (max |delta| {float((c.double() - b.double()).abs().max()):.3g})")
                out.append(f"state:buffer {n} changed{what}")
        if set(now.buffers) != set(self.buffers):
            out.append(f"state:buffer set changed: {sorted(set(now.buffers) ^ set(self.buffers))}")
        for n, t in self.modes.items():
            if now.modes.get(n) != t:
                out.append(f"state:mode of {n or 'model'} changed to "
                           f"{'train' if now.modes.get(n) else 'eval'}")
        for n, h in self.hooks.items():
            if now.hooks.get(n) != h:
                out.append(f"state:hooks of {n or 'model'} changed {h} -> {now.hooks.get(n)}")
        if now.global_hooks != self.global_hooks:
            out.append("state:global module hooks changed")
        return out

    def restore(self, model: torch.nn.Module) -> None:
        """Put values, gradients, buffers and modes back (after a step that changed them)."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.params:
                    p.copy_(self.params[n][1])
                    p.requires_grad_(self.params[n][2])
                    g = self.grads[n]
                    p.grad = None if g is None else g.clone()
            for n, b in model.named_buffers():
                if self.buffers.get(n) is not None and b.shape == self.buffers[n].shape:
                    b.copy_(self.buffers[n])
        for n, m in model.named_modules():
            if n in self.modes:
                m.training = self.modes[n]


def _sentinel_grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 17)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) if i % 2 == 0 else None


# --------------------------------------------------------------------------------------------- #
# refusals
# --------------------------------------------------------------------------------------------- #
def _raised_in_fimfast(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_FIMFAST_DIR)


def clear_refusal(exc: BaseException, case: Case) -> bool:
    """Whether ``exc`` is a clear refusal: a ValueError/TypeError/NotImplementedError raised by
    fimfast (and every cause in its chain too: not a wrapped failure of the model's forward or of
    torch) whose message names a construct of the model."""
    if not isinstance(exc, (ValueError, TypeError, NotImplementedError)):
        return False
    e: BaseException | None = exc
    while e is not None:
        if not _raised_in_fimfast(e):
            return False
        e = e.__cause__ or e.__context__
    msg = str(exc).lower()
    return any(w in msg for w in case.words)


# --------------------------------------------------------------------------------------------- #
# the check
# --------------------------------------------------------------------------------------------- #
def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], prefix: str
            ) -> tuple[float, list[str]]:
    """Worst relative error over the tensors of ``ref`` and one line per failing tensor."""
    total = torch.sqrt(sum(r.double().square().sum() for r in ref.values()))
    floor = FLOOR * float(total)
    worst, bad = 0.0, []
    names = [prefix + n for n in ref]
    if sorted(got) != sorted(names):
        bad.append(f"value: result names {sorted(got)} != parameters {sorted(names)}")
        return float("inf"), bad
    for n, r in ref.items():
        g = got[prefix + n].double()
        if g.shape != r.shape:
            bad.append(f"value: {n} has shape {tuple(g.shape)}, expected {tuple(r.shape)}")
            worst = float("inf")
            continue
        err = float((g - r).norm())
        den = max(float(r.norm()), floor)
        rel = err / den if den > 0 else (0.0 if err == 0 else float("inf"))
        worst = max(worst, rel)
        if not rel <= REL:
            bad.append(f"value: {n} rel err {rel:.3g} (|got| {float(g.norm()):.6g}, "
                       f"|oracle| {float(r.norm()):.6g})")
    return worst, bad


def _run_type(case: Case, t: str) -> dict[str, torch.Tensor]:
    opts: dict[str, Any] = {"likelihood": "categorical"}
    if t in SEQ_TYPES:
        t = t.removesuffix("+seq")
        opts["sequence_rows"] = True
    if case.spec.states_class_dim and "class_dim" in fimfast.Options.names():
        opts["class_dim"] = -1  # (N, T, C), or (T, N, C) with batch_dim=1
    if case.spec.seq_first_input and "batch_dim" in fimfast.Options.names():
        opts["batch_dim"] = 1
    if t == "monte_carlo":
        opts.update(seed=MC_SEED, num_probes=MC_PROBES)
    est = fimfast.DiagFisher(case.model, t, reduction="sum", **opts)
    est.step(case.batch)
    return dict(est.result())


def check(case: Case, types: tuple[str, ...] = TYPES) -> Outcome:
    """Run every type of ``types`` on ``case`` and compare (see the module docstring)."""
    t0 = time.perf_counter()
    out = Outcome(case.spec.seed, describe(case.spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            refs, _ = oracles(case)
        except Exception as exc:  # noqa: BLE001 - a fuzzer bug: reported, never hidden
            out.status = "fail"
            out.failures.append(f"all:harness: the oracle failed: {type(exc).__name__}: {exc}")
            out.seconds = time.perf_counter() - t0
            return out
        if case.spec.compile:
            torch._dynamo.reset()
        _sentinel_grads(case.model, case.spec.seed)
        for t in types:
            if t in SEQ_TYPES and (case.spec.task != "token"
                                   or "sequence_rows" not in fimfast.Options.names()):
                continue
            snap = Snapshot.of(case.model)
            try:
                got = _run_type(case, t)
            except Exception as exc:  # noqa: BLE001 - classified below
                if clear_refusal(exc, case):
                    out.refusals.append(f"{t}: {type(exc).__name__}: {exc}")
                else:
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    out.failures.append(
                        f"{t}:error: {type(exc).__name__}: {str(exc)[:400]} "
                        f"(at {os.path.basename(where.filename)}:{where.lineno})")
                got = None
            changed = snap.diff(case.model)
            out.failures += [f"{t}:{c}" for c in changed]
            if changed:
                snap.restore(case.model)
            if got is None:
                continue
            ref = refs[t]
            if ref is None:  # a MONTE_CARLO draw at a CDF step: inconclusive
                continue
            worst, bad = compare(got, ref, case.prefix)
            out.errors[t] = worst
            out.failures += [f"{t}:{b}" for b in bad]
    if out.failures:
        out.status = "fail"
    elif out.refusals:
        out.status = "refused"
    out.seconds = time.perf_counter() - t0
    return out


def check_spec(spec: Spec, types: tuple[str, ...] = TYPES) -> Outcome:
    """Build and check ``spec`` (a build failure is a harness failure)."""
    try:
        case = build(spec.copy())
    except Exception as exc:  # noqa: BLE001 - a grammar bug: reported
        return Outcome(spec.seed, describe(spec), "fail",
                       [f"all:harness: build failed: {type(exc).__name__}: {exc}"])
    return check(case, types)


def check_seed(seed: int, allow_inductor: bool = True, types: tuple[str, ...] = TYPES
               ) -> Outcome:
    """Plan, build and check the model of ``seed``."""
    return check_spec(plan(seed, allow_inductor), types)


# --------------------------------------------------------------------------------------------- #
# shrinking
# --------------------------------------------------------------------------------------------- #
def _simplifications(spec: Spec):
    """Smaller variants of ``spec``, one change each (same sizes: blocks that change the feature
    size stay)."""
    def var(f):
        s = spec.copy()
        f(s)
        return s

    if spec.compile:
        yield var(lambda s: setattr(s, "compile", None))
    for lst in ("blocks", "vblocks"):
        for i, b in enumerate(getattr(spec, lst)):
            same = (b.get("din") == b.get("dout")) if "din" in b else (
                b.get("fin") == b.get("fout"))
            if same:
                yield var(lambda s, i=i, lst=lst: getattr(s, lst).pop(i))
            for k, v in (("hook", None), ("ckpt", None), ("res", False), ("bias_kv", False),
                         ("causal", False), ("kv", None), ("weights", False), ("layers", 1),
                         ("act", None), ("proj", None), ("norm_first", False)):
                if k in b and b[k] != v and not (k == "act" and b["op"] in ("act", "reuse",
                                                                            "tied")):
                    if k == "proj" and b.get("bi"):
                        continue
                    yield var(lambda s, i=i, k=k, v=v, lst=lst: getattr(s, lst)[i].update({k: v}))
            if b["op"] == "rnn" and b["bi"] and b["proj"] is None and b["dout"] % 2 == 0 \
                    and b["hidden"] * 2 == b["dout"]:
                pass
    for k, v in (("temp", None), ("hook", None)):
        if spec.head.get(k) is not None:
            yield var(lambda s, k=k, v=v: s.head.update({k: v}))
    if spec.head["type"] == "flinear":
        yield var(lambda s: s.head.update({"type": "linear"}))
    if spec.out != "tensor":
        yield var(lambda s: setattr(s, "out", "tensor"))
    if spec.kpm:
        yield var(lambda s: setattr(s, "kpm", False))
    if spec.mask and not spec.kpm:
        yield var(lambda s: setattr(s, "mask", False))
    if spec.batch == "dict" and not spec.mask:
        yield var(lambda s: setattr(s, "batch", "tuple"))
    if spec.mode == "train":
        yield var(lambda s: setattr(s, "mode", "eval"))


def shrink(spec: Spec, keeps_failing, max_checks: int = 200) -> Spec:
    """Greedy one-change-at-a-time simplification of ``spec`` while ``keeps_failing(spec)``."""
    checks = 0
    changed = True
    while changed and checks < max_checks:
        changed = False
        for s in _simplifications(spec):
            checks += 1
            if keeps_failing(s):
                spec, changed = s, True
                break
            if checks >= max_checks:
                break
    return spec
