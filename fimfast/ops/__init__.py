"""Public kernel ops of fimfast: the fused hot parts of every estimator.

Each op dispatches per call (see :mod:`fimfast.ops.registry`) to the ``torch`` reference or to a
``triton``, ``cpp`` or ``cuda`` kernel with the same contract. The estimators call only these
functions. All accumulation happens in float32 (float64 when the inputs are float64), whatever the
input dtype.
"""

from __future__ import annotations

import torch

from fimfast.ops import rng, torch_ref
from fimfast.ops.registry import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    bound,
    resolve,
)
from fimfast.ops.torch_ref import PROBE_MODES, compute_dtype

__all__ = [
    "PROBE_MODES",
    "BackendUnavailableError",
    "accumulate_",
    "available_backends",
    "backend_status",
    "compute_dtype",
    "core_topk",
    "lm_head_probe",
    "pair_gram",
    "probe_logit_grad",
    "recurrent_bptt",
    "recurrent_forward",
    "rng",
    "shared_sq",
    "sq_matmul",
]


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D; got shape {tuple(t.shape)}")


def probe_logit_grad(
    logits: torch.Tensor,
    mode: str,
    seed: int,
    offset: int,
    num_probes: int = 1,
    labels: torch.Tensor | None = None,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    sigma2: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Output-side factor ``dz = dh/dz`` of one estimator, fused: softmax, probes and the mix.

    Rows are independent; probe ``s`` of row ``r`` and class ``c`` uses the counter
    ``offset + (s*R + r)*C + c`` of the sign stream (``(s*R + r)*k + j`` for ``rankk``, and
    ``offset + s*R + r`` of the uniform stream for ``mc``); see :mod:`fimfast.ops.rng`. The result
    is deterministic and identical across backends up to floating-point rounding.

    Args:
        logits: ``(R, C)`` float16|bfloat16|float32|float64, one row per sample or token.
        mode: ``hutchinson`` (``sqrt(p)*xi - p*(sqrt(p).xi)``), ``sqrt`` (the coefficient
            ``sqrt(p)*xi`` of ``log_softmax``), ``dg`` (``sqrt(p)*xi``), ``rankk``
            (``sum_j xi_j sqrt(lam_j) v_j``), ``empirical`` (``e_y - p``), ``mc``
            (``e_yhat - p``, ``yhat ~ p``), ``bernoulli`` (``sqrt(s(1-s))*xi``), ``gaussian``
            (``xi/sqrt(sigma2)``).
        seed: 64-bit seed of the counter-based generator.
        offset: first counter of this call (advance it between calls).
        num_probes: ``S >= 1`` probes (or draws); ignored by ``empirical`` beyond broadcasting.
        labels: ``(R,)`` int64 class indices, for ``empirical``.
        eig: ``(lam (R, k), V (R, k, C))`` from :func:`core_topk`, for ``rankk``.
        sigma2: variance of the ``gaussian`` likelihood.
        backend: ``None``/``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        ``(S, R, C)`` float32 (float64 for float64 logits), contiguous.
    """
    if type(logits) is not torch.Tensor or logits.dim() != 2:  # a subclass: the full check
        _check_2d("logits", logits)
    if mode not in PROBE_MODES:
        raise ValueError(f"mode must be one of {PROBE_MODES}; got {mode!r}")
    n = int(num_probes)
    if n < 1:
        raise ValueError(f"num_probes must be >= 1; got {num_probes!r}")
    if mode == "empirical":
        if labels is None or labels.shape != logits.shape[:1]:
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"labels must have shape {tuple(logits.shape[:1])}; got {got}")
    elif mode == "rankk" and eig is None:
        raise ValueError("eig=(eigenvalues, eigenvectors) is required for mode 'rankk'")
    fn = bound("probe_logit_grad", backend, logits.device)
    return fn(logits, mode, int(seed), int(offset), n, labels, eig, float(sigma2))


LM_HEAD_MODES = ("hutchinson", "sqrt", "dg")


def lm_head_probe(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    seed: int,
    offset: int,
    *,
    row_chunk: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One HUTCHINSON-family probe through a Linear head, without the ``(R, V)`` logits.

    With ``z = hidden @ weight.T + bias`` and ``u = probe_logit_grad(z, mode, seed, offset, 1)[0]``
    (for ``sqrt``: ``u``'s gradient through ``log_softmax``, ``u - p sum(u)``, formed as the
    HUTCHINSON_SQRT step forms it: exact at a confident row's leading class), returns
    ``(u @ weight, u.T @ hidden, u.sum(0))``. Rows are processed ``row_chunk`` at a time; chunk
    ``r0:r1`` draws its signs at the counters ``offset + r0*V + ...``, so the result equals the
    unchunked composition sign for sign (and a probe ``s`` of the HUTCHINSON step over
    ``R`` rows is ``offset + s*R*V``).

    Memory: beyond the outputs, ``O(row_chunk * V)`` float32 temporaries (a few chunk-sized
    buffers) and a compute-dtype copy of ``weight`` when it has another dtype; never ``R * V``.

    Args:
        hidden: ``(R, d)`` float16|bfloat16|float32|float64, the head's input rows.
        weight: ``(V, d)`` the head's weight (any floating dtype).
        bias: ``(V,)`` or ``None``.
        mode: ``hutchinson``, ``sqrt`` or ``dg`` (categorical likelihood).
        seed: 64-bit seed of the counter-based generator.
        offset: first counter of this call.
        row_chunk: rows per chunk; ``None`` picks ``max(1, 2**21 // V)`` (8 MiB of float32 logits).
        backend: ``None``/``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"``: the
            backend of the probe factor of each chunk (the products are torch matmuls).

    Returns:
        ``(grad_hidden (R, d) in hidden's dtype, grad_weight (V, d), grad_bias (V,) or None)``;
        the logits, factors and products run in float32 (float64 when ``hidden`` or ``weight`` is
        float64), and the weight and bias gradients keep that dtype. Deterministic: the same
        inputs give the same result on every call, identical across backends up to rounding.
    """
    _check_2d("hidden", hidden)
    _check_2d("weight", weight)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (R, d) and weight (V, d) must agree on d; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or of shape {tuple(weight.shape[:1])}; got {got}")
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"mode must be one of {LM_HEAD_MODES}; got {mode!r}")
    if row_chunk is not None and (
        isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk < 1
    ):
        raise ValueError(f"row_chunk must be None or an integer >= 1; got {row_chunk!r}")
    _, fn = resolve("lm_head_probe", backend, hidden.device)
    return fn(hidden, weight, bias, mode, int(seed), int(offset), row_chunk)


def core_topk(
    p: torch.Tensor,
    k: int,
    solver: str = "exact",
    iters: int = 30,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of the categorical core FIM ``diag(p) - p p^T``, row by row.

    ``solver="exact"`` solves the secular equation ``sum_c p_c^2/(p_c - lam) = 1`` in the ``k``
    highest interlacing intervals by safeguarded Newton/bisection, with ties deflated (Helmert
    vectors), exact to rounding. ``solver="power"`` runs ``iters`` power iterations with
    Gram-Schmidt deflation (the behaviour of the paper's code), then Gram-Schmidt once more
    and the Rayleigh quotients (:func:`fimfast.ops.torch_ref.power_finish`).

    Args:
        p: ``(R, C)`` probabilities (rows sum to 1), float32|float64.
        k: number of eigenpairs, ``1 <= k <= C - 1``.
        solver: ``"exact"`` or ``"power"``.
        iters: power iterations (``solver="power"`` only).
        backend: as in :func:`probe_logit_grad`.

    Returns:
        ``(lam (R, k), V (R, k, C))`` in float32 (float64 for float64 input), eigenvalues in
        descending order, unit eigenvectors with their largest-magnitude entry positive.
    """
    _check_2d("p", p)
    C = p.shape[1]
    if not 1 <= int(k) <= C - 1:
        raise ValueError(f"k must be in [1, C-1] = [1, {C - 1}]; got {k!r}")
    if solver not in ("exact", "power"):
        raise ValueError(f"solver must be 'exact' or 'power'; got {solver!r}")
    _, fn = resolve("core_topk", backend, p.device)
    lam, vec = fn(p, int(k), solver, int(iters))
    if solver == "power":  # Gram-Schmidt once more (see power_finish), on every backend
        lam, vec = torch_ref.power_finish(p, vec)
    return lam, vec


def sq_matmul(g: torch.Tensor, a: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Sum of per-sample squared outer products: ``sum_n g[n]**2 (x) a[n]**2``.

    This is the per-sample squared gradient of a Linear weight without weight sharing,
    ``(g*g).T @ (a*a)``, with the squares taken on the fly.

    Args:
        g: ``(N, O)`` float16|bfloat16|float32|float64, gradients at the layer output.
        a: ``(N, I)`` same dtypes, layer inputs.
        backend: as in :func:`probe_logit_grad`.

    Returns:
        ``(O, I)`` float32 (float64 when an input is float64).
    """
    _check_2d("g", g)
    _check_2d("a", a)
    if g.shape[0] != a.shape[0]:
        raise ValueError(f"g and a must have the same N; got {tuple(g.shape)} and {tuple(a.shape)}")
    _, fn = resolve("sq_matmul", backend, g.device)
    return fn(g, a)


def shared_sq(G: torch.Tensor, A: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Squared per-sample gradients with weight sharing, summed: ``sum_n (G_n^T A_n)**2``.

    Never writes the ``N*O*I`` per-sample gradients at once (chunks of samples).

    Args:
        G: ``(N, T, O)`` gradients at the layer output per position (token, pixel).
        A: ``(N, T, I)`` layer inputs per position (unfolded patches for convolutions).
        backend: as in :func:`probe_logit_grad`.

    Returns:
        ``(O, I)`` float32 (float64 when an input is float64).
    """
    for name, t in (("G", G), ("A", A)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor; got {shape}")
    if G.shape[:2] != A.shape[:2]:
        raise ValueError(f"G and A must agree on (N, T); got {tuple(G.shape)} and {tuple(A.shape)}")
    _, fn = resolve("shared_sq", backend, G.device)
    return fn(G, A)


def pair_gram(P: torch.Tensor | list, out: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """The products of pairs of positions of an output-side gradient, summed over its columns:
    ``A[n, (t, s), o] = sum_m P[m, n, t, o] P[m, n, s, o]`` for the pairs ``t <= s`` in row-major
    order (:func:`fimfast.ops.pairs.pair_index`), added into ``out`` when given. With the pairs
    ``Z`` of an input side ``Q`` (:func:`fimfast.ops.pairs.pair_inputs`),
    ``A.view(-1, O).T @ Z.view(-1, I)`` is ``sum_{m,n} (P[m, n]^T Q[n])**2`` (see
    :mod:`fimfast.ops.pairs`).

    Args:
        P: ``(M, N, T, O)`` output-side gradients, any floating dtype; or a list of the ``T``
            positions' ``(M, N, O)`` (not stacked: the kernel reads each where it is).
        out: ``None``, or a contiguous float32/float64 ``(N, T (T + 1) / 2, O)`` to add into.
        backend: as in :func:`probe_logit_grad`.

    Returns:
        ``out`` (updated in place), or a new ``(N, T (T + 1) / 2, O)`` float32 (float64 for a
        float64 ``P``).
    """
    if isinstance(P, torch.Tensor) and P.dim() == 4:
        P = list(P.unbind(2))
    elif not (isinstance(P, list | tuple) and P and all(
            isinstance(p, torch.Tensor) and p.dim() == 3 and p.shape == P[0].shape for p in P)):
        got = tuple(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
        raise ValueError("P must be a 4-D tensor (M, N, T, O) or a non-empty list of (M, N, O) "
                         f"tensors of one shape; got {got}")
    M, N, O = P[0].shape
    T = len(P)
    shape = (N, T * (T + 1) // 2, O)
    accumulate = out is not None
    if out is None:
        out = torch.empty(shape, dtype=compute_dtype(P[0].dtype), device=P[0].device)
    elif (not isinstance(out, torch.Tensor) or tuple(out.shape) != shape
          or out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous()
          or out.device != P[0].device):
        got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out)
        raise ValueError(f"out must be a contiguous float32/float64 tensor of shape {shape} on "
                         f"P's device; got {got}")
    _, fn = resolve("pair_gram_", backend, P[0].device)
    fn(out, list(P), accumulate)
    return out


def accumulate_(
    states: list[torch.Tensor],
    grads: list[torch.Tensor],
    mode: str = "sum",
    beta: float = 0.0,
    scale: float = 1.0,
    backend: str | None = None,
) -> None:
    """Multi-tensor in-place accumulation of squares into float32/float64 states.

    ``mode="sum"``: ``s += scale * g**2``; ``mode="ema"``: ``s = beta*s + (1-beta)*scale*g**2``.
    Squares are taken in the state's dtype, whatever the gradient dtype.

    Args:
        states: list of float32|float64 tensors, updated in place.
        grads: list of tensors of the same shapes, any floating dtype.
        mode: ``"sum"`` or ``"ema"``.
        beta: EMA decay in ``[0, 1)`` (``mode="ema"``).
        scale: multiplier of the squares.
        backend: as in :func:`probe_logit_grad`.
    """
    if len(states) != len(grads):
        raise ValueError(f"states and grads differ in length: {len(states)} vs {len(grads)}")
    for i, (s, g) in enumerate(zip(states, grads)):
        if s.shape != g.shape:
            raise ValueError(
                f"states[{i}] and grads[{i}] differ in shape: {tuple(s.shape)} vs {tuple(g.shape)}"
            )
        if s.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"states[{i}] must be float32 or float64; got {s.dtype}")
    if mode not in ("sum", "ema"):
        raise ValueError(f"mode must be 'sum' or 'ema'; got {mode!r}")
    if not states:
        return
    _, fn = resolve("accumulate_", backend, states[0].device)
    fn(states, grads, mode, float(beta), float(scale))


RECURRENT_MODES = {"LSTM": 2, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def recurrent_bptt(
    mode: str,
    saved: list[torch.Tensor],
    whh: torch.Tensor,
    dys: torch.Tensor,
    dh: torch.Tensor,
    dc: torch.Tensor | None = None,
    reverse: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Back-propagation through time of one recurrent layer and direction (docs/math.md §4).

    The gradients at the gate pre-activations of every step, given the gradients ``dys`` at the
    outputs ``h_t`` and ``dh`` (``dc``) at the last state, by the recurrence of the cell
    (``fimfast/rules/recurrent_scan.py`` builds the arguments). ``T`` steps, ``N`` rows, ``H``
    hidden units, in position order; with ``reverse`` the steps ran from ``T - 1`` down to 0.

    Args:
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        saved: ``LSTM``: ``[a (T, N, 4H), c0 (N, H)]``, the gate pre-activations and the initial
            cell state; ``GRU``: ``[gi, gh (T, N, 3H), hprev (T, N, H)]``, the input-side and
            hidden-side pre-activations and the state each step started from; ``RNN_*``:
            ``[ys (T, N, H)]``, the outputs.
        whh: ``(G, H)`` the hidden-to-hidden weight (``G`` = 4H, 3H or H).
        dys: ``(T, N, H)`` gradient at the outputs.
        dh: ``(N, H)`` gradient at the last hidden state.
        dc: ``(N, H)`` gradient at the last cell state (LSTM only, else ``None``).
        reverse: the direction of the steps.
        backend: ``None``/``"auto"``, ``"torch"`` or ``"cpp"`` (float32 and float64; other
            dtypes run the torch reference).

    Returns:
        ``(dG (T, N, G), dgh, dh0 (N, H), dc0)``: ``dG`` the gradient at the input-side
        pre-activations, ``dgh`` at the hidden-side ones where they differ (GRU, else ``None``),
        ``dh0``/``dc0`` at the initial state (``dc0`` ``None`` but for an LSTM). Under the
        batched backward (``is_grads_batched``), ``dys``, ``dh``, ``dc`` may carry the batch.
    """
    if mode not in RECURRENT_MODES:
        raise ValueError(f"mode must be one of {sorted(RECURRENT_MODES)}; got {mode!r}")
    if len(saved) != RECURRENT_MODES[mode]:
        raise ValueError(f"saved must hold {RECURRENT_MODES[mode]} tensors for mode {mode!r}; "
                         f"got {len(saved)}")
    if (dc is None) == (mode == "LSTM"):
        raise ValueError(f"dc must be given for an LSTM and only then; mode {mode!r}, "
                         f"dc {'None' if dc is None else tuple(dc.shape)}")
    _, fn = resolve("recurrent_bptt", backend, whh.device)
    return fn(mode, list(saved), whh, dys, dh, dc, bool(reverse))


def recurrent_forward(
    mode: str,
    gi: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    whh: torch.Tensor,
    bhh: torch.Tensor | None = None,
    reverse: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The steps of one recurrent layer and direction from their input projections, keeping the
    pre-activations that :func:`recurrent_bptt` takes (docs/math.md §4, "Recurrent layers").

    ``T`` steps of ``N`` rows, ``H`` hidden units, ``G`` = 4H (LSTM), 3H (GRU) or H, in position
    order; with ``reverse`` the steps run from ``T - 1`` down to 0. No graph is recorded.

    Args:
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        gi: ``(T, N, G)`` the input projections ``W_ih x_t + b_ih``.
        h0: ``(N, H)`` the initial hidden state.
        c0: ``(N, H)`` the initial cell state (LSTM only, else ``None``).
        whh: ``(G, H)`` the hidden-to-hidden weight.
        bhh: ``(G,)`` its bias, or ``None``.
        reverse: the direction of the steps.
        backend: ``None``/``"auto"``, ``"torch"`` or ``"cpp"`` (float32 and float64; other
            dtypes run the torch reference).

    Returns:
        ``(ys (T, N, H), pre (T, N, G), hT (N, H), cT)``: the outputs ``h_t``, the
        pre-activations of every step (LSTM and Elman: ``gi + W_hh h_{t-1} + b_hh``, the LSTM's
        ``a`` of :func:`recurrent_bptt`; GRU: the hidden side ``W_hh h_{t-1} + b_hh``, its
        ``gh``), the last hidden state and the last cell state (``None`` but for an LSTM).
    """
    if mode not in RECURRENT_MODES:
        raise ValueError(f"mode must be one of {sorted(RECURRENT_MODES)}; got {mode!r}")
    if (c0 is None) == (mode == "LSTM"):
        raise ValueError(f"c0 must be given for an LSTM and only then; mode {mode!r}, "
                         f"c0 {'None' if c0 is None else tuple(c0.shape)}")
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    G = whh.shape[0] if whh.dim() == 2 and whh.shape[0] == gates * whh.shape[1] else -1
    if gi.dim() != 3 or gi.shape[2] != G or h0.shape != (gi.shape[1], whh.shape[-1]):
        raise ValueError(f"gi must be (T, N, G) and h0 (N, H) for whh (G = {gates} H, H) = "
                         f"{tuple(whh.shape)}; got gi {tuple(gi.shape)}, h0 {tuple(h0.shape)}")
    _, fn = resolve("recurrent_forward", backend, whh.device)
    return fn(mode, gi, h0, c0, whh, bhh, bool(reverse))
