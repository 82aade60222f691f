"""The mutation check's fast subset: three mutants of the project's kernels that the kernel
tests must kill (the whole set: ``python -m cupy_bn.sim.mutants``, see docs/simulator.md)."""

from __future__ import annotations

import pytest
from sim_helpers import needs_simulator

from cupy_bn.sim import mutants

pytestmark = needs_simulator

FAST = ("drop-m2", "no-block-barrier", "tile-end-off-by-one")


def test_every_mutant_still_applies_to_the_kernels():
    assert mutants.check_texts(mutants.MUTANTS) == []
    assert set(FAST) <= {m.name for m in mutants.MUTANTS}


@pytest.mark.parametrize("name", FAST)
def test_kernel_tests_kill_the_mutant(name):
    mutant = next(m for m in mutants.MUTANTS if m.name == name)
    passed, _, tail = mutants.run_tests(mutant, mutants.DEFAULT_TESTS)
    assert not passed, f"{name} survived ({mutant.what}):\n{tail}"
    assert "FAILED" in tail  # a failing test, not a crash of the run
