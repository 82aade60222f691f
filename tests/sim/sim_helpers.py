"""Shared helpers of the simulator tests (imported by name: tests/ has no __init__.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cupy_bn import sim

# Every correct kernel must match NumPy under each of these (schedule, seed) pairs.
SCHEDULES = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
schedules = pytest.mark.parametrize("schedule,seed", SCHEDULES)

needs_simulator = pytest.mark.skipif(
    not sim.is_available(), reason="CUDA simulator unavailable (g++ or CUDA headers missing)"
)


def race_mode_skip_reason() -> str:
    if not sim.is_available():
        return "CUDA simulator unavailable (g++ or CUDA headers missing)"
    ok, why = sim.race_mode_support()
    return "" if ok else f"race mode unavailable: {why}"


needs_race_mode = pytest.mark.skipif(bool(race_mode_skip_reason()), reason=race_mode_skip_reason())


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
