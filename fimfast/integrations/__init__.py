"""Training-framework integrations, imported on first use so that ``import fimfast`` never imports
``transformers`` or ``lightning``:

* :mod:`fimfast.integrations.hf`: ``FisherCallback`` for the Hugging Face ``Trainer`` and
  ``EWCTrainer``, a ``Trainer`` that adds an EWC penalty to its loss.
* :mod:`fimfast.integrations.lightning`: ``FisherCallback`` for Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["hf", "lightning"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
