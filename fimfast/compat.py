"""Drop-in replacements for torch-secorder's Fisher-diagonal functions, computing the true
quantities.

torch-secorder (``torch_secorder.approximations.fisher_diagonal``) offers
``empirical_fisher_diagonal(model, loss_fn, inputs, targets)`` and
``generalized_fisher_diagonal(model, outputs, targets, loss_type="nll", create_graph=False)``,
both returning a list of tensors in parameter order. Both square the gradient of the **batch**
loss, ``(sum_n g_n)^2`` (or ``(mean_n g_n)^2``), which is neither the empirical Fisher
``sum_n g_n^2`` (it adds the cross terms ``2 sum_{n<m} g_n g_m``) nor the Fisher (which takes the
expectation over labels drawn from the model, not the observed labels). The functions here keep
the signatures and the return type and compute:

* :func:`empirical_fisher_diagonal`: ``sum_n (grad loss_n)^2``, the per-sample squared gradients
  of the loss of every sample on its own;
* :func:`generalized_fisher_diagonal`: ``sum_n diag(J_n^T I(z_n) J_n)``, the Fisher of the
  model's predictive distribution (fimfast's EXACT), which does not depend on the targets.

Both sum over samples (divide by ``N`` for the per-sample mean).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from fimfast import chunks, likelihoods, persample
from fimfast.dtypes import compute_dtype
from fimfast.types import Options

__all__ = ["empirical_fisher_diagonal", "generalized_fisher_diagonal"]

_LOSS_TYPES = {
    "nll": "categorical",
    "cross_entropy": "categorical",
    "bce": "bernoulli",
    "mse": "gaussian",
}


def _parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return list(model.named_parameters())


def empirical_fisher_diagonal(
    model: torch.nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> list[Tensor]:
    """Diagonal of the empirical Fisher, ``sum_n (d loss_n / d theta)^2``, per parameter.

    ``loss_n = loss_fn(model(inputs[n:n+1]), targets[n:n+1])`` is the loss of sample ``n`` alone
    (so the result does not depend on the loss's reduction). Unlike torch-secorder's function of
    the same name, which returns ``(d loss / d theta)^2`` for the loss of the whole batch (the
    square of the summed gradient, cross-sample terms included, and divided by ``N^2`` for a
    mean-reduced loss), this is the sum of per-sample squares: the quantity called the empirical
    Fisher. Per-sample gradients come from ``torch.func.vmap(grad(...))`` in chunks, with a
    per-sample loop for models vmap cannot batch (e.g. BatchNorm in training mode).

    Args:
        model: the network; evaluated on one sample at a time (``inputs[n:n+1]``); its buffers
            (running statistics of a BatchNorm in train mode) are left as they were.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``nn.CrossEntropyLoss()``).
        inputs: ``(N, ...)`` inputs.
        targets: ``(N, ...)`` targets.

    Returns:
        One tensor per ``model.parameters()`` entry, shaped like it (zeros for parameters with
        ``requires_grad=False``), float32 (float64 for float64 parameters).
    """
    named = _parameters(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor) or t.dim() == 0:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor with a leading sample axis; got {got}")
    N = inputs.shape[0]
    if targets.shape[0] != N:
        raise ValueError(
            f"targets must have {N} samples like inputs {tuple(inputs.shape)}; got "
            f"{tuple(targets.shape)}"
        )
    train = [(n, p) for n, p in named if p.requires_grad]
    out = {n: torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device) for n, p in named}
    if N == 0 or not train:
        return list(out.values())
    params = {n: p.detach() for n, p in train}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss1(ps: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        outputs = functional_call(model, (ps, buffers), (x.unsqueeze(0),))
        return loss_fn(outputs, t.unsqueeze(0))

    per_grad = vmap(grad(loss1), in_dims=(None, 0, 0))
    P = sum(p.numel() for _, p in train)
    chunk = chunks.samples_per_chunk(P)
    kept = [(b, b.clone()) for b in model.buffers()]  # the per-sample loop's forwards write them
    try:
        _accumulate(model, loss_fn, per_grad, params, train, inputs, targets, chunk, out)
    finally:
        with torch.no_grad():
            for b, v in kept:
                b.copy_(v)
    return list(out.values())


def _accumulate(model, loss_fn, per_grad, params, train, inputs, targets, chunk, out) -> None:
    """``out[n] += sum_i g_i[n]^2`` over the samples, ``chunk`` at a time by ``per_grad`` (one
    at a time through autograd where vmap cannot batch the model)."""
    N = inputs.shape[0]
    for s in range(0, N, chunk):
        x, t = inputs[s : s + chunk], targets[s : s + chunk]
        try:
            g = per_grad(params, x, t)
        except (RuntimeError, NotImplementedError, ValueError):
            # a model vmap cannot batch: one sample at a time through autograd
            g = {n: [] for n in params}
            for i in range(x.shape[0]):
                loss = loss_fn(model(x[i : i + 1]), t[i : i + 1])
                gi = torch.autograd.grad(loss, [p for _, p in train], allow_unused=True)
                for (n, p), gg in zip(train, gi):
                    g[n].append(torch.zeros_like(p) if gg is None else gg)
            g = {n: torch.stack(v) for n, v in g.items()}
        for n in params:  # squares in float32 or wider
            out[n] += g[n].to(out[n].dtype).square().sum(0)


def generalized_fisher_diagonal(
    model: torch.nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
) -> list[Tensor]:
    """Diagonal of the Fisher information of the model's predictive distribution.

    ``sum_n diag(J_n^T I(z_n) J_n)`` with ``J_n = d outputs_n / d theta`` and the core FIM ``I``
    of ``loss_type``: ``nll``/``cross_entropy`` (softmax over the last axis: ``diag(p) - pp^T``),
    ``bce`` (independent sigmoids: ``diag(s(1-s))``), ``mse`` (unit-variance gaussian: ``I``, the
    Gauss-Newton matrix of ``0.5 |z - y|^2``). This is fimfast's EXACT estimator (per-sample,
    ``C`` backward columns per row) on logits the caller already has.

    torch-secorder's function of the same name squares the gradient of the summed observed-label
    log-likelihood of the batch, ``(sum_n J_n^T (e_{y_n} - p_n))^2``: cross-sample terms
    included, and with the observed labels instead of the expectation over the model's labels,
    so it is not the Fisher. Here ``targets`` do not enter the result (the Fisher does not depend
    on them); they are only checked for shape, for signature compatibility.

    Args:
        model: the network whose parameters produced ``outputs``.
        outputs: ``(N, C)`` or ``(N, T, C)`` logits, attached to the autograd graph.
        targets: ``(N,)``/``(N, T)`` class indices (``nll``) or a tensor shaped like ``outputs``.
        loss_type: ``nll``, ``cross_entropy``, ``bce`` or ``mse``.
        create_graph: must be ``False`` (the per-sample squares are not differentiable here).

    Returns:
        One tensor per ``model.parameters()`` entry, shaped like it (zeros for parameters that
        do not reach ``outputs`` or have ``requires_grad=False``).
    """
    named = _parameters(model)
    key = str(loss_type).lower()
    if key not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(_LOSS_TYPES)}; got {loss_type!r}")
    if create_graph:
        raise ValueError(
            "create_graph=True is not supported: the Fisher diagonal is a sum of squared "
            "per-sample gradients taken without a differentiable graph"
        )
    if not isinstance(outputs, Tensor) or outputs.dim() not in (2, 3):
        got = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"outputs must be (N, C) or (N, T, C) logits; got {got}")
    if not outputs.requires_grad:
        raise ValueError("outputs must be attached to the model's graph (requires_grad=True)")
    likelihood = _LOSS_TYPES[key]
    lead = tuple(outputs.shape[:-1])
    if isinstance(targets, Tensor):
        want = lead if likelihood == "categorical" else tuple(outputs.shape)
        if tuple(targets.shape) != want:
            raise ValueError(
                f"targets must have shape {want} for loss_type={loss_type!r} and outputs "
                f"{tuple(outputs.shape)}; got {tuple(targets.shape)}"
            )
    C = outputs.shape[-1]
    flat = outputs.reshape(-1, C)
    train = [(n, p) for n, p in named if p.requires_grad]
    out = {n: torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device) for n, p in named}
    if not train:
        return list(out.values())
    params = [p for _, p in train]
    opts = Options(likelihood=likelihood, sigma2=1.0, backend="torch")
    R = flat.shape[0]
    chunk = chunks.generic_columns(R, C, params, C)
    acc = [out[n] for n, _ in train]
    persample.accumulate_columns(flat, params, likelihoods.exact_columns(flat, opts, chunk), acc)
    return list(out.values())
