"""Checks of scalar options (tolerances, steps, seeds) shared by the library's checkers.

One wording per error, naming the option: `step: expected a positive finite number, got 0`,
`seed: expected a non-negative integer, got -1`. `error` is the exception class to raise (a
`ValueError` subclass such as `FoldError`), so each package keeps its own error type.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def positive_finite(name: str, value: object, error: type[ValueError] = ValueError) -> float:
    """`value` as a float when it is a real number, finite and above 0; else `error`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise error(f"{name}: expected a positive finite number, got {value!r}")
    if value <= 0:
        raise error(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def seed_value(name: str, value: object, error: type[ValueError] = ValueError) -> int:
    """`value` as an int when it is an integer >= 0 (what NumPy's generators take); else
    `error`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise error(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)
