"""Correct kernels of several shapes match NumPy under every schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_helpers import needs_simulator, rng, schedules
from sim_kernel_sources import (
    ATOMICS,
    BN_SPLIT,
    BN_STATS,
    BN_STATS_NAMES,
    HALF,
    MATH,
    TRANSPOSE,
    WARP_OPS,
)

from cupy_bn import sim

pytestmark = needs_simulator


@pytest.fixture(scope="module")
def bn_stats():
    return sim.RawModule(code=BN_STATS, name_expressions=BN_STATS_NAMES)


@pytest.fixture(scope="module")
def warp_ops():
    return sim.RawModule(code=WARP_OPS)


def stats_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xd = x.astype(np.float64)
    axes = (0, 2)
    return xd.mean(axis=axes), xd.var(axis=axes)


@schedules
@pytest.mark.parametrize(
    "shape,block", [((2, 3, 35), 64), ((4, 2, 256), 256), ((1, 1, 1), 32), ((3, 4, 33), 1024)]
)
def test_bn_stats_float_matches_float64_reference(bn_stats, shape, block, schedule, seed):
    x = (rng(1).standard_normal(shape) * 3 + 50).astype(np.float32)  # |mean| >> std
    N, C, S = shape
    mean, var = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)
    k = bn_stats.get_function("bn_stats<float, float>")
    k(
        (C,),
        (block,),
        (x, mean, var, np.int32(N), np.int32(C), np.int32(S)),
        schedule=schedule,
        seed=seed,
    )
    ref_mean, ref_var = stats_reference(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=2e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-6)


@schedules
def test_bn_stats_double(bn_stats, schedule, seed):
    x = rng(2).standard_normal((3, 5, 70)) + 1e3
    mean, var = np.zeros(5), np.zeros(5)
    k = bn_stats.get_function("bn_stats<double, double>")
    k(5, 128, (x, mean, var, np.int32(3), np.int32(5), np.int32(70)), schedule=schedule, seed=seed)
    ref_mean, ref_var = stats_reference(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-14)
    np.testing.assert_allclose(var, ref_var, rtol=1e-10)


@schedules
def test_bn_stats_half_and_bfloat16_inputs_accumulate_in_float(bn_stats, schedule, seed):
    xf = rng(3).standard_normal((2, 3, 40)).astype(np.float32) * 2 + 1
    xh = xf.astype(np.float16)
    bf_bits = (xf.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 by truncation
    xb = (bf_bits.astype(np.uint32) << 16).view(np.float32)
    for name, arg, exact in (
        ("bn_stats<__half, float>", xh, xh.astype(np.float32)),
        ("bn_stats<__nv_bfloat16, float>", bf_bits, xb),
    ):
        mean, var = np.zeros(3, np.float32), np.zeros(3, np.float32)
        bn_stats.get_function(name)(
            3,
            64,
            (arg, mean, var, np.int32(2), np.int32(3), np.int32(40)),
            schedule=schedule,
            seed=seed,
        )
        ref_mean, ref_var = stats_reference(exact)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, ref_var, rtol=1e-4)


@schedules
@pytest.mark.parametrize("splits,block", [(1, 64), (4, 128), (3, 96)])
def test_split_reduction_2d_grid_dynamic_shared_memory(splits, block, schedule, seed):
    m = sim.RawModule(code=BN_SPLIT)
    N, C, S = 3, 5, 50
    x = (rng(4).standard_normal((N, C, S)) * 2 + 10).astype(np.float32)
    s, ss = np.zeros(C), np.zeros(C)
    chunk = -(-N * S // splits)
    m.get_function("partial_sums")(
        (C, splits),
        (block,),
        (x, s, ss, np.int32(N), np.int32(C), np.int32(S), np.int32(chunk)),
        shared_mem=2 * (block // 32) * 4,
        schedule=schedule,
        seed=seed,
    )
    mean, invstd = np.zeros(C, np.float32), np.zeros(C, np.float32)
    m.get_function("finalize")(
        (1,),
        (32,),
        (s, ss, mean, invstd, np.int32(C), np.int64(N * S), np.float32(1e-5)),
        schedule=schedule,
        seed=seed,
    )
    ref_mean, ref_var = stats_reference(x)
    np.testing.assert_allclose(s, x.astype(np.float64).sum(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(ref_var + 1e-5), rtol=1e-4)


def shuffle_reference(d: int) -> list[np.ndarray]:
    """CUDA Programming Guide semantics of the four shuffles, for widths 2..32."""
    lane = np.arange(32)
    v = 100 + lane
    rows = []
    for w in (2, 4, 8, 16, 32):
        seg = lane // w * w
        rows.append(v[seg + d % w])  # srcLane % width
        rows.append(np.where(lane - seg >= d, v[np.clip(lane - d, 0, 31)], v))  # up
        rows.append(np.where(lane - seg + d < w, v[np.clip(lane + d, 0, 31)], v))  # down
        target = lane ^ d  # later groups are out of reach; earlier ones are not
        rows.append(np.where(target < seg + w, v[target & 31], v))  # xor
    return rows


@pytest.mark.parametrize("d", [0, 1, 3, 5, 8, 17, 31])
def test_shuffles_follow_cuda_semantics_for_every_width(warp_ops, d):
    out = np.zeros((20, 32), np.int32)
    warp_ops.get_function("shuffles")(1, 32, (out, np.int32(d)))
    for row, expected in zip(out, shuffle_reference(d), strict=True):
        np.testing.assert_array_equal(row, expected)


@schedules
def test_votes_ballots_and_warp_reductions(warp_ops, schedule, seed):
    for trial in range(3):
        pred = (rng(trial).random(32) < [0.5, 1.0, 0.0][trial]).astype(np.int32)
        out = np.zeros((8, 32), np.uint32)
        warp_ops.get_function("votes")(1, 32, (pred, out), schedule=schedule, seed=seed)
        bits = sum(1 << i for i in range(32) if pred[i])
        lanes = np.arange(32)
        np.testing.assert_array_equal(out[0], bits)
        np.testing.assert_array_equal(out[1], int(pred.any()))
        np.testing.assert_array_equal(out[2], int(pred.all()))
        np.testing.assert_array_equal(out[3], 0xFFFFFFFF)
        np.testing.assert_array_equal(out[4], np.where(lanes % 2 == 0, bits & 0x55555555, 0))
        same = [sum(1 << j for j in range(32) if pred[j] == pred[i]) for i in range(32)]
        np.testing.assert_array_equal(out[5], same)
        np.testing.assert_array_equal(out[6], int((pred + lanes).sum()))
        np.testing.assert_array_equal(out[7], int((pred * 7 + lanes).max()))


@schedules
@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_segmented_scan_with_width_below_32(warp_ops, width, schedule, seed):
    x = rng(5).integers(-4, 5, 64).astype(np.float32)
    out = np.zeros_like(x)
    warp_ops.get_function("segmented_scan")(
        2, 32, (x, out, np.int32(width)), schedule=schedule, seed=seed
    )
    np.testing.assert_array_equal(out, np.cumsum(x.reshape(-1, width), axis=1).ravel())


@schedules
def test_syncthreads_count_and_or(warp_ops, schedule, seed):
    pred = np.zeros((3, 128), np.int32)
    pred[0] = rng(6).random(128) < 0.3
    pred[1] = 1
    out = np.zeros(9, np.int32)
    warp_ops.get_function("block_votes")(3, 128, (pred, out), schedule=schedule, seed=seed)
    expected = [[p.sum(), int(p.all()), int(p.any())] for p in pred]
    np.testing.assert_array_equal(out, np.ravel(expected))


@schedules
def test_tiled_transpose_2d_blocks_and_grid(schedule, seed):
    rows, cols = 70, 45
    x = rng(7).standard_normal((rows, cols)).astype(np.float32)
    out = np.zeros((cols, rows), np.float32)
    k = sim.RawModule(code=TRANSPOSE).get_function("transpose")
    k(
        (-(-cols // 32), -(-rows // 32)),
        (32, 8),
        (x, out, np.int32(rows), np.int32(cols)),
        schedule=schedule,
        seed=seed,
    )
    np.testing.assert_array_equal(out, x.T)


@schedules
def test_3d_blocks_form_warps_from_the_linear_thread_index(schedule, seed):
    block, grid = (3, 5, 3), (2, 1, 3)
    n = 45 * 6
    linear, first = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    sim.RawModule(code=TRANSPOSE).get_function("thread_ids")(
        grid, block, (linear, first), schedule=schedule, seed=seed
    )
    np.testing.assert_array_equal(linear, np.arange(n))
    t = np.arange(n) % 45
    np.testing.assert_array_equal(first, t // 32 * 32)


@schedules
def test_half_elementwise_and_warp_max_bf16(schedule, seed):
    m = sim.RawModule(code=HALF)
    C, S = 3, 10
    x = rng(8).standard_normal((2, C, S)).astype(np.float16)
    scale = rng(9).standard_normal(C).astype(np.float32)
    shift = rng(10).standard_normal(C).astype(np.float32)
    y = np.zeros_like(x)
    m.get_function("bn_apply_half")(
        2,
        32,
        (x, y, scale, shift, np.int32(C), np.int32(S), np.int64(x.size)),
        schedule=schedule,
        seed=seed,
    )
    ref = (x.astype(np.float32) * scale[None, :, None] + shift[None, :, None]).astype(np.float16)
    np.testing.assert_array_equal(y, ref)

    h = rng(11).standard_normal(64).astype(np.float16)
    bf = (rng(12).standard_normal(64).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.zeros(4, np.float32)
    m.get_function("warp_max")(2, 32, (h, bf, out), schedule=schedule, seed=seed)
    bf_values = (bf.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(out[0::2], h.reshape(2, 32).max(axis=1).astype(np.float32))
    np.testing.assert_array_equal(out[1::2], bf_values.reshape(2, 32).max(axis=1))


@schedules
def test_atomics_on_every_type(schedule, seed):
    n = 3000
    keys = rng(13).integers(0, 32, n).astype(np.int32)
    hist, uhist = np.zeros(32, np.int32), np.zeros(32, np.uint32)
    total, fsum, dsum = np.zeros(1, np.uint64), np.zeros(1, np.float32), np.zeros(1)
    imax, imin = np.array([-1], np.int32), np.array([99], np.int32)
    wrap, cas, bits = np.zeros(1, np.uint32), np.zeros(1, np.int32), np.zeros(1, np.uint32)
    k = sim.RawModule(code=ATOMICS).get_function("atomics")
    k(
        4,
        128,
        (keys, np.int32(n), hist, uhist, total, fsum, dsum, imax, imin, wrap, cas, bits),
        schedule=schedule,
        seed=seed,
    )
    counts = np.bincount(keys, minlength=32)
    np.testing.assert_array_equal(hist, counts)
    np.testing.assert_array_equal(uhist, counts)
    assert total[0] == keys.sum() and cas[0] == keys.sum()
    assert fsum[0] == 0.5 * n and dsum[0] == 0.25 * keys.sum()
    assert imax[0] == keys.max() and imin[0] == keys.min()
    assert wrap[0] == n % 10
    assert bits[0] == np.bitwise_or.reduce(np.left_shift(1, keys).astype(np.uint32))


@schedules
def test_last_block_pattern_with_threadfence(schedule, seed):
    x = rng(14).standard_normal(1000).astype(np.float32)
    blocks = 7
    partial, counter, out = (
        np.zeros(blocks, np.float32),
        np.zeros(1, np.uint32),
        np.zeros(1, np.float32),
    )
    k = sim.RawModule(code=ATOMICS).get_function("last_block_sum")
    k(blocks, 32, (x, np.int32(x.size), partial, counter, out), schedule=schedule, seed=seed)
    assert counter[0] == 0  # atomicInc wrapped around for the last block
    np.testing.assert_allclose(out[0], x.astype(np.float64).sum(), rtol=1e-5)


def test_math_functions_match_ieee_references():
    n = 200
    x = np.linspace(0.05, 4.0, n).astype(np.float32)
    f = np.zeros((16, n), np.float32)
    sim.RawModule(code=MATH).get_function("math_funcs")(-(-n // 64), 64, (x, f, np.int32(n)))
    xd = x.astype(np.float64)
    erf = np.vectorize(math.erf)
    expected = [
        1 / np.sqrt(xd),
        np.exp(-xd),
        np.exp(-xd),
        np.log(xd),
        np.log(xd),
        erf(xd - 1),
        0.5 * (1 + erf((xd - 1) / math.sqrt(2))),
        np.tanh(xd - 1),
        np.sin(np.pi * xd),
        1 / xd,
        np.clip(xd - 1, 0, 1),
        np.maximum(xd, 1),
        np.maximum(xd, 1),
        np.rint(x * np.float32(3)),
        xd**1.5,
        np.sqrt(xd),
    ]
    for i, (row, ref) in enumerate(zip(f, expected, strict=True)):
        np.testing.assert_allclose(row, ref, rtol=3e-6, atol=2e-7, err_msg=f"row {i}")


def test_integer_intrinsics():
    v = np.array([0, 1, 2, 3, 0x80000000, 0xFFFFFFFF, 0x12345678, 96], np.uint32)
    out = np.zeros((8, v.size), np.uint32)
    sim.RawModule(code=MATH).get_function("int_funcs")(1, 32, (v, out, np.int32(v.size)))
    as_int = [int(a) for a in v]
    brev = [int(f"{a:032b}"[::-1], 2) for a in as_int]
    clz = [32 - a.bit_length() for a in as_int]
    ffs = [(a & -a).bit_length() for a in as_int]
    mulhi = [(a * 0x9E3779B9) >> 32 for a in as_int]
    pool = [[(a >> 8 * i) & 0xFF for i in range(4)] + [0x44, 0x33, 0x22, 0x11] for a in as_int]
    perm = [sum(p[(0x5140 >> 4 * i) & 7] << 8 * i for i in range(4)) for p in pool]
    np.testing.assert_array_equal(out[0], [bin(a).count("1") for a in as_int])
    np.testing.assert_array_equal(out[1], brev)
    np.testing.assert_array_equal(out[2], clz)
    np.testing.assert_array_equal(out[3], ffs)
    np.testing.assert_array_equal(out[4], mulhi)
    np.testing.assert_array_equal(out[5], perm)
    np.testing.assert_array_equal(out[6], np.minimum(v, 12345))
    np.testing.assert_array_equal(out[7], v)


def test_schedules_change_the_interleaving(bn_stats):
    """The three schedules are really different orders (same result, other switch counts)."""
    x = rng(15).standard_normal((2, 2, 300)).astype(np.float32)
    counts = set()
    for schedule, seed in (("forward", 0), ("random", 1), ("random", 2)):
        mean, var = np.zeros(2, np.float32), np.zeros(2, np.float32)
        k = bn_stats.get_function("bn_stats<float, float>")
        k(
            2,
            256,
            (x, mean, var, np.int32(2), np.int32(2), np.int32(300)),
            schedule=schedule,
            seed=seed,
        )
        counts.add(k.last_switches)
    assert len(counts) >= 2
