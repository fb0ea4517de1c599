"""Analysis of the core FIM and of the estimators (docs/math.md §6-§8).

* :func:`core_spectrum`: eigenpairs of ``I(z)`` per row, with the bounds on ``lambda_max``.
* :func:`bounds`: the deterministic sandwich ``RANKK <= EXACT <= DG`` per parameter.
* :func:`estimator_variances`: per-parameter variance of one draw of Î1 (MONTE_CARLO), Î2 (the
  sampled negative Hessian) and the HUTCHINSON family, for small models; :func:`draws_needed`
  turns a variance into a number of draws (Chebyshev).

Example:
    >>> from fimfast.analysis import estimator_variances, draws_needed
    >>> var = estimator_variances(model, (x, y), types=["monte_carlo", "hutchinson"])
    >>> S = var.draws_needed(eps=0.1, delta=0.05)["hutchinson"]   # a DiagFIM of draw counts
"""

from fimfast.analysis.bounds import FisherBounds, bounds
from fimfast.analysis.spectrum import CoreSpectrum, core_spectrum
from fimfast.analysis.variances import (
    VARIANCE_TYPES,
    EstimatorVariances,
    draws_needed,
    estimator_variances,
    row_moments,
)

__all__ = [
    "VARIANCE_TYPES",
    "CoreSpectrum",
    "EstimatorVariances",
    "FisherBounds",
    "bounds",
    "core_spectrum",
    "draws_needed",
    "estimator_variances",
    "row_moments",
]
