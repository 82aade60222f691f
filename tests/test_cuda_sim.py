"""The CUDA backend's kernels run in the simulator (`backend="sim"`) against float64 references.

Every case runs under two thread schedules; "split" tuning makes even small tensors spread a
channel over several blocks, so the workspace merges run as they do on a GPU.
"""

import copy
import warnings

import cuda_checks as cc
import numpy as np
import pytest

import cupy_bn as cbn
from cupy_bn.backends.base import DoubleBackwardCoefficients
from cupy_bn.backends.cuda_backend import CudaBackend, Tuning, simulator_usable
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.layout import canonical

pytestmark = pytest.mark.skipif(
    not simulator_usable(), reason="CUDA simulator toolchain (g++, CUDA headers) not found"
)

#: Tiny work sizes: a few dozen elements per block, so reductions split channels over blocks.
SPLIT = Tuning(reduction_min_work=32, elementwise_work=64)
TUNINGS = {"default": None, "split": SPLIT}


@pytest.fixture(autouse=True)
def _argument_type_warnings_are_errors():
    """A scalar whose type differs from the kernel parameter reads garbage on a GPU."""
    from cupy_bn import sim as simulator

    with warnings.catch_warnings():
        warnings.simplefilter("error", simulator.ArgumentTypeWarning)
        yield


def sim(schedule="forward", tuning=None, **kw) -> CudaBackend:
    return CudaBackend.for_simulator(schedule=schedule, tuning=tuning, **kw)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("tuning", sorted(TUNINGS))
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,channel_axis", cc.SHAPES, ids=lambda v: str(v))
def test_primitives_match_float64(shape, channel_axis, dtype, tuning, schedule):
    cc.check_primitives(sim(schedule, TUNINGS[tuning]), shape, channel_axis, dtype)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("tuning", sorted(TUNINGS))
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,channel_axis", cc.SHAPES, ids=lambda v: str(v))
def test_double_backward_primitives_match_float64(shape, channel_axis, dtype, tuning, schedule):
    cc.check_double_backward(sim(schedule, TUNINGS[tuning]), shape, channel_axis, dtype)


#: Shapes of the 16-byte pack paths (shape, channel axis). NCS: S a multiple of every pack (8
#: elements), S = 6 (packs of 2 doubles only), S odd and C * S not a multiple of 4 (never
#: packable). MC (packs run along C): C = 16 (every pack, one channel tile), C = 40 (two tiles,
#: the second with 8 channels: lanes of it idle), C = 6 (rows of 24 bytes for float: packs of
#: 2 doubles only), C = 7 (never), an odd row count, and an NHWC tensor.
PACK_SHAPES = [
    ((3, 2, 8), 1),
    ((2, 3, 24), 1),
    ((2, 3, 6), 1),
    ((3, 5, 7), 1),
    ((37, 16), -1),
    ((9, 40), -1),
    ((11, 6), -1),
    ((5, 7), -1),
    ((2, 3, 5, 8), -1),
]


def _placed(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `a` starting `offset` elements past a 16-byte boundary (a view into a larger
    buffer, as a slice from element 1 would be)."""
    raw = np.empty(a.nbytes + 32, np.uint8)
    start = (-raw.ctypes.data) % 16 + offset * a.itemsize
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 16 == offset * a.itemsize % 16
    return out


@pytest.mark.parametrize("schedule,tuning", [("forward", "default"), ("reverse", "split")])
@pytest.mark.parametrize("misaligned", ["none", "x", "dy", "third"])
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,channel_axis", PACK_SHAPES, ids=str)
def test_elementwise_packs_and_misaligned_views(
    shape, channel_axis, dtype, misaligned, schedule, tuning
):
    """Every kernel with a 16-byte pack path (apply, backward apply, the fused apply and the
    ReLU's gradient, the double backward's apply; the NCS statistics and reductions), on
    aligned tensors and with one operand one element past a 16-byte boundary ("third": the
    residual and ddx), against float64 formulas and sums."""
    be = sim(schedule, TUNINGS[tuning])
    acc = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    x_np, dy_np = cc.make_inputs(shape, dtype)
    z_np = np.random.default_rng(5).normal(0.0, 2.0, shape).astype(dtype)
    x = _placed(x_np, 1 if misaligned == "x" else 0)
    dy = _placed(dy_np, 1 if misaligned == "dy" else 0)
    z = _placed(z_np, 1 if misaligned == "third" else 0)
    view = canonical(x, channel_axis)
    dview, zview = view.match(dy, "dy"), view.match(z, "z")
    for v, a in ((view, x), (dview, dy), (zview, z)):
        assert v.data.ctypes.data == a.ctypes.data  # no copy: the kernels see the offset
    x64, dy64, z64 = (v.data.astype(np.float64) for v in (view, dview, zview))
    channels = view.num_channels
    rng = np.random.default_rng(3)
    scale, shift, mean, gamma, sum_dy, sum_dy_xmu = (
        rng.normal(1.0, 0.5, channels).astype(acc) for _ in range(6)
    )
    invstd = rng.uniform(0.5, 2.0, channels).astype(acc)
    tol, acc_tol = cc.OUTPUT_TOL[dtype.name], cc.ACC_TOL[acc.name]
    axes = (0, 2) if view.layout == "NCS" else (0,)

    def per_channel(v):
        v = np.asarray(v, np.float64)
        return v[None, :, None] if view.layout == "NCS" else v[None, :]

    def assert_sums(got, terms, what):
        scale = max(1.0, np.abs(terms).sum() / channels)
        cc.assert_close(got, terms.sum(axis=axes), acc_tol * scale, what)

    batch_mean, batch_var = be.batch_stats(view)
    cc.assert_close(batch_mean, x64.mean(axis=axes), acc_tol, "mean")
    cc.assert_close(batch_var, x64.var(axis=axes), acc_tol, "var")
    xmu = x64 - per_channel(mean)
    sum_pair = be.backward_reduce(dview, view, mean)
    for got, terms, what in zip(
        sum_pair, (dy64, dy64 * xmu), ("sum_dy", "sum_dy_xmu"), strict=True
    ):
        assert_sums(got, terms, what)
    sums = be.double_backward_reduce(dview, view, zview, mean)
    expected = (dy64, dy64 * xmu, z64, z64 * xmu, z64 * dy64)
    for k, (got, terms) in enumerate(zip(sums, expected, strict=True)):
        assert_sums(got, terms, f"double backward sum {k}")

    y = be.apply(view, scale, shift)
    cc.assert_close(y, x64 * per_channel(scale) + per_channel(shift), tol, "apply")

    count = view.count
    dx = be.backward_apply(dview, view, mean, invstd, gamma, sum_dy, sum_dy_xmu, count)
    p = per_channel(gamma) * per_channel(invstd)
    q = -p * per_channel(invstd) ** 2 * per_channel(sum_dy_xmu) / count
    r = -p * per_channel(sum_dy) / count
    expect = p * dy64 + q * (x64 - per_channel(mean)) + r
    cc.assert_close(dx, expect, 4 * tol, "backward_apply")

    affine = x64 * per_channel(scale) + per_channel(shift)
    for residual, relu in ((zview, True), (zview, False), (None, True)):
        got = be.apply_activation(view, scale, shift, residual, relu)
        want = affine + (z64 if residual is not None else 0.0)
        want = np.maximum(want, 0.0) if relu else want
        cc.assert_close(got, want, 2 * tol, f"apply_activation {residual is not None} {relu}")

    g = be.relu_gradient(dview, zview)
    cc.assert_close(g, np.where(z64 > 0, dy64, 0.0), 0.0, "relu_gradient")

    k = DoubleBackwardCoefficients(*(rng.normal(0.0, 1.0, channels) for _ in range(6)))
    kc = DoubleBackwardCoefficients(*(per_channel(v) for v in k.vectors()))
    for ddx, h in ((zview, z64), (None, np.zeros_like(z64))):
        gx, gdy = be.double_backward_apply(dview, view, ddx, mean, k)
        want_gx = kc.gx_dy * dy64 + kc.gx_ddx * h + kc.gx_xmu * xmu + kc.gx_one
        want_gdy = kc.gdy_ddx * h + kc.gx_dy * xmu + kc.gdy_one
        what = "with ddx" if ddx is not None else "without ddx"
        cc.assert_close(gx, want_gx, 4 * tol, f"gx {what}")
        cc.assert_close(gdy, want_gdy, 4 * tol, f"gdy {what}")


def test_split_tuning_really_splits():
    be = sim(tuning=SPLIT)
    ncs = canonical(np.zeros((3, 2, 300), np.float32), 1)
    mc = canonical(np.zeros((300, 2), np.float32), -1)
    kernel = be.loader.function("ncs", "bn_ncs_stats", np.float32)
    assert be._ncs_reduction_grid(ncs, kernel).pieces > 4
    assert be._mc_reduction_grid(mc, kernel).pieces > 4
    assert sim()._ncs_reduction_grid(ncs, kernel).pieces == 1  # default: small tensors, 1 block
    two_level = be._mc_reduction_grid(canonical(np.zeros((300, 40), np.float32), -1), kernel)
    assert two_level.groups > 1
    assert be._mc_reduction_grid(canonical(np.zeros((80, 20), np.float32), -1), kernel).groups == 3


@pytest.mark.parametrize(
    "shape,channel_axis", [((6, 3, 4, 5), 1), ((5, 4, 6, 3), -1), ((40, 3), -1)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_matches_the_numpy_backend(shape, channel_axis, dtype):
    x, dy = cc.make_inputs(shape, dtype, seed=3)
    view, ref = canonical(x, channel_axis), NumpyBackend()
    dview = view.match(dy, "dy")
    be = sim("reverse", SPLIT)
    tol = cc.OUTPUT_TOL[np.dtype(dtype).name]
    mean, var = be.batch_stats(view)
    rmean, rvar = ref.batch_stats(view)
    cc.assert_close(mean, rmean, 1e-6, "mean")
    cc.assert_close(var, rvar, 1e-6, "var")
    scale, shift = 1.0 / np.sqrt(rvar + 1e-5), -rmean / np.sqrt(rvar + 1e-5)
    cc.assert_close(be.apply(view, scale, shift), ref.apply(view, scale, shift), tol, "apply")
    s1, s2 = be.backward_reduce(dview, view, rmean)
    r1, r2 = ref.backward_reduce(dview, view, rmean)
    cc.assert_close(s1, r1, 1e-5, "sum_dy")
    cc.assert_close(s2, r2, 1e-5, "sum_dy_xmu")
    gamma = np.linspace(0.5, 1.5, view.num_channels).astype(np.float32)
    args = (dview, view, rmean, scale.astype(np.float32), gamma, r1, r2, view.count)
    cc.assert_close(be.backward_apply(*args), ref.backward_apply(*args), 2 * tol, "dx")


# -- numerics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tuning", sorted(TUNINGS))
@pytest.mark.parametrize("shape,channel_axis", [((64, 4, 32, 32), 1), ((65536, 4), -1)])
def test_float32_offset_data_statistics(shape, channel_axis, tuning):
    """Mean 1e3, std 0.1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    rng = np.random.default_rng(0)
    x = (1e3 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    view = canonical(x, channel_axis)
    mean, var = sim(tuning=TUNINGS[tuning]).batch_stats(view)
    axes = (0, 2) if view.layout == "NCS" else (0,)
    x64 = view.data.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-3)
    naive = (x * x).mean(dtype=np.float32) - x.mean(dtype=np.float32) ** 2
    assert abs(naive / x64.var() - 1) > 1e-1  # the failure this guards against


@pytest.mark.parametrize("shape,channel_axis", [((16, 2, 256, 256), 1), ((1 << 20, 2), -1)])
def test_float16_with_a_million_values_per_channel(shape, channel_axis):
    """2^20 values per channel (the core issue's size; the simulator streams them in ~0.1 s).

    A float16 accumulator would stop counting at 2048 and a float16 sum overflows at 65504;
    the kernels accumulate in float32.
    """
    rng = np.random.default_rng(1)
    x = (50 + 2 * rng.standard_normal(shape)).astype(np.float16)
    view = canonical(x, channel_axis)
    mean, var = sim().batch_stats(view)
    assert mean.dtype == np.float32
    axes = (0, 2) if view.layout == "NCS" else (0,)
    x64 = view.data.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-3)
    np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-3)
    y, _ = cbn.batch_norm(x, channel_axis=channel_axis, backend="sim")
    assert y.dtype == np.float16
    # the float64 reference, to float16's precision (|y| up to ~5: half an ulp <= 2**-9)
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    x64 = x.astype(np.float64)
    m = x64.mean(axis=axes, keepdims=True)
    expect = (x64 - m) / np.sqrt(x64.var(axis=axes, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.astype(np.float64), expect, rtol=2e-3, atol=2e-3)


# -- determinism and races --------------------------------------------------------------------
def _run_everything(be, shape, channel_axis, dtype):
    x, dy = cc.make_inputs(shape, dtype, seed=5)
    view = canonical(x, channel_axis)
    dview = view.match(dy, "dy")
    channels = view.num_channels
    mean, var = be.batch_stats(view)
    rm, rv = np.zeros(channels, mean.dtype), np.ones(channels, mean.dtype)
    fused = be.train_statistics(view, np.ones(channels, mean.dtype), None, rm, rv, 0.1, 1e-5)
    y = be.apply(view, fused[3], fused[4])
    sums = be.backward_reduce(dview, view, mean)
    dx = be.backward_apply(
        dview, view, mean, fused[2], np.ones(channels, mean.dtype), *sums, view.count
    )
    ddview = view.match(np.random.default_rng(6).normal(size=x.shape).astype(dtype), "ddx")
    second = be.double_backward_reduce(dview, view, ddview, mean)
    coefficients = DoubleBackwardCoefficients(*(np.linspace(-1, 1, channels) + k for k in range(6)))
    grads = be.double_backward_apply(dview, view, ddview, mean, coefficients)
    grads_no_ddx = be.double_backward_apply(dview, view, None, mean, coefficients)
    return (mean, var, *fused, rm, rv, y, *sums, dx, *second, *grads, *grads_no_ddx)


def _record_counters(be: CudaBackend) -> list:
    """Every counter buffer `be` hands to a launch, from now on, in launch order."""
    buffers, make = [], be._counters

    def recording(counters):
        buffer = make(counters)
        buffers.append(buffer)
        return buffer

    be._counters = recording
    return buffers


def _assert_disjoint(buffers) -> None:
    for i, a in enumerate(buffers):
        for b in buffers[i + 1 :]:
            assert not np.shares_memory(a, b), "two launches share counters"


def test_each_launch_gets_its_own_zeroed_counters():
    """Launches interleaved as if on two streams (or two replays of a graph) never share a
    counter: each reduction launch has its own buffer, all zeros when it starts."""
    be = sim(tuning=SPLIT)
    buffers = _record_counters(be)
    started = []
    launch = be.loader.launch

    def check_start(kernel, grid, block, args, shared_mem=0):
        started.extend(bool((a == 0).all()) for a in args if _is_counter(a, buffers))
        launch(kernel, grid, block, args, shared_mem)

    be.loader = copy.copy(be.loader)
    be.loader.launch = check_start
    x = np.random.default_rng(12).normal(size=(4, 3, 50)).astype(np.float32)
    views = [canonical(x, 1), canonical(x[:2].copy(), 1), canonical(x.reshape(-1, 3), -1)]
    for view in views + views:  # the same shapes again: a reused buffer would show here
        be.batch_stats(view)
        mean, _ = be.batch_stats(view)
        be.backward_reduce(view, view, mean)
    assert len(buffers) == 18 and started == [True] * 18
    _assert_disjoint(buffers)
    assert [b.size for b in buffers[:6]] == [3 + 2] * 6  # NCS: C channel counters, done, bad


def _is_counter(a, buffers) -> bool:
    return isinstance(a, np.ndarray) and any(a is b for b in buffers)


#: S = 301 and C = 37 take the element-by-element paths, S = 304 and C = 40 the 16-byte packs.
@pytest.mark.parametrize(
    "shape,channel_axis",
    [((5, 3, 301), 1), ((700, 37), -1), ((5, 3, 304), 1), ((300, 40), -1)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bitwise_identical_across_schedules(shape, channel_axis, dtype):
    schedules = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
    backends = [sim(schedule, SPLIT, seed=seed) for schedule, seed in schedules]
    counters = [_record_counters(be) for be in backends]
    runs = [_run_everything(be, shape, channel_axis, dtype) for be in backends]
    for buffers in counters:
        assert len(buffers) == 4  # batch_stats, train_statistics, the two reductions
        assert all((buffer == 0).all() for buffer in buffers)  # the kernels reset them
        _assert_disjoint(buffers)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


MERGE_PARTIALS = r"""
#include "bn_finalize.cuh"
extern "C" __global__ void merge_in_order(const float* mean, const float* m2,
                                          const long long* count, int p, float* out_mean,
                                          float* out_m2, long long* out_n) {
    const auto w = bn::merge_partials<4>(mean, m2, count, 0, 0, p, 1);
    *out_mean = w.mean;
    *out_m2 = w.m2;
    *out_n = w.n;
}
"""


def _chan_merge_float32(a, b):
    """bn_common.cuh's chan_merge(a, b) in float32, operation by operation (no FMA)."""
    f = np.float32
    n = a[0] + b[0]
    if n == 0:
        return a
    delta = f(b[1] - a[1])
    ratio = f(f(b[0]) / f(n))
    return (
        n,
        f(a[1] + f(delta * ratio)),
        f(f(a[2] + b[2]) + f(f(f(delta * delta) * f(a[0])) * ratio)),
    )


def test_partials_are_merged_in_index_order():
    """The cross-block merge folds partial 0, 1, 2, ... into the running triple, bit for bit
    (what makes the statistics independent of the block that arrives last)."""
    from cupy_bn import sim as simulator
    from cupy_bn.kernels import loader

    rng = np.random.default_rng(9)
    p = 37
    mean = rng.normal(5.0, 3.0, p).astype(np.float32)
    m2 = rng.uniform(0.0, 50.0, p).astype(np.float32)
    count = rng.integers(1, 1000, p).astype(np.int64)
    out_mean, out_m2, out_n = (
        np.zeros(1, np.float32),
        np.zeros(1, np.float32),
        np.zeros(1, np.int64),
    )
    module = simulator.RawModule(code=MERGE_PARTIALS, options=(f"-I{loader.KERNEL_DIR}",))
    module.get_function("merge_in_order")(
        1, 1, (mean, m2, count, np.int32(p), out_mean, out_m2, out_n)
    )
    expect = (np.int64(0), np.float32(0), np.float32(0))
    for k in range(p):
        expect = _chan_merge_float32(expect, (count[k], mean[k], m2[k]))
    assert out_n[0] == expect[0] == count.sum()
    assert out_mean[0].tobytes() == expect[1].tobytes(), (out_mean[0], expect[1])
    assert out_m2[0].tobytes() == expect[2].tobytes(), (out_m2[0], expect[2])


@pytest.mark.parametrize("shape,channel_axis", [((5, 3, 301), 1), ((700, 37), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernels_read_no_uninitialized_memory(shape, channel_axis, dtype):
    """Every raw kernel launch runs twice (check_memory): guards at the start, then the end of
    every array, shared memory and the bytes around arrays filled with 0xFF, then 0x7F. The
    outputs must be the same bits, and the same as without the check."""
    plain = _run_everything(sim("random", SPLIT, seed=1), shape, channel_axis, dtype)
    backend = sim("random", SPLIT, seed=1, check_memory=True)
    launches = []
    real_launch = backend.loader.launch

    def counted(kernel, *args, **kwargs):
        launches.append(kernel.name)
        return real_launch(kernel, *args, **kwargs)

    backend.loader.launch = counted
    checked = _run_everything(backend, shape, channel_axis, dtype)
    assert len(set(launches)) >= 4, launches
    for a, b in zip(plain, checked, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_sim_loader_passes_its_checks_to_every_launch():
    from cupy_bn.kernels.loader import SimLoader

    seen = {}

    def kernel(grid, block, args, **options):
        seen.update(options)

    SimLoader("reverse", 7, check_memory=True).launch(kernel, (1,), (32,), ())
    assert seen == {
        "shared_mem": 0,
        "schedule": "reverse",
        "seed": 7,
        "check_races": False,
        "check_memory": True,
    }
    with pytest.raises(ValueError, match="cannot be combined"):
        SimLoader(check_races=True, check_memory=True)


@pytest.mark.parametrize(
    "shape,channel_axis",
    [
        ((2, 2, 70), 1),  # 2 tiles per channel
        ((40, 20), -1),  # 20 row ranges merged in two levels (groups of 8)
    ],
)
def test_reduction_kernels_are_race_free(shape, channel_axis):
    """The stats kernel (plain, and fused with the running-stat update) and the gradient-sum
    kernels (backward and double backward) under the simulator's race detector, with channels
    split over several blocks: the workspace, the last-block merge and the counters."""
    from cupy_bn import sim as simulator

    supported, why = simulator.race_mode_support()
    if not supported:
        pytest.skip(f"race mode unavailable here: {why}")
    be = sim(
        "forward",
        Tuning(reduction_min_work=64, elementwise_work=64, merge_group=1),
        check_races=True,
    )
    if channel_axis == -1:  # the two-level merge really runs
        assert be._mc_reduction_grid(canonical(np.zeros(shape, np.float32), -1), None).groups == 3
    x, dy = cc.make_inputs(shape, np.float32, seed=6)
    view = canonical(x, channel_axis)
    dview = view.match(dy, "dy")
    axes = (0, 2) if view.layout == "NCS" else (0,)
    x64 = view.data.astype(np.float64)
    mean, var = be.batch_stats(view)
    cc.assert_close(var, x64.var(axis=axes), 1e-5, "var")
    rm, rv = np.zeros(view.num_channels, np.float32), np.ones(view.num_channels, np.float32)
    fused = be.train_statistics(view, None, None, rm, rv, 0.5, 1e-5)
    cc.assert_close(rm, 0.5 * x64.mean(axis=axes), 1e-5, "running_mean")
    cc.assert_close(fused[2], 1 / np.sqrt(x64.var(axis=axes) + 1e-5), 1e-5, "invstd")
    sum_dy, _ = be.backward_reduce(dview, view, mean)
    cc.assert_close(sum_dy, dview.data.astype(np.float64).sum(axis=axes), 1e-5, "sum_dy")
    second = be.double_backward_reduce(dview, view, view.match(2 * dy, "ddx"), mean)
    cc.assert_close(second[2], 2 * dview.data.astype(np.float64).sum(axis=axes), 1e-5, "sum_ddx")


# -- through the functional API and the layers ------------------------------------------------
@pytest.mark.parametrize("shape,channel_axis", [((4, 3, 5, 5), 1), ((6, 5, 3), -1), ((8, 4), 1)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_sim_matches_numpy(shape, channel_axis, training):
    x, dy = cc.make_inputs(shape, np.float64, seed=8)
    c = shape[channel_axis]
    w, b = np.linspace(0.5, 2, c), np.linspace(-1, 1, c)
    results = {}
    for backend in ("numpy", "sim"):
        rm, rv = np.linspace(-0.5, 0.5, c), np.linspace(1, 2, c)
        y, saved = cbn.batch_norm(
            x,
            w,
            b,
            rm,
            rv,
            training=training,
            momentum=0.3,
            channel_axis=channel_axis,
            backend=backend,
        )
        results[backend] = (y, *cbn.batch_norm_backward(dy, saved), rm, rv)
    for a, b_ in zip(results["numpy"], results["sim"], strict=True):
        np.testing.assert_allclose(b_, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("running_dtype", [np.float32, np.float64])
def test_non_finite_batch_leaves_running_stats_untouched(running_dtype):
    """float32 running stats take the fused finalize path, float64 ones the fallback."""
    x = np.random.default_rng(9).normal(size=(4, 3, 5)).astype(np.float32)
    x[1, 2, 3] = np.inf
    rm, rv = np.zeros(3, running_dtype), np.ones(3, running_dtype)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2"):
        cbn.batch_norm(x, None, None, rm, rv, backend="sim")
    assert (rm == 0).all() and (rv == 1).all()
    x[1, 2, 3] = 0.0
    cbn.batch_norm(x, None, None, rm, rv, backend="sim")
    np.testing.assert_allclose(rm, 0.1 * x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("shape,channel_axis", [((4, 3, 50), 1), ((300, 40), -1)], ids=str)
def test_fused_running_update_is_per_channel_and_all_or_nothing(shape, channel_axis, schedule):
    """Each channel's finalizing block updates its running statistics; a non-finite channel
    anywhere makes the last block restore every channel, with split tiles and either order."""
    be = sim(schedule, SPLIT)
    x = np.random.default_rng(11).normal(2.0, 3.0, shape).astype(np.float32)
    view = canonical(x, channel_axis)
    channels = view.num_channels
    rm0 = np.linspace(-1.0, 1.0, channels).astype(np.float32)
    rv0 = np.linspace(0.5, 2.0, channels).astype(np.float32)
    rm, rv = rm0.copy(), rv0.copy()
    be.train_statistics(view, None, None, rm, rv, 0.25, 1e-5)
    x64 = view.data.astype(np.float64)
    axes = (0, 2) if x64.ndim == 3 else (0,)
    count = view.count
    expect_rm = 0.75 * rm0.astype(np.float64) + 0.25 * x64.mean(axis=axes)
    expect_rv = 0.75 * rv0.astype(np.float64) + 0.25 * x64.var(axis=axes) * count / (count - 1)
    cc.assert_close(rm, expect_rm, 1e-5, "running_mean")
    cc.assert_close(rv, expect_rv, 1e-5, "running_var")

    bad = x.copy()
    bad.reshape(-1)[-1] = np.nan  # the last channel, in the last block of its channel
    rm_after, rv_after = rm.copy(), rv.copy()
    mean, *_ = be.train_statistics(canonical(bad, channel_axis), None, None, rm, rv, 0.25, 1e-5)
    assert np.isnan(mean).sum() == 1
    assert rm.tobytes() == rm_after.tobytes() and rv.tobytes() == rv_after.tobytes()


def test_layer_step_on_sim_matches_numpy():
    rng = np.random.default_rng(10)
    x = rng.normal(1, 2, (4, 3, 6, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    layers = {b: cbn.BatchNorm2d(3, momentum=None, backend=b) for b in ("numpy", "sim")}
    outputs = {}
    for backend, bn in layers.items():
        ys = [bn(x + k) for k in range(2)]
        outputs[backend] = (
            *ys,
            bn.backward(dy),
            bn.grads["weight"],
            bn.grads["bias"],
            bn.running_mean,
            bn.running_var,
        )
        assert bn.num_batches_tracked == 2
    for a, b in zip(outputs["numpy"], outputs["sim"], strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "dy_dtype", [d for d in cc.DTYPES if d.name in ("float32", "bfloat16")], ids=lambda d: d.name
)
def test_gradient_of_float16_input_with_another_dy_dtype(dy_dtype):
    """x and dy meet in float32; dx comes back in dy's dtype."""
    x, _ = cc.make_inputs((4, 3, 7), np.float16, seed=11)
    dy = np.random.default_rng(12).normal(size=x.shape).astype(dy_dtype)
    view = canonical(x, 1)
    be = sim()
    mean, var = be.batch_stats(view)
    sums = be.backward_reduce(view.match(dy, "dy"), view, mean)
    invstd = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    dx = be.backward_apply(
        view.match(dy, "dy"), view, mean, invstd, np.ones(3, np.float32), *sums, view.count
    )
    assert dx.dtype == dy_dtype
    from reference import backward

    cc.assert_close(dx, backward(x, dy)[0], 4 * cc.OUTPUT_TOL[dy_dtype.name], "dx")


def test_empty_batch():
    be = sim()
    view = canonical(np.zeros((0, 3, 4), np.float32), 1)
    mean, var = be.batch_stats(view)
    assert mean.shape == (3,) and (mean == 0).all() and (var == 0).all()
    assert be.apply(view, np.ones(3, np.float32), np.zeros(3, np.float32)).shape == (0, 3, 4)
    with pytest.raises(ValueError, match="non-empty batch"):
        be.train_statistics(view, None, None, None, None, 0.1, 1e-5)
