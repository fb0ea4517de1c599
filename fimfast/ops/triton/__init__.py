"""The ``triton`` backend: one module per op, each private ``@triton.jit`` kernels, the custom op
``torch.ops.fimfast_triton.<op>`` that launches them (:mod:`fimfast.ops.triton.library`) and a
public launcher ``<op>_triton`` with the signature of the torch reference, which calls the op.

Importing a module imports triton and registers its op; :mod:`fimfast.ops.registry` imports them
only when the ``triton`` backend is chosen. On a CPU the kernels run under ``TRITON_INTERPRET=1``
(tests).
"""
