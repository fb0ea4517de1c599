"""The Triton kernels as torch custom ops: ``torch.ops.fimfast_triton.<op>``.

Each module of :mod:`fimfast.ops.triton` defines its op with :func:`triton_op` (a
:func:`torch.library.triton_op` whose body launches the kernels through
:func:`torch.library.wrap_triton`) and registers a fake implementation (the output shapes and
dtypes, from the input metadata alone). Its public launcher ``<op>_triton``, the ``triton`` entry of
:mod:`fimfast.ops.registry`, routes the inputs the kernels do not cover to the torch reference and
calls the op for the rest. Registration happens when the module is imported, that is when the
``triton`` backend is first chosen; ``import fimfast`` registers nothing and never imports triton.

What the op is to torch:

* eager: the body runs on the real tensors and launches the kernels directly (``triton_op`` turns
  ``wrap_triton`` off there, so a call costs the custom-op dispatch and no tracing);
* fake tensors (``torch.compile``'s shape propagation, ``torch.library.opcheck``): the registered
  fake implementation;
* ``torch.compile`` (AOT dispatch, on a GPU): the body is traced into the graph, each kernel a
  ``triton_kernel_wrapper_functional`` node that Inductor compiles with the rest of the graph.
  Two exceptions keep the op an opaque node of the graph (as :func:`torch.library.custom_op`
  would): an op declared ``traceable=False`` (``accumulate_``, whose kernel reads raw tensor
  addresses from a table), and kernels that run under ``TRITON_INTERPRET=1``. There ``triton.jit``
  returns an ``InterpretedFunction``, which ``wrap_triton`` hands back unwrapped (it has no JIT
  metadata to trace), so the body would launch the interpreter on the functional tensors of the
  trace, which hold no data.

None of the ops has a derivative: they compute estimator quantities, not differentiable functions,
and the launchers pass detached inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

NAMESPACE = "fimfast_triton"
# op name -> the Python body of the op (its launch without the dispatcher), for
# benchmarks/bench_triton_dispatch.py
BODIES: dict[str, Callable] = {}

def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs under the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _opaque(mode, op, types, args, kwargs):
    """FunctionalTensorMode rule that keeps the op whole (functionalised as a custom op)."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def triton_op(
    name: str,
    *,
    kernels: Iterable[object],
    mutates_args: Iterable[str] = (),
    traceable: bool = True,
) -> Callable:
    """Decorator: ``fn`` as the custom op ``fimfast_triton::<name>`` (see the module docstring).

    Args:
        name: the op name within the ``fimfast_triton`` namespace.
        kernels: the ``@triton.jit`` kernels ``fn`` launches (through ``wrap_triton``); if any runs
            under the interpreter the op stays opaque to ``torch.compile``.
        mutates_args: names of the arguments ``fn`` writes in place (the schema marks them).
        traceable: False when ``fn`` cannot run on the tensors of a trace (it reads data or
            addresses on the host); the op then stays opaque to ``torch.compile``.

    Returns:
        A decorator returning the :class:`torch.library.CustomOpDef`; register its fake
        implementation with ``@op.register_fake``.
    """
    kernels = tuple(kernels)

    def register(fn: Callable) -> torch.library.CustomOpDef:
        op = torch.library.triton_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(fn)
        BODIES[name] = fn
        if not traceable or any(interpreted(k) for k in kernels):
            op.register_torch_dispatch(FunctionalTensorMode, _opaque)
        return op

    return register
