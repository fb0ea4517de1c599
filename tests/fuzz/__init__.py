"""Differential fuzzer of the per-sample estimators (EXACT, EMPIRICAL, MONTE_CARLO).

* :mod:`fuzz.grammar` draws an architecture from a seed (:func:`fuzz.grammar.plan`, pure data)
  and builds it in float64 with its batch (:func:`fuzz.grammar.build`);
* :mod:`fuzz.runner` runs ``fimfast.DiagFisher(model, t, reduction="sum").step(batch)`` for each
  per-sample type and checks it against the float64 brute-force oracle of ``tests/oracle.py``,
  and that the step left the model (parameters, buffers, gradients, modes, hooks) as it was;
* ``python -m fuzz`` (run from ``tests/``) is the long run; see docs/fuzzing.md.
"""

from fuzz.grammar import Case, Spec, build, describe, plan
from fuzz.runner import Outcome, check, check_seed, shrink

__all__ = ["Case", "Outcome", "Spec", "build", "check", "check_seed", "describe", "plan",
           "shrink"]
