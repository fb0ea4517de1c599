"""Estimator types and options, validated at the public boundary."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any


class UnsupportedModelError(ValueError):
    """The model uses a construct fimfast cannot estimate exactly for the requested type.

    fimfast refuses such a model instead of returning a number it cannot vouch for; the message
    names the construct and says what to change (see ``docs/exactness.md``)."""


class FIMType(str, enum.Enum):
    """What a step estimates. Strings (``"hutchinson"``) are accepted wherever a type is.

    ========================  ========================================================  ==========
    member                    estimate of                                                cost
    ========================  ========================================================  ==========
    ``EXACT``                 diag F, deterministic (C backward columns, per-sample)      per-sample
    ``EMPIRICAL``             diag of the empirical Fisher ``sum_n g_n g_n^T`` (labels)  per-sample
    ``MONTE_CARLO``           diag F, unbiased, one sampled label per draw (Soen & Sun)  per-sample
    ``HUTCHINSON``            diag F, unbiased, one backward per probe                    1 backward
    ``HUTCHINSON_SQRT``       diag F, same law as HUTCHINSON, through ``log_softmax``     1 backward
    ``HUTCHINSON_DG``         upper bound ``diag sum_n J^T diag(p) J >= diag F``          1 backward
    ``HUTCHINSON_RANKK``      lower bound ``diag sum_n J^T I_k J <= diag F`` (top-k)      1 backward
    ``HUTCHINSON_RANK1``      RANKK with ``k = 1``                                        1 backward
    ========================  ========================================================  ==========
    """

    EXACT = "exact"
    EMPIRICAL = "empirical"
    MONTE_CARLO = "monte_carlo"
    HUTCHINSON = "hutchinson"
    HUTCHINSON_SQRT = "hutchinson_sqrt"
    HUTCHINSON_DG = "hutchinson_dg"
    HUTCHINSON_RANKK = "hutchinson_rankk"
    HUTCHINSON_RANK1 = "hutchinson_rank1"

    @classmethod
    def parse(cls, value: FIMType | str, name: str = "fim_type") -> FIMType:
        """Accept a member, its value or its name (case-insensitive)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            m = cls._value2member_map_.get(value)  # a value as written: one dict lookup
            if m is not None:
                return m
            key = value.strip().lower()
            for m in cls:
                if key in (m.value, m.name.lower()):
                    return m
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")

    @property
    def is_per_sample(self) -> bool:
        """True for the types computed from per-sample squared gradients."""
        return self in (FIMType.EXACT, FIMType.EMPIRICAL, FIMType.MONTE_CARLO)

    @property
    def is_random(self) -> bool:
        """True for the stochastic estimators."""
        return self not in (FIMType.EXACT, FIMType.EMPIRICAL)


LIKELIHOODS = ("categorical", "bernoulli", "gaussian")
REDUCTIONS = ("sum", "mean")
DISTRIBUTED = ("auto", "none")


@dataclass(frozen=True)
class Options:
    """Options of an estimator (the keys of ``fim_opts``; keyword arguments of ``DiagFisher``).

    Attributes:
        num_probes: probes (HUTCHINSON family) or label draws (MONTE_CARLO) per step, ``>= 1``.
        lr_power_itrs: power iterations of ``rankk_solver="power"``, ``>= 1``.
        top_k: eigenpairs kept by HUTCHINSON_RANKK, ``1 <= top_k <= C - 1`` (RANK1 forces 1).
        seed: 64-bit seed of the counter-based generator; ``None`` draws one from torch's default
            generator when the estimator is created, so ``torch.manual_seed`` reproduces a run.
        backend: kernel backend, ``auto|torch|triton|cuda|cpp``.
        class_chunk: output columns per batched backward of EXACT; ``None`` picks as many as
            fit what one training step holds, at most the memory budget
            (``FIMFAST_MEMORY_BUDGET_MB``; fimfast/chunks.py, ``fast_columns``).
        rankk_solver: ``exact`` (secular equation) or ``power`` (the paper's power iteration).
        likelihood: ``categorical`` (softmax), ``bernoulli`` (multi-label) or ``gaussian``.
        sigma2: variance of the ``gaussian`` likelihood, ``> 0``.
        ignore_index: label value of tokens left out of the Fisher (token-level outputs).
        forward_fn: ``forward_fn(model, batch) -> output`` for batches of any other shape.
        shift_labels: pair the logits at position ``t`` with the label at ``t + 1`` (causal LMs,
            as their own loss does; see :mod:`fimfast.batch`): ``True``, ``False``, or ``"auto"``
            (the default: ``True`` for the Hugging Face causal-LM classes, ``False`` otherwise).
        distributed: ``"auto"`` (the default): when ``torch.distributed`` is initialised with more
            than one rank, reading the estimate (``result()``, ``get_diag_fim``) sums states and
            counts over the ranks of ``process_group``, and every rank draws its own probes;
            ``"none"``: each rank keeps and reads its own shard's estimate.
        process_group: the ``torch.distributed`` group to reduce over (``None``: the default
            group).
        lm_head: ``None`` (the default), or the model's Linear output head (its module name, such
            as ``"lm_head"``, or the ``nn.Linear`` itself): HUTCHINSON, HUTCHINSON_SQRT and
            HUTCHINSON_DG steps (categorical likelihood) then never form the ``(tokens x V)``
            logits nor their cotangent: the probes run through the head in row chunks
            (:func:`fimfast.ops.lm_head_probe`, see :mod:`fimfast.lm_head`), with the signs and
            the estimate of the unfused step. ``train_step`` does not take it.
        class_dim: the class axis of logits with 3 or more dims (``-1``: token-level
            ``(N, T, C)``; ``1``: ``CrossEntropyLoss``'s ``(N, C, d1, ...)``). ``None`` (the
            default) never guesses: a Hugging Face output is ``(N, T, C)``, categorical labels
            decide when their shape fits one layout only, anything else is refused (see
            :func:`fimfast.layout.layout`).
        batch_dim: the batch axis of the inputs and of logits with 3 or more dims (``1`` for
            sequence-first models, ``(T, N, ...)``); 2-D logits are always ``(N, C)``.
        sequence_rows: token-level logits only, MONTE_CARLO and EMPIRICAL only: one row per
            sequence, whose tokens' score columns are summed before the square, instead of one
            row per token (one backward column per draw instead of one per position when
            attention or recurrence couples the tokens). MONTE_CARLO draws every token's label
            independently, so the cross-token terms vanish in expectation: still unbiased for the
            token-level Fisher, with more variance. EMPIRICAL then estimates a different matrix,
            ``sum_n (sum_t g_nt)(sum_t g_nt)^T``: the empirical Fisher of whole-sequence
            log-likelihoods (see ``docs/math.md`` §3).
    """

    num_probes: int = 1
    lr_power_itrs: int = 30
    top_k: int = 2
    seed: int | None = None
    backend: str = "auto"
    class_chunk: int | None = None
    rankk_solver: str = "exact"
    likelihood: str = "categorical"
    sigma2: float = 1.0
    ignore_index: int = -100
    forward_fn: Callable[[Any, Any], Any] | None = None
    shift_labels: bool | str = "auto"
    distributed: str = "auto"
    process_group: Any = None
    lm_head: Any = None
    class_dim: int | None = None
    batch_dim: int = 0
    sequence_rows: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The valid option names."""
        got = cls.__dict__.get("_names")
        if got is None:  # fields() walks the dataclass each call: kept per class
            got = tuple(f.name for f in fields(cls))
            cls._names = got
        return got

    @classmethod
    def from_dict(cls, opts: Mapping[str, Any] | None, base: Options | None = None) -> Options:
        """Validated options from a ``fim_opts`` mapping (unknown keys raise ``ValueError``)."""
        opts = {} if opts is None else opts
        if not isinstance(opts, Mapping):
            raise TypeError(f"fim_opts must be a mapping (dict); got {type(opts).__name__}")
        unknown = sorted(set(opts) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"fim_opts has unknown key(s) {unknown}; valid keys are {sorted(cls.names())}"
            )
        out = replace(base if base is not None else cls(), **dict(opts))
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad option."""
        for name in ("num_probes", "lr_power_itrs", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"fim_opts[{name!r}] must be an integer >= 1; got {v!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"fim_opts['seed'] must be an integer or None; got {self.seed!r}")
        if self.backend not in ("auto", "torch", "triton", "cuda", "cpp"):
            raise ValueError(
                "fim_opts['backend'] must be one of auto, torch, triton, cuda, cpp; "
                f"got {self.backend!r}"
            )
        cc = self.class_chunk
        if cc is not None and (isinstance(cc, bool) or not isinstance(cc, int) or cc < 1):
            raise ValueError(f"fim_opts['class_chunk'] must be an integer >= 1 or None; got {cc!r}")
        if self.rankk_solver not in ("exact", "power"):
            raise ValueError(
                f"fim_opts['rankk_solver'] must be 'exact' or 'power'; got {self.rankk_solver!r}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"fim_opts['likelihood'] must be one of {LIKELIHOODS}; got {self.likelihood!r}"
            )
        if not isinstance(self.sigma2, (int, float)) or not self.sigma2 > 0:
            raise ValueError(f"fim_opts['sigma2'] must be a number > 0; got {self.sigma2!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(
                f"fim_opts['ignore_index'] must be an integer; got {self.ignore_index!r}"
            )
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(f"fim_opts['forward_fn'] must be callable; got {self.forward_fn!r}")
        if not isinstance(self.shift_labels, bool) and self.shift_labels != "auto":
            raise ValueError(
                f"fim_opts['shift_labels'] must be True, False or 'auto'; got {self.shift_labels!r}"
            )
        if self.distributed not in DISTRIBUTED:
            raise ValueError(
                f"fim_opts['distributed'] must be one of {DISTRIBUTED}; got {self.distributed!r}"
            )
        pg = self.process_group
        if pg is not None:
            import torch.distributed as dist

            if not (dist.is_available() and isinstance(pg, dist.ProcessGroup)):
                raise TypeError(
                    "fim_opts['process_group'] must be None or a torch.distributed.ProcessGroup; "
                    f"got {type(pg).__name__}"
                )

        for name in ("class_dim", "batch_dim"):
            v = getattr(self, name)
            if (v is not None or name == "batch_dim") and (
                isinstance(v, bool) or not isinstance(v, int)
            ):
                raise ValueError(f"fim_opts[{name!r}] must be an integer axis; got {v!r}")
        if not isinstance(self.sequence_rows, bool):
            raise ValueError(
                f"fim_opts['sequence_rows'] must be True or False; got {self.sequence_rows!r}"
            )
        if self.batch_dim < 0:
            raise ValueError(
                f"fim_opts['batch_dim'] must be >= 0 (an axis of the inputs); got {self.batch_dim}"
            )
        lm = self.lm_head
        if lm is not None and not (isinstance(lm, str) and lm):
            import torch

            if not isinstance(lm, torch.nn.Linear):
                got = repr(lm) if isinstance(lm, str) else type(lm).__name__
                raise ValueError(
                    f"fim_opts['lm_head'] must be None, a module name or an nn.Linear; got {got}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (``forward_fn`` as its qualified name)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        fn = d.pop("forward_fn")
        d["forward_fn"] = None if fn is None else getattr(fn, "__qualname__", repr(fn))
        pg = d.pop("process_group")
        d["process_group"] = None if pg is None else repr(pg)
        lm = d.pop("lm_head")
        d["lm_head"] = lm if lm is None or isinstance(lm, str) else repr(lm)
        return d


def check_reduction(reduction: str) -> str:
    """Validate ``reduction``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return reduction


def check_ema(ema: float | None) -> float | None:
    """Validate ``ema`` (``None`` or a decay strictly between 0 and 1)."""
    if ema is None:
        return None
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 < float(ema) < 1.0:
        raise ValueError(f"ema must be None or a float with 0 < ema < 1; got {ema!r}")
    return float(ema)


def check_type_options(fim_type: FIMType, opts: Options) -> None:
    """Raise when an option does not apply to ``fim_type``."""
    check_type_likelihood(fim_type, opts.likelihood)
    if opts.sequence_rows and fim_type not in (FIMType.MONTE_CARLO, FIMType.EMPIRICAL):
        raise ValueError(
            "fim_opts['sequence_rows'] applies to 'monte_carlo' and 'empirical' only (EXACT's "
            "token columns already give the Fisher of whole sequences, and a Hutchinson probe "
            f"covers every row in one backward); got fim_type={fim_type.value!r}"
        )


def check_type_likelihood(fim_type: FIMType, likelihood: str) -> None:
    """Raise when ``likelihood`` cannot do ``fim_type``."""
    if fim_type == FIMType.HUTCHINSON_SQRT and likelihood != "categorical":
        raise ValueError(
            "fim_type='hutchinson_sqrt' is defined through log_softmax and needs "
            f"likelihood='categorical'; got likelihood={likelihood!r} "
            "(use 'hutchinson', identical in law for a diagonal core FIM)"
        )
