"""The ``triton`` backend: one module per op, each a private ``@triton.jit`` kernel and a public
launcher ``<op>_triton`` with the signature of the torch reference.

Importing this package imports triton; :mod:`fimfast.ops.registry` imports it only when the
``triton`` backend is chosen. On a CPU the kernels run under ``TRITON_INTERPRET=1`` (tests).
"""
