"""The trainable parameters of a model, as every step reads them.

:func:`trainable_parameters` is the parameter set an estimator is made for and checks at every
step (:meth:`fimfast.state.State.check_params`): ``model.named_parameters()`` restricted to
``requires_grad``, walked without its generator layers.
"""

from __future__ import annotations

import torch

from fimfast.types import UnsupportedModelError

__all__ = ["check_real", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters with ``requires_grad`` (tied weights once), in
    ``model.named_parameters()`` order."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    names: list[str] = []
    params: list[torch.Tensor] = []
    _collect(model, "", set(), set(), names, params)
    if not names:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return names, params


def _collect(
    module: torch.nn.Module, prefix: str, modules: set, seen: set, names: list, params: list
) -> None:
    """``named_parameters()`` without its generator layers (a step walks it every call): modules
    in pre-order, each once, then each of its parameters not met before."""
    modules.add(id(module))
    for k, p in module._parameters.items():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            if p.requires_grad:
                names.append(prefix + k)
                params.append(p)
    for k, child in module._modules.items():
        if child is not None and id(child) not in modules:
            _collect(child, prefix + k + ".", modules, seen, names, params)


def check_real(names: list[str], params: list[torch.Tensor]) -> None:
    """Refuse complex trainable parameters: the Fisher estimated is that of real parameters."""
    if bad := [n for n, p in zip(names, params) if p.is_complex()]:
        raise UnsupportedModelError(
            f"trainable parameter(s) {', '.join(bad[:5])} are complex: fimfast estimates the "
            "Fisher of real parameters. Keep real and imaginary parts in a real parameter of shape "
            "(..., 2), complex in the forward (torch.view_as_complex), or set requires_grad=False")
