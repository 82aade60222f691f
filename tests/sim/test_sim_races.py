"""Race mode (ThreadSanitizer): lost updates and missing synchronization are reported."""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import needs_race_mode, rng
from sim_kernel_sources import ATOMICS, BN_SPLIT, BN_STATS, BN_STATS_NAMES, BUGS, BUGS_NAMES

from cupy_bn import sim

pytestmark = needs_race_mode


@pytest.fixture(scope="module")
def bugs():
    return sim.RawModule(code=BUGS, name_expressions=BUGS_NAMES)


def test_lost_update_across_blocks_is_a_race(bugs):
    x = np.ones(256, np.float32)
    total = np.zeros(1, np.float32)
    # without race mode the blocks run one after another and the sum comes out right
    bugs.get_function("lost_update")(4, 32, (x, np.int32(256), total))
    assert total[0] == 256
    with pytest.raises(
        sim.SimulationError,
        match=r"data race on global memory \(element 0 of the array passed as "
        r"parameter 2 \(`float\*`\)\): (read|write) of 4 bytes by block "
        r"\(\d,0,0\) thread \(0,0,0\) at kernel\.cu:\d+, conflicting with an "
        r"earlier (read|write) of 4 bytes by block \(\d,0,0\) thread "
        r"\(0,0,0\) at kernel\.cu:\d+",
    ):
        bugs.get_function("lost_update")(
            4, 32, (x, np.int32(256), np.zeros(1, np.float32)), check_races=True
        )


def test_lost_update_between_warps_of_one_block_is_a_race(bugs):
    x = np.ones(64, np.float32)
    with pytest.raises(sim.SimulationError, match=r"data race .* thread \((0|32),0,0\)"):
        bugs.get_function("lost_update")(
            1, 64, (x, np.int32(64), np.zeros(1, np.float32)), check_races=True, schedule="reverse"
        )


def test_atomic_version_has_no_race_and_writes_back(bugs):
    x = rng().standard_normal(256).astype(np.float32)
    total = np.zeros(1, np.float32)
    bugs.get_function("atomic_total")(4, 64, (x, np.int32(256), total), check_races=True)
    np.testing.assert_allclose(total[0], x.astype(np.float64).sum(), rtol=1e-5)


def test_missing_barrier_is_a_shared_memory_race_even_where_the_result_is_right(bugs):
    x = np.ones(128, np.float32)
    out = np.zeros(1, np.float32)
    bugs.get_function("missing_barrier")(1, 128, (x, np.int32(128), out), schedule="reverse")
    assert out[0] == 128  # this order hides the bug ...
    with pytest.raises(sim.SimulationError, match=r"data race on static shared memory"):
        bugs.get_function("missing_barrier")(
            1, 128, (x, np.int32(128), out), schedule="reverse", check_races=True
        )
    bugs.get_function("block_sum")(1, 128, (x, np.int32(128), out), check_races=True)
    assert out[0] == 128


def test_warp_synchronous_code_without_syncwarp_is_a_race(bugs):
    x = np.ones(64, np.float32)
    out = np.zeros(1, np.float32)
    bugs.get_function("warp_tail_syncwarp")(1, 64, (x, out), check_races=True)
    assert out[0] == 64
    with pytest.raises(sim.SimulationError, match=r"data race on static shared memory"):
        bugs.get_function("warp_tail_legacy")(1, 64, (x, out), check_races=True)


def test_last_block_pattern_needs_the_writer_fence(bugs):
    x = np.ones(4 * 32, np.float32)
    with pytest.raises(sim.SimulationError, match=r"data race on global memory .* parameter 1"):
        bugs.get_function("last_block_no_fence")(
            4,
            32,
            (x, np.zeros(4, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.float32)),
            check_races=True,
        )
    out = np.zeros(1, np.float32)
    sim.RawModule(code=ATOMICS).get_function("last_block_sum")(
        4,
        32,
        (x, np.int32(x.size), np.zeros(4, np.float32), np.zeros(1, np.uint32), out),
        check_races=True,
    )
    assert out[0] == x.size


def test_correct_kernels_pass_race_mode():
    N, C, S = 2, 3, 40
    x = rng(1).standard_normal((N, C, S)).astype(np.float32)
    s, ss = np.zeros(C), np.zeros(C)
    sim.RawModule(code=BN_SPLIT).get_function("partial_sums")(
        (C, 2),
        (64,),
        (x, s, ss, np.int32(N), np.int32(C), np.int32(S), np.int32(40)),
        shared_mem=16,
        check_races=True,
        schedule="random",
        seed=3,
    )
    np.testing.assert_allclose(s, x.astype(np.float64).sum(axis=(0, 2)), rtol=1e-6)
    mean, var = np.zeros(C, np.float32), np.zeros(C, np.float32)
    sim.RawModule(code=BN_STATS, name_expressions=BN_STATS_NAMES).get_function(
        "bn_stats<float, float>"
    )(C, 64, (x, mean, var, np.int32(N), np.int32(C), np.int32(S)), check_races=True)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5)


def test_race_mode_reports_other_errors_too(bugs):
    with pytest.raises(sim.SimulationError, match=r"out-of-bounds read past the end"):
        bugs.get_function("off_by_one")(
            1,
            32,
            (np.ones(16, np.float32), np.zeros(16, np.float32), np.int32(16)),
            check_races=True,
        )
    with pytest.raises(sim.SimulationError, match=r"reached by 100 of 128 threads"):
        bugs.get_function("early_return")(
            1,
            128,
            (np.ones(100, np.float32), np.int32(100), np.zeros(100, np.float32)),
            check_races=True,
        )
