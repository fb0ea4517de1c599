"""The largest tensor storage any aten op creates inside a block (a deterministic memory probe).

A ``TorchDispatchMode`` sees every aten call, forward and backward (autograd's backward ops and the
registered ``fimfast`` custom ops included), and records the byte size of the storages of their
outputs. Views (``expand``, ``reshape``) report the storage they share, so a stride-0 placeholder
counts as its one element. Allocations made inside a kernel and never returned as a tensor (BLAS
workspace) are not seen.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestAlloc(TorchDispatchMode):
    """``with LargestAlloc() as m: ...``; then ``m.bytes`` and ``m.op`` (the op that made it)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.op = None
        self.shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t.layout == torch.sparse_coo:  # its indices and values
                    n = t._indices().untyped_storage().nbytes()
                    n += t._values().untyped_storage().nbytes()
                else:
                    n = t.untyped_storage().nbytes()
                if n > self.bytes:
                    self.bytes, self.op, self.shape = n, str(func), tuple(t.shape)
        return out
