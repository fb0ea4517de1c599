"""fimfast: fast, exact and random estimates of the diagonal Fisher information of classifiers.

Implements the estimators of Ke Sun, *Deterministic Bounds and Random Estimates of Metric Tensors
on Neuromanifolds* (ICLR 2026) behind the API of that paper's library, plus the per-sample
estimators (EXACT, EMPIRICAL, MONTE_CARLO) of Soen & Sun (NeurIPS 2024).

Importing fimfast never imports triton, never loads the compiled extension and never initialises
CUDA.
"""

from fimfast.api import diag_fim_step, get_diag_fim, get_estimator, zero_diag_fim
from fimfast.diagfim import DiagFIM
from fimfast.estimator import DiagFisher, diag_fisher
from fimfast.ops.registry import BackendUnavailableError, available_backends
from fimfast.rules import register_rule
from fimfast.types import FIMType, Options, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "UnsupportedModelError",
    "BackendUnavailableError",
    "DiagFIM",
    "DiagFisher",
    "FIMType",
    "Options",
    "__version__",
    "available_backends",
    "diag_fim_step",
    "diag_fisher",
    "get_diag_fim",
    "get_estimator",
    "register_rule",
    "zero_diag_fim",
]

# -- workflows: EWC, merging, Laplace, sensitivity, free Fishers -------------------------------- #
from fimfast.ewc import EWC  # noqa: E402

__all__ += ["EWC"]
from fimfast.merge import fisher_merge, load_fisher, model_fingerprint, save_fisher  # noqa: E402

__all__ += ["fisher_merge", "load_fisher", "model_fingerprint", "save_fisher"]
from fimfast.laplace import DiagLaplace  # noqa: E402

__all__ += ["DiagLaplace"]
from fimfast import sensitivity  # noqa: E402

__all__ += ["sensitivity"]
from fimfast.free import from_optimizer  # noqa: E402

__all__ += ["from_optimizer"]


def __getattr__(name: str):
    # the framework integrations import transformers / lightning: loaded on first access only
    if name == "integrations":
        import importlib

        return importlib.import_module("fimfast.integrations")
    raise AttributeError(f"module 'fimfast' has no attribute {name!r}")
