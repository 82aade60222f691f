"""Planted bugs are caught: a SimulationError naming thread and line, or a wrong result."""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import SCHEDULES, needs_simulator, rng, schedules
from sim_kernel_sources import BUGS, BUGS_NAMES

from cupy_bn import sim

pytestmark = needs_simulator


@pytest.fixture(scope="module")
def bugs():
    return sim.RawModule(code=BUGS, name_expressions=BUGS_NAMES)


def block_sum(bugs, name, x, block, **kw):
    out = np.zeros(1, np.float32)
    bugs.get_function(name)(1, block, (x, np.int32(x.size), out), **kw)
    return out[0]


@schedules
def test_reference_block_sum_is_right(bugs, schedule, seed):
    x = rng().standard_normal(1000).astype(np.float32)
    got = block_sum(bugs, "block_sum", x, 256, schedule=schedule, seed=seed)
    np.testing.assert_allclose(got, x.astype(np.float64).sum(), rtol=1e-5)


def test_missing_barrier_before_cross_warp_read_gives_wrong_result(bugs):
    x = rng().standard_normal(1000).astype(np.float32)
    ref = x.astype(np.float64).sum()
    # forward: warp 0 reads partial sums that warps 1-7 have not written (poisoned: NaN)
    assert np.isnan(block_sum(bugs, "missing_barrier", x, 256, schedule="forward"))
    # reverse runs warp 0 last and hides the bug: run every test under several schedules
    np.testing.assert_allclose(
        block_sum(bugs, "missing_barrier", x, 256, schedule="reverse"), ref, rtol=1e-5
    )
    wrong = [
        not np.isclose(block_sum(bugs, "missing_barrier", x, 256, schedule=s, seed=k), ref)
        for s, k in SCHEDULES
    ]
    assert sum(wrong) >= 2


@schedules
def test_wrong_shuffle_offsets_give_wrong_result(bugs, schedule, seed):
    x = np.ones(64, np.float32)
    out = np.zeros(2, np.float32)
    bugs.get_function("wrong_offsets")(1, 64, (x, np.int32(64), out), schedule=schedule, seed=seed)
    np.testing.assert_array_equal(out, [16, 16])  # half of each warp's 32


@schedules
def test_warp_synchronous_code_needs_syncwarp(bugs, schedule, seed):
    x = rng().integers(-8, 8, 64).astype(np.float32)
    out = np.zeros(1, np.float32)
    bugs.get_function("warp_tail_syncwarp")(1, 64, (x, out), schedule=schedule, seed=seed)
    assert out[0] == x.sum()
    # without __syncwarp, lane 0 runs all its steps before lane 16 has added its part
    bugs.get_function("warp_tail_legacy")(1, 64, (x, out), schedule="forward")
    assert out[0] != x.sum()


@schedules
def test_partial_warp_with_full_mask_is_an_error(bugs, schedule, seed):
    x = np.ones(256, np.float32)
    # depending on the order: a lane leaves while the others wait for it, or the others go
    # on without it and read its (undefined) value
    with pytest.raises(
        sim.SimulationError,
        match=r"thread exited while lanes .* wait for it in __shfl_xor_sync at "
        r"kernel\.cu:\d+|__shfl_xor_sync at kernel\.cu:\d+ .* reads lane "
        r"\d+, which has exited",
    ):
        block_sum(bugs, "partial_warp_mask", x, 256, schedule=schedule, seed=seed)


def test_shuffle_reading_a_lane_of_a_partial_warp_gives_poison(bugs):
    # PTX leaves the value of a lane that does not exist undefined: the simulator returns
    # NaN, which shows up in the partial warp's sum (a guarded shuffle is in test_sim_holes)
    x = np.ones(48, np.float32)
    out = np.zeros(2, np.float32)
    bugs.get_function("partial_block_shuffle")(1, 48, (x, out))
    assert out[0] == 32
    assert np.isnan(out[1])


@schedules
def test_early_return_before_barrier_is_an_error(bugs, schedule, seed):
    x = np.arange(100, dtype=np.float32)
    with pytest.raises(
        sim.SimulationError, match=r"__syncthreads at kernel\.cu:\d+ reached by 100 of 128 threads"
    ):
        bugs.get_function("early_return")(
            1, 128, (x, np.int32(100), np.zeros(100, np.float32)), schedule=schedule, seed=seed
        )
    y = np.zeros(128, np.float32)  # n == blockDim: no thread returns early
    bugs.get_function("early_return")(1, 128, (np.arange(128, dtype=np.float32), np.int32(128), y))
    np.testing.assert_array_equal(y, np.arange(127, -1, -1))


def test_barrier_in_divergent_code_is_an_error(bugs):
    x = np.ones(64, np.float32)
    with pytest.raises(sim.SimulationError, match=r"reached by 32 of 64 threads"):
        bugs.get_function("divergent_barrier")(1, 64, (x, np.zeros(32, np.float32)))


@schedules
def test_shuffle_waiting_for_threads_at_a_barrier_is_an_error(bugs, schedule, seed):
    x = np.ones(64, np.float32)
    with pytest.raises(
        sim.SimulationError,
        match=r"__syncthreads.*__shfl_xor_sync|"
        r"__shfl_xor_sync.*__syncthreads",
    ):
        bugs.get_function("shuffle_vs_barrier")(
            1, 64, (x, np.zeros(64, np.float32)), schedule=schedule, seed=seed
        )


@schedules
def test_off_by_one_bound_is_caught_by_the_guard_page(bugs, schedule, seed):
    x = np.ones(100, np.float32)
    with pytest.raises(
        sim.SimulationError,
        match=r"out-of-bounds read past the end of the array passed as parameter "
        r"0 \(`const float\*`\) \(100 elements of float32\): element 100 "
        r"\(byte offset 400\) \[block \(\d,0,0\) thread \(\d+,0,0\)\] at "
        r"kernel\.cu:\d+",
    ):
        bugs.get_function("off_by_one")(
            4, 32, (x, np.zeros(100, np.float32), np.int32(100)), schedule=schedule, seed=seed
        )


def test_read_before_the_start_is_caught_across_a_page(bugs):
    x = np.ones(1024, np.float32)  # 4096 bytes: the array starts on a page boundary
    with pytest.raises(sim.SimulationError, match=r"before the start of the array .* element -1"):
        bugs.get_function("before_start")(1, 32, (x, np.zeros(1024, np.float32), np.int32(1024)))


def test_launch_without_needed_shared_mem_is_an_error(bugs):
    x = np.arange(64, dtype=np.float32)
    y = np.zeros(64, np.float32)
    k = bugs.get_function("reverse_block")
    k(2, 32, (x, y), shared_mem=32 * 4)
    np.testing.assert_array_equal(y, np.concatenate([x[31::-1], x[:31:-1]]))
    for smem in (0, 16 * 4):
        with pytest.raises(
            sim.SimulationError,
            match=rf"write past the end of dynamic shared memory \(shared_mem="
            rf"{smem} bytes\).*at kernel\.cu:\d+",
        ):
            k(2, 32, (x, y), shared_mem=smem)


def test_python_float_for_float_parameter_warns_and_reads_garbage(bugs):
    x = np.ones(8, np.float32)
    k = bugs.get_function("scale")
    with pytest.warns(
        sim.ArgumentTypeWarning,
        match=r"parameter 2 \(`float`\) is float32 but CuPy passes this argument as "
        r"float64",
    ):
        k(1, 32, (x, np.int32(8), 0.5))
    # the low 4 bytes of the double 0.5 are zero: a GPU computes x * 0.0 too
    np.testing.assert_array_equal(x, 0)
    x[:] = 1
    with pytest.warns(sim.ArgumentTypeWarning, match=r"parameter 1 \(`int`\) is int32"):
        k(1, 32, (x, 8, np.float32(0.5)))
    np.testing.assert_array_equal(x, 0.5)  # low bytes of a small int64 are right


def test_write_to_read_only_array_is_an_error(bugs):
    x = np.ones(16, np.float32)
    x.flags.writeable = False
    with pytest.raises(sim.SimulationError, match=r"wrote into read-only memory of parameter 0"):
        bugs.get_function("writes_input")(1, 32, (x, np.int32(16)))
    assert (x == 1).all()


def test_stack_overflow_is_reported(bugs):
    x = np.ones(64, np.float32)
    y = np.zeros(32, np.float32)
    k = bugs.get_function("stack_hog")
    k(1, 32, (x, y, np.int32(64)))  # 16 KiB of locals fit the default 64 KiB stacks
    np.testing.assert_allclose(y, len(range(0, 4096, 7)))
    with pytest.raises(sim.SimulationError, match=r"stack overflow.*stack_kb="):
        k(1, 32, (x, y, np.int32(64)), stack_kb=8)


def test_uninitialized_shared_memory_reads_poison_in_templates(bugs):
    out = np.zeros(64, np.float32)
    bugs.get_function("uninitialized_shared<float>")(1, 64, (out,))
    np.testing.assert_array_equal(out[:32], 1)
    assert np.isnan(out[32:]).all()


def test_spin_wait_on_another_block_times_out(bugs):
    flag = np.zeros(1, np.int32)
    with pytest.raises(sim.SimulationError, match=r"did not finish within 0\.5 s"):
        bugs.get_function("spin_wait")(2, 1, (flag,), timeout=0.5)
    bugs.get_function("spin_wait")(2, 1, (flag,), schedule="reverse")  # flag set first


def test_integer_division_by_zero_is_an_error(bugs):
    a = np.arange(32, dtype=np.int32)
    b = np.ones(32, np.int32)
    b[5] = 0
    with pytest.raises(sim.SimulationError, match=r"division by zero.*thread \(5,0,0\)"):
        bugs.get_function("divide")(1, 32, (a, b, np.zeros(32, np.int32)))


def test_shuffle_mask_without_the_caller_is_an_error(bugs):
    with pytest.raises(
        sim.SimulationError, match=r"mask 0x00000001 does not name the calling lane 1"
    ):
        bugs.get_function("mask_without_caller")(1, 32, (np.ones(32, np.float32),))


def test_trap_is_an_error(bugs):
    x = np.ones(32, np.float32)
    bugs.get_function("trap_if_negative")(1, 32, (x,))
    x[7] = -1
    with pytest.raises(sim.SimulationError, match=r"__trap\(\) at kernel\.cu:\d+.*thread \(7,"):
        bugs.get_function("trap_if_negative")(1, 32, (x,))


def test_assert_in_kernel_names_expression_and_line():
    src = (
        '#line 1 "checks.cu"\nextern "C" __global__ void positive(const float* x) {\n'
        "    assert(x[threadIdx.x] >= 0.f);\n}\n"
    )
    x = np.ones(32, np.float32)
    k = sim.RawKernel(src, "positive")
    k(1, 32, (x,))
    x[3] = -1
    with pytest.raises(
        sim.SimulationError,
        match=r"assertion `x\[threadIdx\.x\] >= 0\.f' failed at checks\.cu:2 "
        r"\[block \(0,0,0\) thread \(3,0,0\)\]",
    ):
        k(1, 32, (x,))


@pytest.mark.parametrize(
    "grid,block,smem,message",
    [
        (1, 1025, 0, r"block \(1025, 1, 1\)"),
        (1, (32, 33), 0, r"at most 1024 threads"),
        (1, (1, 1, 65), 0, r"z\s+<= 64"),
        (0, 32, 0, r"grid \(0, 1, 1\)"),
        ((1, 65536), 32, 0, r"y and z <= 65535"),
        (1, 32, 48 * 1024 + 1, r"shared_mem=49153 bytes exceeds .* 49152 bytes"),
        (1, 32, -1, r"non-negative"),
        (1.5, 32, 0, r"integers"),
    ],
)
def test_invalid_launch_configurations(bugs, grid, block, smem, message):
    with pytest.raises(sim.SimulationError, match=message):
        bugs.get_function("scale")(
            grid, block, (np.ones(1, np.float32), np.int32(1), np.float32(1)), shared_mem=smem
        )


def test_launch_bounds_and_opt_in_shared_memory():
    src = 'extern "C" __global__ void __launch_bounds__(128) k(float* x) { x[threadIdx.x] = 1; }'
    k = sim.RawKernel(src, "k")
    assert k.max_threads_per_block == 128
    with pytest.raises(sim.SimulationError, match=r"exceeds the kernel's __launch_bounds__\(128"):
        k(1, 256, (np.zeros(256, np.float32),))
    k.max_dynamic_shared_size_bytes = 100 * 1024
    k(1, 128, (np.zeros(128, np.float32),), shared_mem=100 * 1024)
    k.max_dynamic_shared_size_bytes = 300 * 1024
    with pytest.raises(sim.SimulationError, match=r"max_dynamic_shared_size_bytes must be"):
        k(1, 128, (np.zeros(128, np.float32),))


def test_launch_puts_back_the_process_timer_and_handlers(bugs):
    import signal

    def handler(*args):
        pass

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        x = np.ones(4, np.float32)
        bugs.get_function("scale")(1, 32, (x, np.int32(4), np.float32(2)), timeout=5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90 < remaining <= 100
        assert signal.getsignal(signal.SIGALRM) is handler
        np.testing.assert_array_equal(x, 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
