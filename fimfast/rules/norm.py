"""Rules for the norms: LayerNorm, RMSNorm, GroupNorm and BatchNorm (affine parameters).

Each affine parameter gets a :class:`Vec`: ``weight`` gets ``sum_t G * xhat``, ``bias`` gets
``sum_t G``, with ``xhat`` the normalised input computed by torch's own kernel without the affine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fimfast.dtypes import compute_dtype
from fimfast.hooks import Call, Use
from fimfast.ops.norm_terms import norm_terms_cpp
from fimfast.ops.registry import bound
from fimfast.rules import fold_rows, norm_node
from fimfast.rules.base import Rule, UseKind, Vec, front, trainable
from fimfast.rules.linear import folded


class _NormRule(Rule):
    """Shared part of the norms: ``weight`` gets ``sum_t G * xhat``, ``bias`` gets ``sum_t G``."""

    takes_functions = True  # its terms tell uses apart by position or kind

    batch_first = True  # channel norms: (N, C, *)

    # the terms by fimfast.ops.norm_terms on the CPU: features last and contiguous (the
    # per-position norms, benchmarks/results/layernorm_terms_2026-12-07.md), or positions
    # contiguous (the channel norms' (N, L, C) views: one dot product per column, sample and
    # channel, benchmarks/results/small_cnn_cpu_2026-12-07.md)
    fused_terms = True
    # one column in one chunk: the product in xhat's place instead of the kernel (the channel
    # norms: as fast in a step, and xhat freed at once)
    single_in_place = False

    def lead(self, module, y: torch.Tensor) -> int:
        return 1

    def capture(self, cap, module, x, y):
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        # the uses kept while the module holds the same tensors (Capture.uses_of)
        uses, internal, ukey = cap.uses_of(
            module, self, (w, b), lambda: [Use(p, UseKind.VEC) for p in trainable(cap, w, b)])
        lead = self.lead(module, y)
        if lead < 1:
            return None
        # a per-position norm over a batch folded into its first dim: recorded unfolded
        # (fimfast.rules.linear.folded)
        k, x0 = 0 if self.batch_first else folded(cap.samples, y), x
        if k:
            y, x, lead = y.reshape(-1, k, *y.shape[1:]), x.reshape(-1, k, *x.shape[1:]), lead + 1
        seen = (id(module), "columns")  # most columns of a chunk, this estimator's last step
        if cap.memo.get(seen, 2) > 1:
            y = self.fold(module, x, y)
        tap, out = cap.tap(y, lead=lead, key=(id(module), 0), batch_first=self.batch_first)
        # by position: a use may name the parameter behind w
        weights = [u.param is w for u in uses]
        cap.record(Call(module, self, [tap], uses,
                        {"x": x.detach(), "weights": weights, "memo": (cap.memo, seen)}),
                   internal, ukey)
        if not k:
            return out
        out = out.flatten(0, 1)
        fold_rows.mark(cap, tap, x0, out, cap.samples)  # rows folded by size only: refold
        return out

    def fold(self, module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The output ``y`` as the output of a node whose backward takes a batch of columns at
        once (:mod:`fimfast.rules.norm_node`), where the estimator's last step batched several
        columns in a chunk; ``y`` itself by default."""
        return y

    def xhat(self, module, x: torch.Tensor, data: dict) -> torch.Tensor:
        """Normalised input, shaped like ``x``, in ``x``'s dtype."""
        raise NotImplementedError

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        tap = call.taps[0]
        m = call.module
        if "memo" in call.data:  # one column per chunk: no node in the next step
            memo, seen = call.data["memo"]
            memo[seen] = call.data["M"] = max(G.shape[0], call.data.get("M", 0))
        dt = compute_dtype(G.dtype)
        Gf = self.front(tap, G.to(dt), extra=1)
        weights = call.data["weights"]
        single = call.chunks == 1 and Gf.shape[0] == 1  # xhat read once (below)
        # both in one pass, no (M, N, T, D) product
        fused = self.fused_terms and not (single and self.single_in_place)
        if fused and any(weights) and _fused(Gf):
            W, B = self.fused(tap, m, Gf, call.data, dt)
            return [Vec(W if is_w else B) for is_w in weights]
        if "xhat" not in call.data:
            call.data["xhat"] = self.front(tap, self.xhat(m, call.data["x"].to(dt), call.data))
        xh = call.data["xhat"]
        if single:  # xhat is read once: the product in its place
            data = call.data
            prod = lambda: data.pop("xhat").mul_(Gf[0]).sum(1).unsqueeze(0)  # noqa: E731
        else:
            prod = lambda: (Gf * xh).sum(2)  # noqa: E731
        return [Vec(prod() if is_w else Gf.sum(2)) for is_w in weights]

    def front(self, tap, t: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """``(*extra, N, T, *param_shape)``."""
        return front(t, tap.bdim, tap.lead, extra)

    def fused(self, tap, module, Gf: torch.Tensor, data: dict, dt) -> tuple:
        """The weight's and the bias's terms, ``(M, N, *param_shape)`` each, by
        :func:`fimfast.ops.norm_terms.norm_terms_cpp` (``xhat`` formed once per step)."""
        if "xhat" not in data:
            data["xhat"] = self.front(tap, self.xhat(module, data["x"].to(dt), data))
        return _terms(Gf, data["xhat"], None)


def _fused(G: torch.Tensor) -> bool:
    """Whether the norm's terms go to :func:`fimfast.ops.norm_terms.norm_terms_cpp` (the cpp
    backend picked for a CPU tensor of float32 or float64)."""
    if G.device.type != "cpu" or G.dtype not in (torch.float32, torch.float64):
        return False
    # bound: one dict lookup once chosen (resolve: ~20 us a call inside a step)
    return bound("norm_terms", None, G.device) is norm_terms_cpp


def _terms(Gf: torch.Tensor, X: torch.Tensor, eps: float | None) -> tuple:
    """:func:`~fimfast.ops.norm_terms.norm_terms_cpp` on the parameter's dims flattened into
    one, the results in the parameter's shape."""
    shape = Gf.shape[3:]
    W, B = norm_terms_cpp(Gf.flatten(3), X.flatten(2), eps)
    return W.unflatten(2, shape), B.unflatten(2, shape)


class LayerNormRule(_NormRule):
    """``nn.LayerNorm`` (affine weight, optional bias) over its trailing ``normalized_shape``."""

    name = "layernorm"
    batch_first = False

    def lead(self, module, y):
        return y.dim() - len(module.normalized_shape)

    def fused(self, tap, module, Gf, data, dt):
        # each row normalised in the kernel: no normalised copy of the input
        return _terms(Gf, self.front(tap, data["x"].to(dt)), module.eps)

    def xhat(self, module, x, data):
        # torch's own kernel (the forward's numerics; 10x faster than var_mean on short rows)
        # with a unit weight: the same values as without the affine (x * 1 is exact), and half
        # the time of the CPU kernel's path without a weight (77 vs 125 us at (32, 32, 64))
        shape = tuple(module.normalized_shape)
        return F.layer_norm(x, shape, _ones(shape, x), None, module.eps)


_ONES: dict[tuple, torch.Tensor] = {}


def _ones(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A tensor of ones of ``shape`` in ``like``'s dtype and device (kept, read only)."""
    key = (shape, like.dtype, like.device)
    t = _ONES.get(key)
    if t is None:
        if len(_ONES) >= 32:
            _ONES.clear()
        t = _ONES[key] = torch.ones(shape, dtype=like.dtype, device=like.device)
    return t


class RMSNormRule(_NormRule):
    """``nn.RMSNorm``: ``xhat = x / sqrt(mean(x^2) + eps)`` (``eps=None``: the dtype's eps)."""

    name = "rmsnorm"
    batch_first = False

    def lead(self, module, y):
        return y.dim() - len(module.normalized_shape)

    def capture(self, cap, module, x, y):
        out = super().capture(cap, module, x, y)
        if out is not None:
            cap.calls[-1].data["eps"] = (
                torch.finfo(x.dtype).eps if module.eps is None else module.eps
            )
        return out

    def xhat(self, module, x, data):
        return F.rms_norm(x, module.normalized_shape, None, data["eps"])


class _ChannelNormRule(_NormRule):
    """Norms with a per-channel affine on dim 1 of ``(N, C, *)``: GroupNorm, BatchNorm,
    InstanceNorm."""

    single_in_place = True

    def front(self, tap, t, extra=0):
        # (*extra, N, C, *spatial) -> (*extra, N, L, C): channels last so Vec sums over dim 2
        s = t.shape
        return t.reshape(*s[: extra + 2], -1).transpose(-1, -2)

    def capture_stats(self, cap, module, x, y, running: bool):
        """:meth:`capture`, keeping in the call's ``stats`` copies of the module's running
        statistics when it normalises with them (``running``: they may change before the terms
        run), ``None`` when it normalises with statistics of its input."""
        out = super().capture(cap, module, x, y)
        if out is not None:
            stats = None
            if running:
                stats = (module.running_mean.detach().clone(), module.running_var.detach().clone())
            cap.calls[-1].data["stats"] = stats
        return out


def _running(x: torch.Tensor, stats: tuple, eps: float) -> torch.Tensor:
    """``x`` normalised per channel (dim 1) with the running statistics ``stats`` (the kernel
    of ``F.batch_norm``, called without its Python wrapper: 3-5 us a call)."""
    m, v = stats
    dt = x.dtype
    return torch.batch_norm(x, None, None, m if m.dtype == dt else m.to(dt),
                            v if v.dtype == dt else v.to(dt), False, 0.0, eps,
                            torch.backends.cudnn.enabled)


class GroupNormRule(_ChannelNormRule):
    """``nn.GroupNorm`` with ``affine=True``."""

    name = "groupnorm"

    def accepts(self, module):
        return module.affine

    def xhat(self, module, x, data):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class BatchNormRule(_ChannelNormRule):
    """``nn.BatchNorm1d/2d/3d`` with ``affine=True``: running statistics in eval mode, the batch
    statistics the forward used in train mode (the layers below it are then coupled across
    samples; the engine's probe sends their parameters to the generic path)."""

    name = "batchnorm"

    def accepts(self, module):
        return module.affine

    def capture(self, cap, module, x, y):
        use_batch = module.training or (module.running_mean is None and module.running_var is None)
        return self.capture_stats(cap, module, x, y, running=not use_batch)

    def fold(self, module, x, y):
        if module.training or module.running_mean is None:  # batch statistics
            return y
        return norm_node.fold(x, y, module.bias)

    def xhat(self, module, x, data):
        stats = data["stats"]
        if stats is None:  # batch statistics, running statistics untouched (None)
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return _running(x, stats, module.eps)


class InstanceNormRule(_ChannelNormRule):
    """``nn.InstanceNorm1d/2d/3d`` with ``affine=True``: ``xhat`` per sample and channel, from the
    input's statistics (train mode, or ``track_running_stats=False``) or from copies of the
    running statistics (eval mode with ``track_running_stats=True``). The forward's own update
    of the running statistics (train mode) is torch's: the rule reads them, never writes them.

    An unbatched input (``(C, L)`` for ``InstanceNorm1d``, which torch normalises as one sample)
    has no batch dimension: the call is refused and its parameters take the generic path."""

    name = "instancenorm"

    def accepts(self, module):
        return module.affine

    def capture(self, cap, module, x, y):
        if x.dim() == module._get_no_batch_dim():
            uses = [Use(p, UseKind.VEC) for p in trainable(cap, module.weight, module.bias)]
            cap.record(Call(module, self, [], uses, {}, ok=False, reason=(
                f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}: "
                "no dimension of it is the batch")))
            return None
        use_input = module.training or not module.track_running_stats
        return self.capture_stats(cap, module, x, y, running=not use_input)

    def xhat(self, module, x, data):
        stats = data["stats"]
        if stats is None:  # the input's statistics, per sample and channel
            if x.dtype in (torch.float32, torch.float64):
                # a group per channel: the same statistics, by the group norm's kernel (1 thread,
                # 16 x 16 x 16 x 16: 32 vs 105 us for instance_norm's batch norm of N C channels)
                return F.group_norm(x, x.shape[1], None, None, module.eps)
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        return _running(x, stats, module.eps)
