"""Everything that is timed: the floor, every fimfast estimator on every backend, and the peers.

A method's ``setup(workload, cfg)`` does the one-off work (not timed) and returns
``(call, cleanup)``: ``call()`` computes the diagonal of one batch, summed over its rows, and
returns ``{parameter name: tensor}``; ``cleanup()`` drops whatever a library leaves behind (results
attached to parameters, ``.grad``) outside the timed region.

fimfast methods are generated from :class:`fimfast.FIMType` and :func:`fimfast.available_backends`,
so a new backend or estimator is benchmarked by the next run with no change here.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import Progress
from benchmarks.workloads import Workload

__all__ = ["FAMILIES", "Method", "all_methods", "peer_status"]

Call = Callable[[], dict[str, torch.Tensor]]
Setup = Callable[[Workload, dict], tuple[Call, Callable[[], None]]]

# estimator families compared in the summary
FAMILIES = {
    "floor": "floor (one training step)",
    "exact": "exact diagonal",
    "per_sample": "per-sample Monte-Carlo / empirical",
    "hutchinson": "Hutchinson family (one backward per probe)",
}

PEERS = {"backpack": "backpack", "nngeometry": "nngeometry", "curvlinops": "curvlinops"}


@dataclass(frozen=True)
class Method:
    """One timed method.

    Attributes:
        name: id used on the command line and in the results.
        label: one line for tables.
        library: ``torch``, ``fimfast``, ``backpack``, ``nngeometry``, ``curvlinops`` or
            ``torch.func``.
        family: a key of :data:`FAMILIES`.
        target: what it estimates: ``fim`` or ``ef`` (empirical Fisher); ``none`` for the floor.
        random: a stochastic estimator (error of 1 draw and of the mean of many).
        setup: see the module docstring.
        note: caveat shown in tables (bounds, workarounds).
        attention_only: only meaningful on workloads with attention (workarounds).
        bound: estimates a bound of diag F (DG, RANKK), not diag F itself.
    """

    name: str
    label: str
    library: str
    family: str
    target: str
    random: bool
    setup: Setup
    note: str = ""
    attention_only: bool = False
    bound: bool = False


def peer_status() -> dict[str, str]:
    """``{library: "ok" | why it cannot be used}`` for the peer libraries."""
    out = {}
    for lib, mod in PEERS.items():
        if importlib.util.find_spec(mod) is None:
            out[lib] = "not installed (benchmarks/install_peers.sh installs it)"
        else:
            out[lib] = "ok"
    return out


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _strip(d: dict[str, torch.Tensor], wl: Workload) -> dict[str, torch.Tensor]:
    """Names of the flattened-token wrapper (``model.<name>``) back to the workload's names."""
    if not wl.token_level:
        return d
    return {n.removeprefix("model."): v for n, v in d.items()}


# --------------------------------------------------------------------------------------------- #
# floor and fimfast
# --------------------------------------------------------------------------------------------- #
def _floor(wl: Workload, cfg: dict):
    model = wl.model
    y = wl.flat_labels()

    def call():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(wl.logits(), y).backward()
        return {n: p.grad for n, p in _params(model).items()}

    return call, lambda: model.zero_grad(set_to_none=True)


def _fimfast(fim_type: str, backend: str, train: bool = False) -> Setup:
    def setup(wl: Workload, cfg: dict):
        import fimfast

        est = fimfast.DiagFisher(wl.model, fim_type, reduction="sum", backend=backend)
        batch = (wl.inputs, wl.labels)

        def call():
            if train:
                est.train_step(batch)  # mean CE gradients into .grad + the Fisher, one forward
            else:
                est.step(batch)
            fim = est.result()
            return {n: fim[n] for n in fim}

        def cleanup():
            est.reset()
            wl.model.zero_grad(set_to_none=True)

        return call, cleanup

    return setup


def _fimfast_methods(device: torch.device) -> list[Method]:
    import fimfast
    from fimfast import FIMType

    backends = []
    for b, st in fimfast.available_backends(device).items():
        # the triton interpreter (TRITON_INTERPRET=1) is a test vehicle, not something to time
        if st["available"] and not (b == "triton" and device.type != "cuda"):
            backends.append(b)
    family = {
        FIMType.EXACT: "exact",
        FIMType.EMPIRICAL: "per_sample",
        FIMType.MONTE_CARLO: "per_sample",
    }
    notes = {
        FIMType.EMPIRICAL: "empirical Fisher (labels); its error is the EF-FIM gap",
        FIMType.HUTCHINSON_DG: "upper bound of diag F: its error is the bound's gap",
        FIMType.HUTCHINSON_RANKK: "lower bound (top-2 core eigenpairs): error is the gap",
        FIMType.HUTCHINSON_RANK1: "lower bound (top core eigenpair): error is the gap",
    }
    out = []
    for b in backends:
        for t in FIMType:
            out.append(Method(
                name=f"fimfast_{t.value}_{b}",
                label=f"fimfast {t.value} [{b}]",
                library="fimfast",
                family=family.get(t, "hutchinson"),
                target="ef" if t == FIMType.EMPIRICAL else "fim",
                random=t.is_random,
                setup=_fimfast(t.value, b),
                note=notes.get(t, ""),
                bound=t in (FIMType.HUTCHINSON_DG, FIMType.HUTCHINSON_RANKK,
                            FIMType.HUTCHINSON_RANK1),
            ))
        out.append(Method(
            name=f"fimfast_train_step_hutchinson_{b}",
            label=f"fimfast train_step: training grads + hutchinson [{b}]",
            library="fimfast",
            family="hutchinson",
            target="fim",
            random=True,
            setup=_fimfast("hutchinson", b, train=True),
            note="includes the training step itself (the floor's work)",
        ))
    return out


# --------------------------------------------------------------------------------------------- #
# peers
# --------------------------------------------------------------------------------------------- #
def _backpack(ext_name: str) -> Setup:
    def setup(wl: Workload, cfg: dict):
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

        ext, attr = {
            "exact": (DiagGGNExact, "diag_ggn_exact"),
            "mc": (lambda: DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
            "sgs": (SumGradSquared, "sum_grad_squared"),
        }[ext_name]
        model = extend(wl.flat_model())
        lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
        X, y = wl.inputs, wl.flat_labels()

        def call():
            model.zero_grad(set_to_none=True)
            loss = lossfn(model(X), y)
            with backpack(ext()):
                loss.backward()
            params = _params(model)
            missing = [n for n, p in params.items() if not hasattr(p, attr)]
            if missing:  # first-order extensions silently skip modules they do not know
                raise NotImplementedError(
                    f"BackPACK left {len(missing)}/{len(params)} parameters without '{attr}' "
                    f"(unsupported modules), e.g. {missing[0]}"
                )
            return _strip({n: getattr(p, attr) for n, p in params.items()}, wl)

        def cleanup():
            for p in model.parameters():
                if hasattr(p, attr):
                    delattr(p, attr)
            model.zero_grad(set_to_none=True)

        return call, cleanup

    return setup


def _nngeometry(exact: bool) -> Setup:
    def setup(wl: Workload, cfg: dict):
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM, FIM_MonteCarlo
        from nngeometry.object import PMatDiag
        from torch.utils.data import DataLoader, TensorDataset

        if wl.token_level:
            raise NotImplementedError(
                "NNGeometry's FIM needs one output row per example; token-level logits "
                "(N, T, V) have T rows per example"
            )
        model = wl.flat_model()
        X, y = wl.inputs, wl.flat_labels()
        B = X.shape[0]
        loader = DataLoader(TensorDataset(X, y), batch_size=B)
        lc = LayerCollection.from_model(model)  # raises on layers it does not know
        l2m, _ = lc.get_layerid_module_maps(model)
        id2name = {id(p): n for n, p in model.named_parameters()}
        order = [id2name[id(p)] for _, p in lc.named_parameters(l2m)]
        missing = set(_params(model)) - set(order)
        if missing:
            raise NotImplementedError(f"NNGeometry skips parameters {sorted(missing)[:3]} ...")
        shapes = {n: p.shape for n, p in model.named_parameters()}
        device = str(X.device)
        C = wl.num_classes
        grad = torch.autograd.grad

        def counting_grad(*a, **k):  # progress of the C - 1 backward passes (per-call limit)
            Progress.done += 1
            return grad(*a, **k)

        def call():
            if exact:
                Progress.done, Progress.total = 0, C - 1
                torch.autograd.grad = counting_grad
                try:
                    Fm = FIM(model, loader, PMatDiag, variant="classif_logits", device=device)
                finally:
                    torch.autograd.grad = grad
            else:
                Fm = FIM_MonteCarlo(model, loader, PMatDiag, variant="classif_logits", trials=1,
                                    device=device)
            d = Fm.get_diag() * B  # NNGeometry averages over examples
            out, i = {}, 0
            for n in order:
                k = math.prod(shapes[n])
                out[n] = d[i : i + k].view(shapes[n])
                i += k
            return _strip(out, wl)

        return call, lambda: model.zero_grad(set_to_none=True)

    return setup


def _curvlinops(kind: str, sdpa_math: bool = False) -> Setup:
    def setup(wl: Workload, cfg: dict):
        from curvlinops import FisherMCLinearOperator, GGNLinearOperator, hutchinson_diag

        model = wl.flat_model()
        named = _params(model)
        params = list(named.values())
        X, y = wl.inputs, wl.flat_labels()
        data = [(X, y)]
        lossfn = nn.CrossEntropyLoss(reduction="sum")
        n_data = X.shape[0]

        def core():
            if kind == "fmc":
                seed = int(torch.randint(0, 2**31 - 1, (1,)))
                A = FisherMCLinearOperator(model, lossfn, params, data, check_deterministic=False,
                                           num_data=n_data, mc_samples=1, seed=seed)
            else:
                A = GGNLinearOperator(model, lossfn, params, data, check_deterministic=False,
                                      num_data=n_data)
            d = hutchinson_diag(A, num_matvecs=1)
            out, i = {}, 0
            for n, p in named.items():
                out[n] = d[i : i + p.numel()].view_as(p)
                i += p.numel()
            return _strip(out, wl)

        def call():
            if not sdpa_math:
                return core()
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # the fused CPU attention kernel has no forward-mode AD; the composite one has
            with sdpa_kernel(SDPBackend.MATH):
                return core()

        return call, lambda: model.zero_grad(set_to_none=True)

    return setup


def _func_exact(wl: Workload, cfg: dict):
    """Per-sample x per-(token, class) gradients of log p with torch.func: sum p (grad log p)^2."""
    from torch.func import functional_call, vjp, vmap

    model = wl.model
    params = {n: p.detach() for n, p in _params(model).items()}
    P = sum(p.numel() for p in params.values())
    X = wl.inputs
    N = X.shape[0]
    K = wl.num_rows // N * wl.num_classes  # (token, class) pairs of one sample
    chunk = int(cfg.get("chunk_mb", 1024) * 2**20)

    def logp1(pr, x):
        z = functional_call(model, pr, (x.unsqueeze(0),)).reshape(-1, wl.num_classes)
        return torch.log_softmax(z, dim=-1).reshape(-1)  # (K,)

    def per_sample(pr, x, w, E):
        _, vjp_fn = vjp(lambda q: logp1(q, x), pr)
        (g,) = vmap(vjp_fn)(E)  # {n: (k, *shape)}: grad log p_j for the pairs j of E
        return {n: torch.tensordot(w, g[n] ** 2, dims=1) for n in g}

    per_chunk = vmap(per_sample, in_dims=(None, 0, 0, None))
    pairs = max(1, chunk // (8 * P))  # ~2 live float32 copies of P per pair
    kc, bs = (K, max(1, min(N, pairs // K))) if pairs >= K else (pairs, 1)
    blocks = [torch.arange(j, min(K, j + kc), device=X.device) for j in range(0, K, kc)]
    dtype = next(iter(params.values())).dtype
    eyes = [torch.nn.functional.one_hot(b, K).to(dtype) for b in blocks]

    def call():
        with torch.no_grad():
            prob = torch.softmax(wl.logits(), dim=-1).reshape(N, K)
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        Progress.done, Progress.total = 0, N * K
        for s in range(0, N, bs):
            for b, E in zip(blocks, eyes):
                out = per_chunk(params, X[s : s + bs], prob[s : s + bs, b], E)
                for n in acc:
                    acc[n] += out[n].sum(0)
                Progress.done += min(bs, N - s) * len(b)
        return acc

    return call, lambda: model.zero_grad(set_to_none=True)


def _peer_methods() -> list[Method]:
    bp, nng, cl = "backpack", "nngeometry", "curvlinops"
    return [
        Method("bp_diag_ggn_exact", "BackPACK DiagGGNExact", bp, "exact", "fim", False,
               _backpack("exact")),
        Method("bp_diag_ggn_mc", "BackPACK DiagGGNMC, 1 sample", bp, "per_sample", "fim", True,
               _backpack("mc")),
        Method("bp_sum_grad_squared", "BackPACK SumGradSquared (empirical)", bp, "per_sample", "ef",
               False, _backpack("sgs"), note="empirical Fisher"),
        Method("nng_fim_exact", "NNGeometry FIM PMatDiag classif_logits", nng, "exact", "fim",
               False, _nngeometry(True)),
        Method("nng_fim_mc", "NNGeometry FIM_MonteCarlo PMatDiag, 1 trial", nng, "per_sample",
               "fim", True, _nngeometry(False)),
        Method("cl_ggn_hutchinson", "curvlinops hutchinson_diag(GGN), 1 matvec", cl, "hutchinson",
               "fim", True, _curvlinops("ggn")),
        Method("cl_fishermc_hutchinson", "curvlinops hutchinson_diag(FisherMC 1 sample), 1 matvec",
               cl, "hutchinson", "fim", True, _curvlinops("fmc")),
        Method("cl_ggn_hutchinson_sdpamath", "curvlinops hutchinson_diag(GGN), MATH attention", cl,
               "hutchinson", "fim", True, _curvlinops("ggn", True),
               note="workaround: composite attention kernel", attention_only=True),
        Method("cl_fishermc_hutchinson_sdpamath",
               "curvlinops hutchinson_diag(FisherMC), MATH attention", cl, "hutchinson", "fim",
               True, _curvlinops("fmc", True), note="workaround: composite attention kernel",
               attention_only=True),
        Method("func_exact", "torch.func per-sample x per-class, sum p (grad log p)^2",
               "torch.func", "exact", "fim", False, _func_exact),
    ]


def all_methods(device: torch.device | str = "cpu") -> dict[str, Method]:
    """Every method, by name, for ``device`` (fimfast on each backend available there)."""
    device = torch.device(device)
    floor = Method("floor", "floor: forward + backward of the mean CE loss", "torch", "floor",
                   "none", False, _floor)
    methods = [floor, *_fimfast_methods(device), *_peer_methods()]
    return {m.name: m for m in methods}
