"""The NumPy backend's blocks: every value covered once, coefficients lined up, shares balanced."""

import threading

import numpy as np
import pytest

import cupy_bn as cbn
from cupy_bn.backends import tiling
from cupy_bn.backends.tiling import _share_bounds, plan_for, store
from cupy_bn.layout import canonical

SHAPES = [
    ((3, 2, 400_000), 1),
    ((4, 300, 1000), 1),
    ((2, 300, 1000), 1),
    ((16, 3, 5000), 1),
    ((9, 5, 30), 1),
    ((1001, 3), -1),
    ((300, 2000), -1),
    ((7, 3, 1, 1), 1),
    ((32, 64, 56, 56), 1),
    ((33, 1000), -1),
]


@pytest.fixture(autouse=True)
def quarter_size_blocks(monkeypatch):
    """Blocks of 2^18 values at most, so that SHAPES, small enough to test quickly, take every
    kind of plan (the same code cuts a tensor 4x larger in each dimension that way at the
    default block size)."""
    monkeypatch.setattr(tiling, "BLOCK_ELEMENTS", 1 << 18)
    monkeypatch.setattr(tiling, "MIN_BLOCK_ELEMENTS", 1 << 16)
    tiling._cached_plan.cache_clear()
    yield
    tiling._cached_plan.cache_clear()


def test_the_shapes_take_every_kind_of_plan():
    kinds = {
        plan_for(canonical(np.empty(shape, np.float32), axis), coefficients).kind
        for shape, axis in SHAPES
        for coefficients in (False, True)
    }
    assert kinds == {"periods", "groups", "segments"}


def test_small_tensors_get_a_block_per_core_and_large_ones_full_blocks(monkeypatch):
    monkeypatch.setattr(tiling, "worker_count", lambda: 2)
    assert tiling.block_elements(1 << 10) == tiling.MIN_BLOCK_ELEMENTS
    assert tiling.block_elements(3 << 17) == 3 << 16
    assert tiling.block_elements(1 << 30) == tiling.BLOCK_ELEMENTS


@pytest.mark.parametrize("block_elements", [1 << 16, 1 << 18, 1 << 20])
@pytest.mark.parametrize("shape,channel_axis", SHAPES)
def test_column_sums_add_at_most_max_sum_rows_in_sequence(shape, channel_axis, block_elements):
    view = canonical(np.empty(shape, np.float32), channel_axis)
    plan = tiling.Plan(view.layout, view.data.shape, block_elements)
    if plan.kind == "periods":
        assert all(b.size // plan.sum_cols <= tiling.MAX_SUM_ROWS for b in plan.blocks)


def channel_of_each_value(view):
    """Channel index of every value of the canonical data, in memory order."""
    if view.layout == "MC":
        return np.broadcast_to(np.arange(view.num_channels), view.data.shape).ravel()
    n, c, s = view.data.shape
    return np.broadcast_to(np.arange(c)[None, :, None], (n, c, s)).ravel()


@pytest.mark.parametrize("shape,channel_axis", SHAPES)
@pytest.mark.parametrize("coefficients", [False, True])
def test_blocks_cover_every_value_once_and_coefficients_line_up(shape, channel_axis, coefficients):
    x = np.zeros(shape, np.float32)
    view = canonical(x, channel_axis)
    plan = plan_for(view, coefficients=coefficients)
    covered = np.zeros(x.size, np.int64)
    channel = channel_of_each_value(view)
    v = np.arange(view.num_channels, dtype=np.float64) + 0.5
    (coefficient,) = plan.coefficients(np.float64, v)
    index = np.arange(x.size).reshape(view.data.shape)
    for block in plan.blocks:
        where = plan.block(index, block)
        covered[where.ravel()] += 1
        got = np.broadcast_to(coefficient(block), where.shape)
        np.testing.assert_array_equal(got, v[channel[where]])
    assert np.all(covered == 1)
    assert sum(plan.sizes) == x.size


@pytest.mark.parametrize("shape,channel_axis", SHAPES[:7])
def test_block_sums_fold_to_the_right_channels(shape, channel_axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    view = canonical(x, channel_axis)
    plan = plan_for(view)
    partials = plan.partials(np.float64, 2)
    for i, block in enumerate(plan.blocks):
        a = plan.block(view.data, block)
        store(partials, i, plan.sums(a), plan.dot_sums(a, a))
    s1, s2 = plan.total(partials)
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    np.testing.assert_allclose(s1, x.sum(axis=axes), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(s2, (x * x).sum(axis=axes), rtol=1e-12)


@pytest.mark.parametrize(
    "sizes,shares",
    [
        ([5] * 10, 2),
        ([1, 1, 1, 100], 2),
        ([100, 1, 1, 1], 2),
        ([3, 3, 3], 3),
        ([7], 2),
        ([2, 9, 4, 4, 1, 8], 3),
    ],
)
def test_shares_are_contiguous_and_balanced(sizes, shares):
    bounds = _share_bounds(sizes, shares)
    assert bounds[0] == 0 and bounds[-1] == len(sizes) and bounds == sorted(bounds)
    totals = [sum(sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert max(totals) - min(totals) <= max(sizes)


def test_channel_group_tiles_follow_new_values_from_call_to_call():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 300, 1000)).astype(np.float32)  # channel groups
    view = canonical(x, 1)
    plan = plan_for(view, coefficients=True)
    assert plan.kind == "groups" and max(b.samples for b in plan.blocks) > 1
    be = cbn.get_backend("numpy", x)
    for trial in range(3):
        scale = rng.standard_normal(300).astype(np.float32)
        shift = rng.standard_normal(300).astype(np.float32)
        y = be.apply(view, scale, shift)
        expect = x.astype(np.float64) * scale[:, None] + shift[:, None]
        np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6, err_msg=f"call {trial}")


def test_calls_from_several_threads_at_once_are_independent():
    rng = np.random.default_rng(2)
    inputs = [rng.normal(k, 1 + k, (8, 300, 1000)).astype(np.float32) for k in range(4)]
    expected = [cbn.batch_norm(x)[0] for x in inputs]
    results = [None] * len(inputs)

    def work(k):
        for _ in range(3):
            results[k] = cbn.batch_norm(inputs[k])[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expect in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("shape,channel_axis", SHAPES[:7])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_block_plan_matches_the_reference(shape, channel_axis, dtype):
    import reference as ref

    rng = np.random.default_rng(5)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[channel_axis]
    w = rng.normal(1, 0.2, channels).astype(np.float32)
    y, saved = cbn.batch_norm(x, w, w, channel_axis=channel_axis)
    tol = 2e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(
        y.astype(np.float64), ref.forward(x, w, w, channel_axis=channel_axis), atol=tol
    )
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    rdx, rdw, rdb = ref.backward(x, dy, w, channel_axis=channel_axis)
    np.testing.assert_allclose(dx.astype(np.float64), rdx, atol=tol)
    per_channel = x.size / channels
    np.testing.assert_allclose(dw, rdw, rtol=1e-3, atol=tol * np.sqrt(per_channel))
    np.testing.assert_allclose(db, rdb, rtol=1e-3, atol=tol * np.sqrt(per_channel))


@pytest.mark.parametrize("offsets", [(0,), (16,), (0, 2048), (100, 300, 3000)])
def test_outputs_start_away_from_their_inputs_page_offsets(offsets):
    from cupy_bn.backends.numpy_backend import empty_unaliased

    def at(offset):
        raw = np.empty((1 << 20) * 4 + 8192, np.uint8)
        start = (offset - raw.ctypes.data) % 4096
        return raw[start : start + (1 << 22)].view(np.float32)

    inputs = [at(o) for o in offsets]
    out = empty_unaliased(np.empty((1 << 10, 1 << 10), np.float32), *inputs)
    assert out.shape == (1 << 10, 1 << 10) and out.flags.c_contiguous
    where = out.ctypes.data % 4096
    distance = min(min((where - o) % 4096, (o - where) % 4096) for o in offsets)
    widest = max(
        (b - a) % 4096 or 4096
        for a, b in zip(sorted(offsets), sorted(offsets)[1:] + sorted(offsets)[:1], strict=True)
    )
    assert distance >= widest // 2 - 64
