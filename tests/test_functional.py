"""batch_norm / batch_norm_backward against float64 formulas and finite differences."""

import numpy as np
import pytest
import reference as ref

import cupy_bn as cbn

SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (3, 3, 4, 5), 5: (2, 3, 3, 2, 4)}
LAYOUTS = [1, -1]


def make(shape, channel_axis, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    c = shape[channel_axis % len(shape)]
    w = rng.normal(1.0, 0.5, c).astype(dtype)
    b = rng.normal(0.0, 0.5, c).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_training_forward_and_backward_match_closed_form(rank, channel_axis, affine):
    x, w, b, dy = make(SHAPES[rank], channel_axis)
    w, b = (w, b) if affine else (None, None)
    y, saved = cbn.batch_norm(x, w, b, training=True, channel_axis=channel_axis)
    np.testing.assert_allclose(y, ref.forward(x, w, b, channel_axis=channel_axis), atol=1e-12)
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    rdx, rdw, rdb = ref.backward(x, dy, w, channel_axis=channel_axis)
    np.testing.assert_allclose(dx, rdx, atol=1e-11)
    if affine:
        np.testing.assert_allclose(dw, rdw, atol=1e-11)
        np.testing.assert_allclose(db, rdb, atol=1e-11)
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(rank, channel_axis, training):
    x, w, b, dy = make(SHAPES[rank], channel_axis, seed=rank)
    c = w.size
    rm, rv = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)

    def run(x_, w_, b_):
        y, _ = cbn.batch_norm(
            x_, w_, b_, rm.copy(), rv.copy(), training=training, channel_axis=channel_axis
        )
        return y

    _, saved = cbn.batch_norm(
        x, w, b, rm.copy(), rv.copy(), training=training, channel_axis=channel_axis
    )
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    np.testing.assert_allclose(
        dx, ref.numeric_gradient(lambda v: run(v, w, b), x, dy), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        dw, ref.numeric_gradient(lambda v: run(x, v, b), w, dy), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        db, ref.numeric_gradient(lambda v: run(x, w, v), b, dy), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("channel_axis", LAYOUTS)
def test_eval_mode_uses_running_statistics(channel_axis):
    x, w, b, dy = make((3, 3, 4, 3), channel_axis)
    rm, rv = np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 1.0])
    y, saved = cbn.batch_norm(x, w, b, rm, rv, training=False, eps=1e-3, channel_axis=channel_axis)
    np.testing.assert_allclose(y, ref.forward(x, w, b, 1e-3, channel_axis, rm, rv), atol=1e-12)
    dx, _, _ = cbn.batch_norm_backward(dy, saved)
    cs = ref.channel_shape(4, channel_axis, 3)
    np.testing.assert_allclose(dx, dy * (w / np.sqrt(rv + 1e-3)).reshape(cs), atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0])
def test_running_statistics_follow_pytorch_convention(momentum):
    rng = np.random.default_rng(3)
    rm, rv = np.zeros(4), np.ones(4)
    expect_m, expect_v = rm.copy(), rv.copy()
    for step in range(4):
        x = rng.normal(step, 1 + step, (5, 4, 3))
        cbn.batch_norm(x, None, None, rm, rv, training=True, momentum=momentum)
        axes = (0, 2)
        expect_m = (1 - momentum) * expect_m + momentum * x.mean(axis=axes)
        expect_v = (1 - momentum) * expect_v + momentum * x.var(axis=axes, ddof=1)
        np.testing.assert_allclose(rm, expect_m, rtol=1e-12)
        np.testing.assert_allclose(rv, expect_v, rtol=1e-12)


def test_output_keeps_dtype_shape_and_channels_last_memory_order():
    rng = np.random.default_rng(0)
    nhwc = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
    x = nhwc.transpose(0, 3, 1, 2)  # NCHW shape, channels-last memory (PyTorch channels_last)
    y, saved = cbn.batch_norm(x, training=True, channel_axis=1)
    assert saved.view.layout == "MC" and np.shares_memory(saved.view.data, nhwc)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_allclose(y, ref.forward(x), atol=1e-5)
    dx, _, _ = cbn.batch_norm_backward(np.ones_like(x), saved)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, 0, atol=1e-5)  # a constant dy has no gradient through BN


def test_non_contiguous_input_is_handled():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 3, 10, 10))
    x = base[::2, :, ::3, 1:]
    y, _ = cbn.batch_norm(x, channel_axis=1)
    np.testing.assert_allclose(y, ref.forward(x), atol=1e-12)


@pytest.mark.parametrize(
    "shape,channel_axis",
    [((64, 3, 300, 300), 1), ((70000, 3), -1), ((2, 3, 70001), 1), ((9, 140000), -1)],
)
def test_shapes_that_span_several_tiles(shape, channel_axis):
    rng = np.random.default_rng(2)
    x = rng.normal(5, 2, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(1, 0.1, shape[channel_axis]).astype(np.float32)
    y, saved = cbn.batch_norm(x, w, None, channel_axis=channel_axis)
    np.testing.assert_allclose(y, ref.forward(x, w, channel_axis=channel_axis), atol=2e-4)
    dx, dw, _ = cbn.batch_norm_backward(dy, saved)
    rdx, rdw, _ = ref.backward(x, dy, w, channel_axis=channel_axis)
    np.testing.assert_allclose(dx, rdx, atol=1e-4 * np.abs(rdx).max())
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x, w, b, dy = make(SHAPES[4], 1, dtype=dtype)
    y, saved = cbn.batch_norm(x, w, b)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(y, ref.forward(x, w, b), atol=tol * 5)
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    assert dx.dtype == dtype and dw.dtype == dtype
    rdx, _, _ = ref.backward(x, dy, w)
    np.testing.assert_allclose(dx, rdx, atol=tol * 5)


def test_bfloat16_when_available():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, w, b, dy = make(SHAPES[4], 1)
    xb = x.astype(ml_dtypes.bfloat16)
    y, saved = cbn.batch_norm(xb, w.astype(np.float32), b.astype(np.float32))
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(
        y.astype(np.float64), ref.forward(xb.astype(np.float64), w, b), atol=0.05
    )
    dx, _, _ = cbn.batch_norm_backward(dy.astype(ml_dtypes.bfloat16), saved)
    assert dx.dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_restore_saved_gives_the_forwards_backward(training, dtype):
    from cupy_bn.functional import restore_saved

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 2, 5)).astype(dtype)
    x = x.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)  # channels-last memory
    weight, bias = rng.uniform(0.5, 1.5, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    running = np.zeros(3, dtype), np.ones(3, dtype)
    _, saved = cbn.batch_norm(x, weight, bias, *running, training=training)
    dy = rng.standard_normal(x.shape).astype(dtype)
    restored = restore_saved(
        x, saved.mean, saved.invstd, weight, bias.dtype, batch_statistics=training
    )
    for got, expected in zip(
        cbn.batch_norm_backward(dy, restored), cbn.batch_norm_backward(dy, saved), strict=True
    ):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_restore_saved_checks_the_statistics():
    from cupy_bn.functional import restore_saved

    x = np.zeros((4, 3), np.float16)
    stats = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="mean must have dtype float32, the accumulation dtype"):
        restore_saved(x, stats.astype(np.float16), stats)
    with pytest.raises(ValueError, match="invstd must have shape \\(3,\\)"):
        restore_saved(x, stats, np.zeros(4, np.float32))
