"""``once``: :func:`functools.cached_property` without its lock.

On Python < 3.12 every first read of a ``cached_property`` takes a re-entrant lock shared by all
instances of the class; the objects of one step (:class:`fimfast.batch.Rows`,
:class:`fimfast.persample.columns.Columns`) are read by one thread and made anew at every step,
so each read paid for it. The value is computed on the first read and stored in the instance's
``__dict__`` under the attribute's name, where later reads find it without calling anything
(this descriptor defines no ``__set__``), exactly as a ``cached_property`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class once:  # noqa: N801 - used as a decorator, like property
    """A non-data descriptor computing ``fn(instance)`` on the first read of the attribute and
    storing it in the instance's ``__dict__`` (see the module docstring)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value
