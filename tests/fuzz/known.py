"""CI seeds on which the per-sample engine currently fails, with the reason.

``tests/test_fuzz.py`` marks these ``xfail(strict=True)``: once the engine is fixed the seed
passes, the strict xfail reports XPASS as a failure, and its entry must be removed here.
"""

KNOWN: dict[int, str] = {}
