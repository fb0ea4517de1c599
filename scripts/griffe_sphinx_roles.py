"""Griffe extension for the API pages: Sphinx roles in docstrings rendered as code.

fimfast's docstrings are Google style and name other objects with Sphinx roles
(``:class:`~fimfast.DiagFIM```, ``:func:`fimfast.ops.accumulate_```), which read well in
``help()`` and in editors. mkdocstrings' Google parser would show the role itself; this extension
(loaded by ``mkdocs.yml``) rewrites each role to an inline code span of its target, shortened to
the last component when the target starts with ``~``, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def rewrite(text: str) -> str:
    """``text`` with every Sphinx role replaced by a code span of its target."""

    def code(m: re.Match) -> str:
        target = m.group(2).strip()
        if "<" in target and target.endswith(">"):  # :class:`title <target>`
            target = target[: target.index("<")].strip()
        elif m.group(1):
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    return ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = rewrite(obj.docstring.value)
