"""fimfast: fast, exact and random estimates of the diagonal Fisher information of classifiers.

Implements the estimators of Ke Sun, *Deterministic Bounds and Random Estimates of Metric Tensors
on Neuromanifolds* (ICLR 2026) behind the API of that paper's library, plus the per-sample
estimators (EXACT, EMPIRICAL, MONTE_CARLO) of Soen & Sun (NeurIPS 2024), structured
representations beyond the diagonal (:func:`fisher`) and the workflows a Fisher is used for (EWC,
Fisher merging, Laplace, sensitivity).

Importing fimfast never imports triton, transformers or lightning, never loads the compiled
extension and never initialises CUDA.
"""

from fimfast import sensitivity
from fimfast.api import diag_fim_step, get_diag_fim, get_estimator, zero_diag_fim
from fimfast.diagfim import DiagFIM
from fimfast.estimator import DiagFisher, diag_fisher
from fimfast.ewc import EWC
from fimfast.free import from_optimizer
from fimfast.laplace import DiagLaplace
from fimfast.merge import fisher_merge, load_fisher, model_fingerprint, save_fisher
from fimfast.ops.registry import BackendUnavailableError, available_backends
from fimfast.rules import register_rule
from fimfast.structured import fisher
from fimfast.types import FIMType, Options, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DiagFIM",
    "DiagFisher",
    "DiagLaplace",
    "EWC",
    "FIMType",
    "Options",
    "UnsupportedModelError",
    "__version__",
    "available_backends",
    "diag_fim_step",
    "diag_fisher",
    "fisher",
    "fisher_merge",
    "from_optimizer",
    "get_diag_fim",
    "get_estimator",
    "load_fisher",
    "model_fingerprint",
    "register_rule",
    "save_fisher",
    "sensitivity",
    "zero_diag_fim",
]


def __getattr__(name: str):
    # the framework integrations import transformers / lightning: loaded on first access only
    if name == "integrations":
        import importlib

        return importlib.import_module("fimfast.integrations")
    raise AttributeError(f"module 'fimfast' has no attribute {name!r}")
