"""CI seeds on which the per-sample engine currently fails, with the reason.

``tests/test_fuzz.py`` marks these ``xfail(strict=True)``: once the engine handles a seed"s model,
the seed passes, the strict xfail reports XPASS as a failure, and its entry must be removed here.
The reasons name the constructs of the model that its failure involves (the smallest failing
models, from ``python -m fuzz --seed <seed> --shrink`` in ``tests/``, keep only those); replay a
seed with ``FIMFAST_FUZZ_SEED=<seed>``.
"""

# reason key -> what fails; each entry of _SEEDS names the keys of one seed
REASONS: dict[str, str] = {}

_SEEDS: dict[int, tuple[str, ...]] = {}

KNOWN: dict[int, str] = {s: "; ".join(REASONS[k] for k in ks) for s, ks in _SEEDS.items()}
