"""Memory and ordering faults that once passed silently, each reported in a documented mode.

Every fault is checked under several schedules (or several runs) for the same verdict, and
each has a correct twin that must pass: guarded partial-warp shuffles, fenced last-block
tickets, shared memory that is cleared before use. The fault table is in docs/simulator.md.
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import SCHEDULES, needs_race_mode, needs_simulator, rng, schedules

from cupy_bn import sim

pytestmark = needs_simulator

HOLES = r"""
#line 1 "holes.cu"
// Static shared memory: one past the end, one before the start, a read past the end.
extern "C" __global__ void smem_write_past_end(const float* x, float* out) {
    __shared__ float buf[64];
    buf[threadIdx.x + 1] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x];
}

extern "C" __global__ void smem_write_before_start(const float* x, float* out) {
    __shared__ float buf[64];
    buf[(int)threadIdx.x - 1] = x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x > 0) out[threadIdx.x] = buf[threadIdx.x - 1];
}

extern "C" __global__ void smem_read_past_end(const float* x, float* out) {
    __shared__ float buf[64];
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x] + buf[threadIdx.x + 1];
}

// Global memory: a write one element before the start, a read far past the end.
extern "C" __global__ void global_write_before_start(const float* x, float* out, int n) {
    const int i = threadIdx.x;
    if (i < n) out[i - 1] = x[i];
}

extern "C" __global__ void global_read_far_past_end(const float* x, float* out, int n) {
    const int i = threadIdx.x;
    if (i < n) out[i] = x[i] + (i == 0 ? x[n + 3000] : 0.f);
}

// A histogram in shared memory that is never cleared (bins: blockDim.x).
extern "C" __global__ void histogram(const int* x, int n, unsigned* bins, int clear) {
    __shared__ unsigned h[64];
    if (clear) h[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&h[x[i] % 64], 1u);
    __syncthreads();
    bins[threadIdx.x] = h[threadIdx.x];
}

// Poison that an operation swallows: fmaxf over an uninitialized (NaN) slot.
extern "C" __global__ void max_with_stale_slot(const float* x, float* out) {
    __shared__ float m[33];
    m[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = m[0];
        for (int k = 1; k < 33; ++k) r = fmaxf(r, m[k]);  // m[32] is never written
        *out = r;
    }
}

// An int index computed as a product that wraps to a small (in-bounds) value.
extern "C" __global__ void wrapping_index(const float* x, float* out, int rows, int stride) {
    const int base = rows * stride;
    out[threadIdx.x] = x[base + threadIdx.x];
}

// Partial last warp (blockDim 100): the shuffle names only existing lanes but reads a lane
// past the end, and the guard discards that value.
extern "C" __global__ void guarded_partial_warp_sum(const float* x, float* out) {
    __shared__ float warp_sums[4];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned active = min(32u, blockDim.x - warp * 32);
    const unsigned mask = active == 32 ? 0xffffffffu : (1u << active) - 1u;
    float s = x[threadIdx.x];
    for (unsigned o = 16; o > 0; o >>= 1) {
        const float v = __shfl_down_sync(mask, s, o);
        if (lane + o < active) s += v;
    }
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) t += warp_sums[w];
        *out = t;
    }
}

// Last-block patterns. `order`: 0 fence then ticket (right), 1 ticket then fence (wrong).
extern "C" __global__ void last_block_total(const float* x, float* partial, unsigned* ticket,
                                            float* out, int order) {
    __shared__ bool is_last;
    float s = 0.f;
    for (int o = 0; o < 32; ++o) s += x[blockIdx.x * 32 + o];
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
        if (order == 0) __threadfence();
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
        if (order == 1) __threadfence();
        if (is_last) atomicExch(ticket, 0u);
    }
    __syncthreads();
    if (is_last && threadIdx.x == 0) {
        __threadfence();
        float t = 0.f;
        for (int b = 0; b < gridDim.x; ++b) t += partial[b];
        *out = t;
    }
}

// The CUDA Programming Guide's version: no fence after the ticket, a plain counter reset.
extern "C" __global__ void guide_last_block(const float* x, float* partial, unsigned* count,
                                            float* out) {
    __shared__ bool is_last;
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int o = 0; o < 32; ++o) s += x[blockIdx.x * 32 + o];
        partial[blockIdx.x] = s;
        __threadfence();
        unsigned value = atomicInc(count, gridDim.x);
        is_last = value == gridDim.x - 1;
    }
    __syncthreads();
    if (is_last && threadIdx.x == 0) {
        float t = 0.f;
        for (int b = 0; b < gridDim.x; ++b) t += partial[b];
        *out = t;
        *count = 0;
    }
}
"""


@pytest.fixture(scope="module")
def holes():
    return sim.RawModule(code=HOLES)


def launch(holes, name, grid, block, args, **kw):
    holes.get_function(name)(grid, block, args, **kw)


# ------------------------------------------------------------- static shared memory
SMEM_FAULTS = [
    ("smem_write_past_end", r"index 64 out of bounds for type 'float \[64\]' at holes\.cu:4"),
    ("smem_write_before_start", r"index -1 out of bounds for type 'float \[64\]' at holes\.cu:11"),
    ("smem_read_past_end", r"index 64 out of bounds for type 'float \[64\]' at holes\.cu:20"),
]


@pytest.mark.parametrize("name,message", SMEM_FAULTS)
@schedules
def test_static_shared_out_of_bounds_is_reported(holes, name, message, schedule, seed):
    args = (np.ones(64, np.float32), np.zeros(64, np.float32))
    with pytest.raises(sim.SimulationError, match=message + r".*thread \(\d+,0,0\)"):
        launch(holes, name, 1, 64, args, schedule=schedule, seed=seed)


@needs_race_mode
@pytest.mark.parametrize("name,message", SMEM_FAULTS)
def test_static_shared_out_of_bounds_is_reported_in_race_mode(holes, name, message):
    args = (np.ones(64, np.float32), np.zeros(64, np.float32))
    with pytest.raises(sim.SimulationError, match=message):
        launch(holes, name, 1, 64, args, check_races=True)


# -------------------------------------------------------------------- global memory
@schedules
def test_global_write_one_before_the_start_is_reported(holes, schedule, seed):
    x, out = np.ones(100, np.float32), np.zeros(100, np.float32)  # not a page multiple
    args = (x, out, np.int32(100))
    with pytest.raises(
        sim.SimulationError,
        match=r"out-of-bounds write before the start of the array passed as parameter 1 .*"
        r"element -1 .*found after the launch",
    ):
        launch(holes, "global_write_before_start", 1, 128, args, schedule=schedule, seed=seed)
    # check_memory's first run puts the array's start at a guard page: the thread is named
    with pytest.raises(
        sim.SimulationError,
        match=r"out-of-bounds write before the start of the array passed as parameter 1 .*"
        r"element -1 .*block \(0,0,0\) thread \(0,0,0\)",
    ):
        launch(holes, "global_write_before_start", 1, 128, args, check_memory=True)


@needs_race_mode
def test_global_write_one_before_the_start_is_reported_in_race_mode(holes):
    args = (np.ones(100, np.float32), np.zeros(100, np.float32), np.int32(100))
    with pytest.raises(sim.SimulationError, match=r"out-of-bounds write of global memory"):
        launch(holes, "global_write_before_start", 1, 128, args, check_races=True)


@schedules
def test_global_read_far_past_the_end_is_reported(holes, schedule, seed):
    args = (np.ones(100, np.float32), np.zeros(100, np.float32), np.int32(100))
    with pytest.raises(
        sim.SimulationError,
        match=r"out-of-bounds read past the end of the array passed as parameter 0 .*"
        r"element 3100 .*thread \(0,0,0\)",
    ):
        launch(holes, "global_read_far_past_end", 1, 128, args, schedule=schedule, seed=seed)


def test_in_bounds_kernels_pass_with_both_guard_placements(holes):
    x = rng().standard_normal(100).astype(np.float32)
    out = np.zeros(1, np.float32)
    launch(holes, "guarded_partial_warp_sum", 1, 100, (x, out), check_memory=True)
    np.testing.assert_allclose(out[0], x.astype(np.float64).sum(), rtol=1e-5)


# --------------------------------------------------------- uninitialized shared memory
def histogram_input():
    return rng(4).integers(0, 1000, 500).astype(np.int32)


@schedules
def test_uncleared_shared_histogram_is_reported_by_check_memory(holes, schedule, seed):
    x, bins = histogram_input(), np.zeros(64, np.uint32)
    with pytest.raises(
        sim.SimulationError,
        match=r"check_memory: the array passed as parameter 2 \(`unsigned int\*`\) differs "
        r".*first at element 0",
    ):
        launch(
            holes,
            "histogram",
            1,
            64,
            (x, np.int32(x.size), bins, np.int32(0)),
            check_memory=True,
            schedule=schedule,
            seed=seed,
        )
    launch(
        holes,
        "histogram",
        1,
        64,
        (x, np.int32(x.size), bins, np.int32(1)),
        check_memory=True,
        schedule=schedule,
        seed=seed,
    )
    np.testing.assert_array_equal(bins, np.bincount(x % 64, minlength=64))


@needs_race_mode
def test_race_mode_poisons_shared_memory_too(holes):
    x, bins = histogram_input(), np.zeros(64, np.uint32)
    launch(holes, "histogram", 1, 64, (x, np.int32(x.size), bins, np.int32(0)), check_races=True)
    # every bin started at 0xFFFFFFFF: the counts come out one less (mod 2**32)
    np.testing.assert_array_equal(bins, np.bincount(x % 64, minlength=64).astype(np.uint32) - 1)
    launch(holes, "histogram", 1, 64, (x, np.int32(x.size), bins, np.int32(1)), check_races=True)
    np.testing.assert_array_equal(bins, np.bincount(x % 64, minlength=64))


def test_poison_swallowed_by_fmaxf_is_reported_by_check_memory(holes):
    x = rng().standard_normal(32).astype(np.float32)
    out = np.zeros(1, np.float32)
    launch(holes, "max_with_stale_slot", 1, 32, (x, out))
    assert out[0] == x.max()  # fmaxf(NaN, v) == v: a single run cannot tell
    with pytest.raises(sim.SimulationError, match=r"check_memory: .* parameter 1 .*differs"):
        launch(holes, "max_with_stale_slot", 1, 32, (x, out), check_memory=True)


def test_check_memory_is_not_combined_with_race_mode(holes):
    args = (np.ones(32, np.float32), np.zeros(1, np.float32))
    with pytest.raises(sim.SimulationError, match=r"check_memory needs guard=True"):
        launch(holes, "max_with_stale_slot", 1, 32, args, check_memory=True, check_races=True)


# -------------------------------------------------------------------- integer overflow
@schedules
def test_wrapping_int_index_is_reported_with_its_line(holes, schedule, seed):
    x, out = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    # 65536 * 65536 wraps to 0: every access stays in bounds
    args = (x, out, np.int32(65536), np.int32(65536))
    with pytest.raises(
        sim.SimulationError,
        match=r"signed integer overflow at holes\.cu:58:\d+: 65536 \* 65536 cannot be "
        r"represented in type 'int'.*thread \(\d+,0,0\)",
    ):
        launch(holes, "wrapping_index", 1, 32, args, schedule=schedule, seed=seed)
    launch(holes, "wrapping_index", 1, 32, (x, out, np.int32(0), np.int32(65536)))
    np.testing.assert_array_equal(out, x)


# ---------------------------------------------------------------- partial-warp shuffles
@schedules
def test_guarded_partial_warp_shuffle_is_not_an_error(holes, schedule, seed):
    x = rng(2).standard_normal(100).astype(np.float32)
    out = np.zeros(1, np.float32)
    launch(holes, "guarded_partial_warp_sum", 1, 100, (x, out), schedule=schedule, seed=seed)
    np.testing.assert_allclose(out[0], x.astype(np.float64).sum(), rtol=1e-5)


# ------------------------------------------------------------------- fences (race mode)
def last_block_args(blocks: int, order: int):
    x = rng(3).standard_normal(blocks * 32).astype(np.float32)
    return x, (
        x,
        np.zeros(blocks, np.float32),
        np.zeros(1, np.uint32),
        np.zeros(1, np.float32),
        np.int32(order),
    )


@needs_race_mode
@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_fence_then_ticket_passes_race_mode(holes, schedule, seed):
    x, args = last_block_args(4, 0)
    launch(holes, "last_block_total", 4, 32, args, check_races=True, schedule=schedule, seed=seed)
    np.testing.assert_allclose(args[3][0], x.astype(np.float64).sum(), rtol=1e-5)
    assert args[2][0] == 0


@needs_race_mode
@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_ticket_then_fence_is_a_race(holes, schedule, seed):
    _, args = last_block_args(4, 1)
    with pytest.raises(
        sim.SimulationError, match=r"data race on global memory .* parameter 1 \(`float\*`\)"
    ):
        launch(
            holes, "last_block_total", 4, 32, args, check_races=True, schedule=schedule, seed=seed
        )


@needs_race_mode
@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_guide_last_block_without_acquire_is_a_race_every_time(holes, schedule, seed):
    x = rng(3).standard_normal(4 * 32).astype(np.float32)
    for _ in range(2):
        args = (x, np.zeros(4, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.float32))
        with pytest.raises(sim.SimulationError, match=r"data race on global memory"):
            launch(
                holes,
                "guide_last_block",
                4,
                32,
                args,
                check_races=True,
                schedule=schedule,
                seed=seed,
            )
