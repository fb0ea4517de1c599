"""Kronecker-factored (KFAC), eigenbasis-refitted (EKFAC) and quasi-diagonal Fisher matrices.

Each supported layer's weight and bias form one ``(O, I')`` matrix ``V`` (bias as the last column,
see :mod:`fimfast.structured.capture`); vectors are mapped to it and back, so every result is in
``model.named_parameters()`` order with the weight flattened row-major. Per layer:

* KFAC: ``F_l = A (x) G`` acting as ``V -> G V A`` (``A``: ``(I', I')`` input second moments,
  ``G``: ``(O, O)`` output-gradient second moments);
* EKFAC: ``F_l = (U_G (x) U_A) diag(D) (U_G (x) U_A)^T`` acting as
  ``V -> U_G (D o (U_G^T V U_A)) U_A^T``;
* quasi-diagonal: the diagonal plus, for every output neuron ``o``, the cross terms between
  ``W[o, :]`` and ``b[o]`` (an arrowhead block per neuron).
"""

from __future__ import annotations

import math

import torch

from fimfast.structured import factors as fx
from fimfast.structured import gram
from fimfast.structured.base import (
    StructuredFIM,
    check_arrowheads,
    check_damping,
    check_draws,
    check_invertible,
    register,
)
from fimfast.structured.sums import HalfGram

# layouts whose ranges passed _Layered's checks: names -> (shapes, layer descriptions)
_CHECKED: dict[tuple, tuple] = {}


class _Layered(StructuredFIM):
    """Layers as ``{"weight", "bias", "O", "In"}`` dicts; flat vectors <-> ``(O, I')`` matrices."""

    def __init__(self, names, shapes, layers: list[dict], meta):
        super().__init__(names, shapes, meta)
        self.layers = [dict(info) for info in layers]
        # the layout checks are a function of (names, shapes, layers): done once per layout
        self._checked = _CHECKED.get(tuple(self.names)) == (self.shapes, self.layers)
        self._ranges = [] if self._checked else [self._layer_ranges(i) for i in self.layers]
        self._pos_cache: list[torch.Tensor] | None = None

    @property
    def _pos(self) -> list[torch.Tensor]:
        """Per layer, the ``(O, I')`` flat positions of its matrix (built on first use)."""
        if self._pos_cache is None:
            self._pos_cache = [self._positions(info) for info in self.layers]
        return self._pos_cache

    def _layer_ranges(self, info: dict) -> list[tuple[int, int]]:
        """The flat ``[start, stop)`` ranges a layer covers (checked against the shapes)."""
        O, In, kind = info["O"], info["In"], info.get("kind", "linear")
        w = self.slice_of(info["weight"])
        nw = w.stop - w.start
        I = In - (info["bias"] is not None)  # noqa: E741
        if kind == "embedding":
            if nw != O * I:
                raise ValueError(f"layer {info['weight']!r}: weight of {nw} entries is not "
                                 f"V={I} rows of D={O}")
            out = [(w.start, w.stop)]
        elif kind == "layernorm":
            if nw != O or I != 1:
                raise ValueError(f"layer {info['weight']!r}: weight of {nw} entries is not "
                                 f"{O} features")
            out = [(w.start, w.stop)]
        else:
            r0 = info.get("row0", 0)
            if I < 1 or nw % I or (r0 + O) * I > nw:
                raise ValueError(f"layer {info['weight']!r}: weight of {nw} entries has no rows "
                                 f"{r0}..{r0 + O} of I={I} entries")
            out = [(w.start + r0 * I, w.start + (r0 + O) * I)]
        if info["bias"] is not None:
            b = self.slice_of(info["bias"])
            b0 = b.start + info.get("bias_row0", 0)
            if b0 + O > b.stop:
                raise ValueError(f"layer {info['bias']!r}: bias of {b.stop - b.start} entries "
                                 f"has no entries {b0 - b.start}..{b0 - b.start + O}")
            out.append((b0, b0 + O))
        return out

    def _positions(self, info: dict) -> torch.Tensor:
        """``(O, I')`` flat positions of the layer's matrix (docs/structured.md, "KFAC")."""
        O, In, kind = info["O"], info["In"], info.get("kind", "linear")
        w = self.slice_of(info["weight"])
        I = In - (info["bias"] is not None)  # noqa: E741
        pos = torch.empty(O, In, dtype=torch.int64)
        if kind == "embedding":
            pos[:] = torch.arange(w.start, w.stop).reshape(I, O).T
            return pos
        if kind == "layernorm":
            pos[:, 0] = torch.arange(w.start, w.stop)
        else:
            r0 = info.get("row0", 0)
            pos[:, :I] = torch.arange(w.start + r0 * I, w.start + (r0 + O) * I).reshape(O, I)
        if info["bias"] is not None:
            b0 = self.slice_of(info["bias"]).start + info.get("bias_row0", 0)
            pos[:, -1] = torch.arange(b0, b0 + O)
        return pos

    def _kind(self, i: int) -> str:
        return self.layers[i].get("kind", "linear")

    def _mat(self, x: torch.Tensor, i: int) -> torch.Tensor:
        pos = self._pos[i].to(x.device)
        return x[pos]

    def _check_cover(self) -> None:
        """The layers' ranges tile ``[0, P)`` exactly (no overlap, nothing left out)."""
        if self._checked:
            return
        end = 0
        for a, b in sorted(r for rs in self._ranges for r in rs):
            if a != end:
                what = "gap" if a > end else "overlap"
                raise ValueError(f"the layers cover the parameters with a {what} at flat "
                                 f"position {min(a, end)} (of {self.numel()})")
            end = b
        if end != self.numel():
            raise ValueError(f"the layers cover {end} of the {self.numel()} parameters")
        if len(_CHECKED) >= 32:
            _CHECKED.clear()
        _CHECKED[tuple(self.names)] = (list(self.shapes), [dict(i) for i in self.layers])

    def _assemble(self, mats: list[torch.Tensor]) -> torch.Tensor:
        out = mats[0].new_zeros(self.numel())
        for pos, m in zip(self._pos, mats):
            out[pos.to(m.device).reshape(-1)] = m.reshape(-1)
        return out

    def _dense_blocks(self, blocks) -> torch.Tensor:  # an iterable, read after the size check
        self._dense_check()
        P, M = self.numel(), None
        for pos, blk in zip(self._pos, blocks):
            M = blk.new_zeros(P, P) if M is None else M
            p = pos.to(blk.device).reshape(-1)
            M[p.unsqueeze(1), p.unsqueeze(0)] = blk
        return M

    def _extra(self):
        return {"layers": self.layers}


@register("kfac")
class KFACFIM(_Layered):
    """``F ~ blockdiag_l(A_l (x) G_l)`` (NNGeometry's ``PMatKFAC``, curvlinops'
    ``KFACLinearOperator``). ``A``, ``G``: lists of factors, one per layer (tensors, or
    :class:`~fimfast.structured.sums.HalfGram` sums completed on first read of ``A`` / ``G``;
    :meth:`eig` takes their eigenpairs without completing them)."""

    def __init__(self, names, shapes, layers, A, G, meta=None):
        super().__init__(names, shapes, layers, meta)
        self._A, self._G = list(A), list(G)
        for i, (info, a, g) in enumerate(zip(self.layers, self._A, self._G)):
            want = fx.expected_shapes(self._kind(i), info["O"], info["In"])
            got_a = (a.shape[1],) if a.is_sparse else tuple(a.shape)  # reduce: (N, V) rows
            if (got_a, tuple(g.shape)) != want:
                raise ValueError(f"layer {info['weight']!r} ({self._kind(i)}): factors "
                                 f"{tuple(a.shape)}, {tuple(g.shape)}; expected {want[0]}, "
                                 f"{want[1]}")
        self._check_cover()
        self._eig = None
        self._ekfac: EKFACFIM | None = None

    @property
    def A(self) -> list[torch.Tensor]:
        """The input factors (symmetric tensors; an embedding's: see the module docstring)."""
        self._A = [_full(a) for a in self._A]
        return self._A

    @property
    def G(self) -> list[torch.Tensor]:
        """The output-gradient factors ``(O, O)``."""
        self._G = [_full(g) for g in self._G]
        return self._G

    @property
    def dtype(self):
        return self._A[0].dtype

    def eig(self):
        """Per layer ``(lam_A, U_A, lam_G, U_G)``, cached (an embedding under ``reduce``:
        ``(lam_A, W, lam_G, U_G)`` with ``U_A = C^T W lam_A^{-1/2}``, see
        :mod:`fimfast.structured.gram`)."""
        if self._eig is None:
            self._eig = []
            for i in range(len(self.layers)):
                if self._kind(i) == "layernorm":  # the eigenpairs of the Hadamard block
                    self._A[i], self._G[i] = _full(self._A[i]), _full(self._G[i])
                self._eig.append(fx.eig(self._kind(i), self._A[i], self._G[i]))
        return self._eig

    def _mv(self, x):
        x = x.to(self.dtype)
        return self._assemble([fx.kfac_mv(self._kind(i), a, g, self._mat(x, i))
                               for i, (a, g) in enumerate(zip(self.A, self.G))])

    def _rows(self) -> list[str]:
        """Names of the embeddings whose input factor is a row factor (``reduce``)."""
        return [info["name"] for info, a in zip(self.layers, self._A) if a.is_sparse]

    def _solve(self, x, d):
        if self._rows():
            return self._solve_rows(x, d)
        if self._ekfac is None:
            self._ekfac = self.to_ekfac()
        return self._ekfac._solve(x, d)

    def _solve_rows(self, x, d):
        """Layer by layer in the Kronecker eigenbasis, an embedding's ``reduce`` factor through
        its Gram matrix (:func:`fimfast.structured.gram.solve`)."""
        x = x.to(self.dtype)
        mats = []
        for i, (a, e) in enumerate(zip(self.A, self.eig())):
            k, X = self._kind(i), self._mat(x, i)
            if a.is_sparse:
                mats.append(gram.solve(a, e[0], e[1], e[2], e[3], X, d))
                continue
            c = fx.rotate(k, e[1], e[3], X)
            mats.append(fx.unrotate(k, e[1], e[3], c / (fx.eig_values(k, e[0], e[2]) + d)))
        return self._assemble(mats)

    def to_ekfac(self) -> EKFACFIM:
        """The same matrix in its Kronecker eigenbasis (``D = lam_G lam_A^T``), no refit."""
        if self._rows():
            raise ValueError(f"layers {self._rows()} (nn.Embedding, kfac_approx='reduce') have "
                             "an input factor of rank at most the number of samples, kept "
                             "through its Gram matrix: no complete V x V eigenbasis is formed, "
                             "so there is no EKFAC form; use solve(), or kfac_approx='expand'")
        eig = self.eig()
        return EKFACFIM(self.names, self.shapes, self.layers, [e[1] for e in eig],
                        [e[3] for e in eig],
                        [fx.eig_values(self._kind(i), e[0], e[2]) for i, e in enumerate(eig)],
                        dict(self.meta))

    def inverse(self, damping: float = 1e-3) -> EKFACFIM:
        """``(F + damping I)^{-1}`` exactly (eigenvalues ``1 / (lam_G lam_A + damping)`` in the
        Kronecker eigenbasis; not the factor-damped ``(A + pi s I)^-1 (x) (G + s/pi I)^-1``).
        With an embedding's ``reduce`` factor: a ``DenseFIM``, within the dense limit."""
        if self._rows():
            return StructuredFIM.inverse(self, damping)
        return self.to_ekfac().inverse(damping)

    def to_dense(self):
        return self._dense_blocks(fx.kfac_block(self._kind(i), a, g)
                                  for i, (a, g) in enumerate(zip(self.A, self.G)))

    def _kdiag(self):
        return [fx.kfac_diag(self._kind(i), a, g) for i, (a, g) in enumerate(zip(self.A, self.G))]

    def _diag(self):
        return self._assemble(self._kdiag())

    def trace(self):
        return float(sum(d.double().sum() for d in self._kdiag()))

    def frobenius_norm(self):
        return math.sqrt(float(sum(fx.kfac_fro2(self._kind(i), a, g)
                                   for i, (a, g) in enumerate(zip(self.A, self.G)))))

    def _tensors(self):
        t = {f"A{i}": a for i, a in enumerate(self.A) if not a.is_sparse}
        for i, a in enumerate(self.A):
            if a.is_sparse:
                t.update({f"A{i}_{k}": v for k, v in gram.pack(a).items()})
        t.update({f"G{i}": g for i, g in enumerate(self.G)})
        return t

    def _extra(self):
        return {"layers": self.layers,
                "rows": {str(i): list(a.shape) for i, a in enumerate(self.A) if a.is_sparse}}

    @classmethod
    def _from_tensors(cls, names, shapes, t, extra, meta):
        n, rows = len(extra["layers"]), extra.get("rows", {})
        A = [gram.unpack(t, f"A{i}", rows[str(i)]) if str(i) in rows else t[f"A{i}"]
             for i in range(n)]
        return cls(names, shapes, extra["layers"], A, [t[f"G{i}"] for i in range(n)], meta)


def _full(f):
    return f.full() if isinstance(f, HalfGram) else f


@register("ekfac")
class EKFACFIM(_Layered):
    """``F ~ blockdiag_l (U_G (x) U_A) diag(D) (U_G (x) U_A)^T`` (NNGeometry's ``PMatEKFAC``;
    George et al., 2018). ``D[o, i]`` scales the eigen-direction ``U_G[:, o] U_A[:, i]^T``."""

    def __init__(self, names, shapes, layers, UA, UG, D, meta=None):
        super().__init__(names, shapes, layers, meta)
        self.UA, self.UG, self.D = list(UA), list(UG), list(D)
        for info, d in zip(self.layers, self.D):
            if tuple(d.shape) != (info["O"], info["In"]):
                raise ValueError(f"layer {info['weight']!r}: D has shape {tuple(d.shape)}; "
                                 f"expected ({info['O']}, {info['In']})")
        self._check_cover()

    @property
    def dtype(self):
        return self.D[0].dtype

    def _apply(self, x, fn):
        x = x.to(self.dtype)
        mats = []
        for i, (ua, ug, d) in enumerate(zip(self.UA, self.UG, self.D)):
            k = self._kind(i)
            c = fx.rotate(k, ua, ug, self._mat(x, i))
            mats.append(fx.unrotate(k, ua, ug, fn(c, d)))
        return self._assemble(mats)

    def _mv(self, x):
        return self._apply(x, lambda c, d: c * d)

    def _solve(self, x, damp):
        check_invertible(self.D, damp)
        return self._apply(x, lambda c, d: c / (d + damp))

    def inverse(self, damping: float = 1e-3) -> EKFACFIM:
        """``(F + damping I)^{-1}`` (same eigenbasis, ``1 / (D + damping)``)."""
        damp = check_damping(damping)
        check_invertible(self.D, damp)
        return EKFACFIM(self.names, self.shapes, self.layers, self.UA, self.UG,
                        [1.0 / (d + damp) for d in self.D], {**self.meta, "inverse_damping": damp})

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from ``N(0, F)`` as ``(n, P)`` rows ``F^{1/2} eps`` (negative ``D`` are
        taken as 0). With ``F.inverse(prior_precision)`` these are Laplace posterior draws."""
        check_draws(n)
        out = []
        for _ in range(n):
            mats = []
            for i, (ua, ug, d) in enumerate(zip(self.UA, self.UG, self.D)):
                e = torch.randn(d.shape, generator=generator, dtype=d.dtype, device=d.device)
                mats.append(fx.unrotate(self._kind(i), ua, ug, d.clamp_min(0).sqrt() * e))
            out.append(self._assemble(mats))
        return torch.stack(out)

    def to_dense(self):
        return self._dense_blocks(fx.ekfac_block(self._kind(i), ua, ug, d)
                                  for i, (ua, ug, d) in enumerate(zip(self.UA, self.UG, self.D)))

    def _diag(self):
        return self._assemble([fx.ekfac_diag(self._kind(i), ua, ug, d)
                               for i, (ua, ug, d) in enumerate(zip(self.UA, self.UG, self.D))])

    def trace(self):
        return float(sum(d.double().sum() for d in self.D))

    def frobenius_norm(self):
        return math.sqrt(float(sum((d.double() ** 2).sum() for d in self.D)))

    def _tensors(self):
        t = {}
        for i, (ua, ug, d) in enumerate(zip(self.UA, self.UG, self.D)):
            t[f"D{i}"] = d
            if ua is not None:
                t[f"UA{i}"] = ua
            if ug is not None:
                t[f"UG{i}"] = ug
        return t

    @classmethod
    def _from_tensors(cls, names, shapes, t, extra, meta):
        n = len(extra["layers"])
        return cls(names, shapes, extra["layers"], [t.get(f"UA{i}") for i in range(n)],
                   [t.get(f"UG{i}") for i in range(n)], [t[f"D{i}"] for i in range(n)], meta)


@register("quasi_diag")
class QuasiDiagFIM(_Layered):
    """Diagonal plus weight-bias cross terms per output neuron (Ollivier, 2015; NNGeometry's
    ``PMatQuasiDiag``). ``diag[l]``: ``(O, I')``; ``cross[l]``: ``(O, I)`` entries
    ``F[W[o, i], b[o]]`` (``None`` for a layer without bias)."""

    def __init__(self, names, shapes, layers, diag, cross, meta=None):
        super().__init__(names, shapes, layers, meta)
        self.dg, self.cross = list(diag), list(cross)
        self._check_cover()

    @property
    def dtype(self):
        return self.dg[0].dtype

    def _mv(self, x):
        x = x.to(self.dtype)
        mats = []
        for i, (dg, c) in enumerate(zip(self.dg, self.cross)):
            V = self._mat(x, i)
            out = dg * V
            if c is not None:
                out[:, :-1] += c * V[:, -1:]
                out[:, -1] += (c * V[:, :-1]).sum(1)
            mats.append(out)
        return self._assemble(mats)

    def _solve(self, x, damp):
        check_arrowheads(self.dg, self.cross, damp)
        x = x.to(self.dtype)
        mats = []
        for i, (dg, c) in enumerate(zip(self.dg, self.cross)):
            V = self._mat(x, i)
            d = dg + damp
            if c is None:
                mats.append(V / d)
                continue
            dw, db = d[:, :-1], d[:, -1]
            vw, vb = V[:, :-1], V[:, -1]
            b = (vb - (c / dw * vw).sum(1)) / (db - (c * c / dw).sum(1))  # Schur complement
            mats.append(torch.cat([(vw - b.unsqueeze(1) * c) / dw, b.unsqueeze(1)], 1))
        return self._assemble(mats)

    def to_dense(self):
        self._dense_check()  # before any block: one layer's alone can be far above the limit
        blocks = []
        for dg, c in zip(self.dg, self.cross):
            blk = torch.diag(dg.reshape(-1))
            if c is not None:
                (O, In), k = dg.shape, c.reshape(-1)
                o, i = torch.arange(O).repeat_interleave(In - 1), torch.arange(In - 1).repeat(O)
                blk[o * In + i, o * In + In - 1] = k
                blk[o * In + In - 1, o * In + i] = k
            blocks.append(blk)
        return self._dense_blocks(blocks)

    def _diag(self):
        return self._assemble(self.dg)

    def trace(self):
        return float(sum(d.double().sum() for d in self.dg))

    def frobenius_norm(self):
        s = sum((d.double() ** 2).sum() for d in self.dg)
        s = s + 2 * sum((c.double() ** 2).sum() for c in self.cross if c is not None)
        return math.sqrt(float(s))

    def _tensors(self):
        t = {f"diag{i}": d for i, d in enumerate(self.dg)}
        t.update({f"cross{i}": c for i, c in enumerate(self.cross) if c is not None})
        return t

    @classmethod
    def _from_tensors(cls, names, shapes, t, extra, meta):
        n = len(extra["layers"])
        return cls(names, shapes, extra["layers"], [t[f"diag{i}"] for i in range(n)],
                   [t.get(f"cross{i}") for i in range(n)], meta)
