"""What a Kronecker-family pass decides once per model structure, kept between calls.

A call of :func:`fimfast.fisher` (a new :class:`~fimfast.structured.FisherAccumulator`) on a
model met before reuses, while the model's structure is unchanged:

* its trainable parameters (:func:`fimfast.parameters.trainable_parameters`, checked real);
* its Kronecker layers (:func:`fimfast.structured.capture.layers_of`) and their plain
  descriptions (:func:`fimfast.structured.engine.layer_info`);
* the module walk of the guards (:class:`fimfast.guard.ModuleWalk`: the modules and the lookups
  with ``max_norm``) and the buffer list of :class:`fimfast.guard.BufferGuard` (each call gets its
  own guard objects, which copy every buffer on their first step, as before).

The structure is a fingerprint taken by one walk of the modules per call: every module (object
and type) under its name, every parameter entry (object, ``requires_grad``, shape, dtype and
device), every buffer name (and whether it is ``None``), the ``max_norm`` of lookups and the
``add_zero_attn`` of attention modules. Freezing or replacing a parameter, adding a module or a
buffer, moving the model to another dtype or device all change it, and the entry is rebuilt.
Everything else a layer reads (a convolution's padding, groups and padding mode, a module's
forward, an embedding's ``padding_idx``) is read again on every batch, as before.

Entries are held per model in a :class:`weakref.WeakKeyDictionary`: an entry never refers to the
model object itself (its modules list and layers are bound to it per call, and a model that is
itself a Kronecker layer, a bare ``nn.Linear``, is not cached), so it goes away with the model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from fimfast import guard
from fimfast.parameters import check_real, trainable_parameters
from fimfast.zero_gates import Verdicts

_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class Structure:
    """The decisions of one model structure (see the module docstring). ``modules`` and
    ``buffers`` leave the model itself out (``buffers``: its own as ``(None, name, name)``);
    :meth:`walk` and :meth:`buffer_guard` bind them to it."""

    key: tuple
    names: list[str]
    params: list[torch.Tensor]
    modules: list[nn.Module]
    tables: list[nn.Module]
    buffers: list[tuple]
    layers: list | None = None  # capture.Layer list (None: not built yet, or not cacheable)
    info: list[dict] | None = None
    reads: tuple | None = None  # what the last walk read (see _unchanged)
    # the layouts whose samples fimfast.structured.apart.check_apart found apart
    apart: Verdicts = field(init=False)

    def __post_init__(self) -> None:
        self.apart = Verdicts(self.params)

    def walk(self, model: nn.Module) -> guard.ModuleWalk:
        """A :class:`~fimfast.guard.ModuleWalk` of ``model`` as it would find it."""
        w = guard.ModuleWalk()  # keyed as ModuleWalk.of keys a walk (no walk on its first call)
        w._key = (id(model), tuple(map(id, self.params)), guard._REGISTRATIONS[0])
        tables = self.tables if not isinstance(model, _LOOKUPS) or model.max_norm is None \
            else [model] + self.tables
        w._walk = ([model] + self.modules, tables)
        return w

    def buffer_guard(self, model: nn.Module) -> guard.BufferGuard:
        """A new :class:`~fimfast.guard.BufferGuard` of ``model`` (first step: every buffer
        copied), its buffer list as its own scan would make it."""
        g = guard.BufferGuard()
        g.adopt(model, [(model if m is None else m, name, qual) for m, name, qual in self.buffers])
        return g

    def step_guard(self, model: nn.Module) -> tuple:
        """The state of :func:`fimfast.structured.engine.kept` for ``model``."""
        return (self.buffer_guard(model), self.walk(model), list(self.names), list(self.params))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module, reads: list | None = None) -> tuple[tuple, list[str],
                                                                     list[torch.Tensor], list]:
    """``(key, names, params, modules)``: the structure key of ``model`` (see the module
    docstring), its trainable parameters in ``model.named_parameters()`` order (tied ones once,
    as :func:`~fimfast.parameters.trainable_parameters`) and ``model.modules()``, in one walk.
    ``reads``: an empty list that receives what :func:`_unchanged` checks (see there)."""
    key: list = []
    names: list[str] = []
    params: list[torch.Tensor] = []
    modules: list[nn.Module] = []
    seen_m: set[int] = set()
    seen_p: set[int] = set()
    tables: list[tuple] = []
    met: list[torch.Tensor] = []
    attrs: list[tuple] = []

    def visit(m: nn.Module, prefix: str) -> None:
        seen_m.add(id(m))
        modules.append(m)
        t = type(m)
        key.append((prefix, id(m), t))
        if reads is not None:
            d = m.__dict__
            for name in ("_parameters", "_buffers", "_modules"):
                tab = d[name]
                # keys(): a ScriptModule's tables are wrappers without __iter__ (the
                # extension's check then finds no dict and the caller walks again)
                tables.append((d, name, tab, tuple(tab.keys()), tuple(tab.values())))
        for k, p in m._parameters.items():
            if p is None:
                key.append((k, None))
                continue
            key.append((k, id(p), p.requires_grad, p.shape, p.dtype, p.device))
            if id(p) not in seen_p:
                seen_p.add(id(p))
                met.append(p)
                if p.requires_grad:
                    names.append(prefix + k)
                    params.append(p)
        if m._buffers:
            key.append(tuple((k, b is None) for k, b in m._buffers.items()))
        attr = _ATTR.get(t)
        if attr is None:
            attr = _ATTR[t] = _attr_of(t)
        if attr:
            key.append(getattr(m, attr))
            attrs.append((None if m is model else m, attr, getattr(m, attr)))
        for k, child in m._modules.items():
            if child is not None and id(child) not in seen_m:
                visit(child, prefix + k + ".")
            else:
                key.append((k, None if child is None else id(child)))

    visit(model, "")
    if reads is not None:
        reads.extend([tables, tuple(met), tuple(p.requires_grad for p in met),
                      tuple(tuple(p.shape) for p in met), [type(model)]
                      + [(m, type(m)) for m in modules[1:]],
                      [(p, p.dtype, p.device) for p in met], attrs])
    return tuple(key), names, params, modules


def _unchanged(model: nn.Module, reads: tuple) -> bool:
    """Whether everything a walk read still holds, checked without a walk (what the key of
    :func:`fingerprint` holds): every dictionary of parameters, buffers and children (the
    dictionary, its keys and values, by identity) and every parameter's ``requires_grad`` and
    sizes, in one call of the compiled extension (csrc/param_walk.cpp); every module's type,
    every parameter's dtype and device and the attributes the key reads. A buffer replaced by
    another tensor, or no extension, makes the caller walk again (and compare the keys). The
    reads hold the model's submodules, never ``model`` itself (``None`` in its place)."""
    holds = _holds()
    tables, met, grads, shapes, types, places, attrs = reads
    if holds is None or not holds(tables, met, grads, met, shapes):
        return False
    return type(model) is types[0] and all(type(m) is t for m, t in types[1:]) and \
        all(p.dtype is dt and p.device == dev for p, dt, dev in places) and \
        all(getattr(model if m is None else m, a) == v for m, a, v in attrs)


def _holds():
    from fimfast.parameters import _HOLDS
    from fimfast.parameters import _holds as look_up

    return _HOLDS[0] if _HOLDS else look_up()


# per module class, the attribute the key reads besides parameters and buffers ("": none)
_ATTR: dict[type, str] = {}


def _attr_of(t: type) -> str:
    if issubclass(t, _LOOKUPS):
        return "max_norm"
    return "add_zero_attn" if issubclass(t, nn.MultiheadAttention) else ""


def of(model: nn.Module) -> Structure:
    """The :class:`Structure` of ``model`` now (from the cache when unchanged).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: it has no trainable parameter.
        UnsupportedModelError: a trainable parameter is complex.
    """
    if not isinstance(model, nn.Module):
        trainable_parameters(model)  # raises the TypeError naming the argument
    hit = _CACHE.get(model)
    if hit is not None and hit.reads is not None and _unchanged(model, hit.reads):
        return hit
    reads: list = []
    key, names, params, modules = fingerprint(model, reads)
    if hit is not None and hit.key == key:
        hit.reads = tuple(reads)
        return hit
    if not names:
        trainable_parameters(model)  # raises the ValueError of a model with nothing to train
    check_real(names, params)
    tables = [m for m in modules if isinstance(m, _LOOKUPS) and m.max_norm is not None]
    buffers = [(m, name, f"{prefix}.{name}" if prefix else name)
               for prefix, m in model.named_modules()
               for name, b in m.named_buffers(recurse=False) if b is not None]
    s = Structure(key, names, params, modules[1:], [t for t in tables if t is not model],
                  [(None if m is model else m, name, qual) for m, name, qual in buffers],
                  reads=tuple(reads))
    _CACHE[model] = s
    return s


def layers(s: Structure, model: nn.Module, representation: str) -> list:
    """The Kronecker layers of ``model`` (:func:`~fimfast.structured.capture.layers_of`; its
    errors name ``representation``), kept in ``s`` unless one is ``model`` itself. The same
    :class:`~fimfast.structured.capture.Layer` objects serve every call (their ``calls`` are set
    and emptied within a batch)."""
    from fimfast.structured import capture, engine

    if s.layers is not None:
        return s.layers
    found = capture.layers_of(model, s.names, s.params, representation)
    if all(layer.module is not model for layer in found):
        s.layers, s.info = found, [engine.layer_info(layer) for layer in found]
    return found


def infos(s: Structure, layers: list) -> list[dict]:
    """``engine.layer_info`` of ``layers`` (kept in ``s`` for its own layers)."""
    from fimfast.structured import engine

    if layers is s.layers and s.info is not None:
        return s.info
    return [engine.layer_info(layer) for layer in layers]
