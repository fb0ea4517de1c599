"""Conversions between the structured Fisher matrices and NNGeometry's ``PMat*`` objects.

NNGeometry lays parameters out per layer of a ``LayerCollection`` (weight, then bias); fimfast in
``model.named_parameters()`` order. Both sides must hold the same parameters. Supported pairs:
``DenseFIM`` - ``PMatDense``, ``BlockDiagFIM`` - ``PMatBlockDiag``, ``LowRankFIM`` -
``PMatLowRank``, ``KFACFIM`` - ``PMatKFAC``, ``EKFACFIM`` - ``PMatEKFAC``, ``QuasiDiagFIM`` -
``PMatQuasiDiag``. (NNGeometry's KFAC/EKFAC factors are the same matrices as fimfast's up to a
scale moved between ``A`` and ``G`` for convolutions; the products agree.)
"""

from __future__ import annotations

from typing import Any

import torch

from fimfast.diagfim import _nngeometry_entries
from fimfast.structured.base import StructuredFIM
from fimfast.structured.dense import BlockDiagFIM, DenseFIM, LowRankFIM, module_blocks
from fimfast.structured.kron import EKFACFIM, KFACFIM, QuasiDiagFIM


def _collection(target: Any):
    from nngeometry.layercollection import LayerCollection

    if isinstance(target, torch.nn.Module):
        return LayerCollection.from_model(target)
    if isinstance(target, LayerCollection):
        return target
    raise TypeError("target must be an nngeometry LayerCollection or a torch.nn.Module; got "
                    f"{type(target).__name__}")


def _check_same(F: StructuredFIM, lc) -> list[tuple[str, tuple[int, ...]]]:
    entries = _nngeometry_entries(lc)
    theirs = {n: s for n, s in entries}
    ours = dict(zip(F.names, F.shapes))
    if theirs != ours:
        only_a = sorted(set(ours) - set(theirs))[:4]
        only_b = sorted(set(theirs) - set(ours))[:4]
        raise ValueError("the layer collection and this Fisher hold different parameters (only "
                         f"here: {only_a}; only in the collection: {only_b}; or other shapes)")
    return entries


def _perm(F: StructuredFIM, names: list[str]) -> torch.Tensor:
    """Flat positions (in ``F``) of the parameters ``names``, concatenated."""
    return torch.cat([torch.arange(F.slice_of(n).start, F.slice_of(n).stop) for n in names])


def _layer_names(lid: str, layer) -> list[str]:
    p = f"{lid}." if lid else ""
    return [p + "weight"] + ([p + "bias"] if getattr(layer, "bias", None) is not None else [])


class _Generator:
    """The generator of a converted ``PMat*``: NNGeometry's ``DummyGenerator`` (its layer
    collection and device) with the matrix's dtype, which ``PMatEKFAC.to_torch`` asks for
    (``DummyGenerator`` has no ``get_dtype``: the converted EKFAC's ``to_torch()`` raised an
    ``AttributeError``)."""

    def __init__(self, layer_collection, device, dtype: torch.dtype):
        self.layer_collection, self.device, self.dtype = layer_collection, device, dtype

    def get_device(self):
        return self.device

    def get_dtype(self) -> torch.dtype:
        return self.dtype


def to_nngeometry(F: StructuredFIM, target: Any):
    """``F`` as the matching NNGeometry ``PMat*`` (see the module docstring)."""
    from nngeometry import object as ngo

    for info in getattr(F, "layers", []):
        if info.get("kind", "linear") != "linear" or "row0" in info:
            raise ValueError(f"layer {info['name']!r} ({info.get('kind', 'attention projection')})"
                             f" has no NNGeometry {type(F).__name__} counterpart (NNGeometry's "
                             "Kronecker and quasi-diagonal matrices cover Linear and Conv2d)")
    lc = _collection(target)
    entries = _check_same(F, lc)
    dev = next(iter(F._tensors().values())).device
    gen = _Generator(lc, dev, F.dtype)
    if isinstance(F, DenseFIM):
        p = _perm(F, [n for n, _ in entries]).to(dev)
        return ngo.PMatDense(generator=gen, data=F.data[p][:, p])
    if isinstance(F, LowRankFIM):
        p = _perm(F, [n for n, _ in entries]).to(dev)
        return ngo.PMatLowRank(generator=gen, data=F.factor[:, p].unsqueeze(0))
    if isinstance(F, BlockDiagFIM):
        data = {}
        for lid, layer in lc.layers.items():
            names = _layer_names(lid, layer)
            k = next(b for b, (i, j) in enumerate(F.blocks) if names[0] in F.names[i:j])
            i, j = F.blocks[k]
            if set(F.names[i:j]) != set(names):
                raise ValueError(f"block {F.names[i:j]} is not NNGeometry's layer {lid!r}")
            p = _perm(F, names) - F.offsets[i]
            data[lid] = F.data[k][p][:, p]
        return ngo.PMatBlockDiag(generator=gen, data=data)
    by_weight = {info["weight"]: i for i, info in enumerate(F.layers)}
    idx = {lid: by_weight[_layer_names(lid, layer)[0]] for lid, layer in lc.layers.items()}
    if isinstance(F, KFACFIM):
        return ngo.PMatKFAC(generator=gen, data={lid: (F.A[i], F.G[i]) for lid, i in idx.items()})
    if isinstance(F, EKFACFIM):
        evecs = {lid: (F.UA[i], F.UG[i]) for lid, i in idx.items()}
        return ngo.PMatEKFAC(generator=gen, data=(evecs, {lid: F.D[i] for lid, i in idx.items()}))
    if isinstance(F, QuasiDiagFIM):
        data = {}
        for lid, i in idx.items():
            dg, c = F.dg[i], F.cross[i]
            w_shape = F.shapes[F.names.index(F.layers[i]["weight"])]
            if c is None:
                data[lid] = (dg.reshape(-1), None)
            else:
                data[lid] = (torch.cat([dg[:, :-1].reshape(-1), dg[:, -1]]), c.reshape(w_shape))
        return ngo.PMatQuasiDiag(generator=gen, data=data)
    raise TypeError(f"no NNGeometry counterpart for {type(F).__name__}")


def from_nngeometry(pmat: Any, model: torch.nn.Module, meta: dict | None = None) -> StructuredFIM:
    """A structured Fisher from an NNGeometry ``PMat*`` whose collection holds exactly the
    trainable parameters of ``model`` (results in ``model.named_parameters()`` order)."""
    from nngeometry import object as ngo

    lc = getattr(getattr(pmat, "generator", None), "layer_collection", None)
    if lc is None:
        raise TypeError(f"pmat must be an NNGeometry PMat; got {type(pmat).__name__}")
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [s for _, s in named]
    layout = StructuredFIM(names, shapes, None)
    entries = _check_same(layout, lc)
    meta = dict(meta or {"source": "nngeometry"})
    theirs = _perm(layout, [n for n, _ in entries])
    inv = torch.empty_like(theirs)
    inv[theirs] = torch.arange(theirs.numel())
    if isinstance(pmat, ngo.PMatDense):
        return DenseFIM(names, shapes, pmat.data[inv][:, inv], meta)
    if isinstance(pmat, ngo.PMatLowRank):
        L = pmat.data.reshape(-1, pmat.data.shape[-1])
        return LowRankFIM(names, shapes, L[:, inv], meta)
    if isinstance(pmat, ngo.PMatBlockDiag):
        blocks, data = module_blocks(names), []
        for i, j in blocks:
            lid = names[i].rsplit(".", 1)[0] if "." in names[i] else ""
            own = _layer_names(lid, lc.layers[lid])
            pos = {n: k for k, n in enumerate(own)}
            sizes = [layout.sizes[names.index(n)] for n in own]
            starts = [sum(sizes[:k]) for k in range(len(own))]
            p = torch.cat([torch.arange(starts[pos[n]], starts[pos[n]] + layout.sizes[t])
                           for t, n in enumerate(names[i:j], start=i)])
            data.append(pmat.data[lid][p][:, p])
        return BlockDiagFIM(names, shapes, data, blocks, meta)
    infos, lids = [], []
    for lid, layer in lc.layers.items():
        own = _layer_names(lid, layer)
        w = tuple(layer.weight.size)
        infos.append({"name": lid, "weight": own[0], "bias": own[1] if len(own) > 1 else None,
                      "O": w[0], "In": layout.sizes[names.index(own[0])] // w[0] + len(own) - 1})
        lids.append(lid)
    if isinstance(pmat, ngo.PMatKFAC):
        return KFACFIM(names, shapes, infos, [pmat.data[k][0] for k in lids],
                       [pmat.data[k][1] for k in lids], meta)
    if isinstance(pmat, ngo.PMatEKFAC):
        evecs, diags = pmat.data
        return EKFACFIM(names, shapes, infos, [evecs[k][0] for k in lids],
                        [evecs[k][1] for k in lids],
                        [diags[k].reshape(i["O"], i["In"]) for k, i in zip(lids, infos)], meta)
    if isinstance(pmat, ngo.PMatQuasiDiag):
        dgs, crosses = [], []
        for k, info in zip(lids, infos):
            d, c = pmat.data[k]
            O, In = info["O"], info["In"]
            if c is None:
                dgs.append(d.reshape(O, In))
                crosses.append(None)
            else:
                dgs.append(torch.cat([d[: O * (In - 1)].reshape(O, In - 1),
                                      d[O * (In - 1):].unsqueeze(1)], 1))
                crosses.append(c.reshape(O, In - 1))
        return QuasiDiagFIM(names, shapes, infos, dgs, crosses, meta)
    raise TypeError(f"no fimfast counterpart for {type(pmat).__name__}")
