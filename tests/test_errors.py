"""Bad input raises a clear error naming the argument, before any state changes."""

import numpy as np
import pytest

import cupy_bn as cbn


def layer_and_state(**kw):
    bn = cbn.BatchNorm2d(3, **kw)
    bn(np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32))
    return bn, bn.state_dict()


def assert_state_unchanged(bn, state):
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 2.5}, "num_features"),
        ({"num_features": True}, "num_features"),
        ({"num_features": 3, "eps": 0}, "eps"),
        ({"num_features": 3, "eps": -1e-5}, "eps"),
        ({"num_features": 3, "eps": float("nan")}, "eps"),
        ({"num_features": 3, "momentum": 1.5}, "momentum"),
        ({"num_features": 3, "momentum": -0.1}, "momentum"),
        ({"num_features": 3, "channel_axis": 4}, "channel_axis"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        cbn.BatchNorm2d(**kw)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint8])
def test_non_float_dtypes_are_rejected(dtype):
    with pytest.raises(TypeError, match="dtype"):
        cbn.BatchNorm1d(3, dtype=dtype)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        cbn.batch_norm(np.ones((4, 3), dtype))
    bn, state = layer_and_state()
    with pytest.raises(TypeError, match="floating dtype"):
        bn(np.ones((2, 3, 4, 4), dtype))
    assert_state_unchanged(bn, state)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 3, 4), "rank 4"),
        ((2, 3, 4, 4, 4), "rank 4"),
        ((2, 5, 4, 4), "5 channels"),
    ],
)
def test_wrong_rank_or_channels(shape, match):
    bn, state = layer_and_state()
    with pytest.raises(ValueError, match=match):
        bn(np.ones(shape, np.float32))
    assert_state_unchanged(bn, state)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (0, 3, 4, 4)])
def test_training_batch_with_one_value_per_channel_or_empty(shape):
    bn, state = layer_and_state()
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(np.ones(shape, np.float32))
    assert_state_unchanged(bn, state)
    bn.eval()
    assert bn(np.ones((1, 3, 1, 1), np.float32)).shape == (1, 3, 1, 1)  # fine for inference


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_statistics_name_the_channel_and_spare_running_stats(bad):
    bn, state = layer_and_state()
    x = np.ones((2, 3, 4, 4), np.float32)
    x[1, 2, 3, 0] = bad
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2\b"):
        bn(x)
    assert_state_unchanged(bn, state)


def test_functional_argument_checks():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="momentum"):
        cbn.batch_norm(x, momentum=2.0)
    with pytest.raises(ValueError, match="momentum"):
        cbn.batch_norm(x, momentum=None)
    with pytest.raises(ValueError, match="eps"):
        cbn.batch_norm(x, eps=0.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        cbn.batch_norm(x, np.ones(4, np.float32))
    with pytest.raises(TypeError, match="bias must have a floating dtype"):
        cbn.batch_norm(x, None, np.ones(3, np.int64))
    with pytest.raises(ValueError, match="together"):
        cbn.batch_norm(x, running_mean=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="training=False needs"):
        cbn.batch_norm(x, training=False)
    with pytest.raises(ValueError, match="rank >= 2"):
        cbn.batch_norm(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="channel_axis"):
        cbn.batch_norm(x, channel_axis=2)
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        cbn.batch_norm([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="backend must be one of"):
        cbn.batch_norm(x, backend="opencl")
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="momentum"):
        cbn.batch_norm(x, None, None, rm, rv, momentum=1.1)
    np.testing.assert_array_equal(rm, 0)


def test_backward_checks():
    bn = cbn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        bn.backward(np.ones((4, 3), np.float32))
    bn(np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"dy must have the input's shape \(4, 3\)"):
        bn.backward(np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="dy must have a floating dtype"):
        bn.backward(np.ones((4, 3), np.int32))


def test_load_state_dict_is_all_or_nothing():
    bn, state = layer_and_state()
    bad = dict(state)
    bad["running_var"] = np.ones(4, np.float32)
    bad["weight"] = np.full(3, 5, np.float32)
    with pytest.raises(ValueError, match="running_var.*shape"):
        bn.load_state_dict(bad)
    assert_state_unchanged(bn, state)
    missing = {k: v for k, v in state.items() if k != "bias"}
    with pytest.raises(KeyError, match="bias"):
        bn.load_state_dict(missing)
    with pytest.raises(KeyError, match="extra"):
        bn.load_state_dict({**state, "extra": np.zeros(1)})
    bn.load_state_dict({**state, "extra": np.zeros(1)}, strict=False)
    with pytest.raises(TypeError, match="num_batches_tracked"):
        bn.load_state_dict({**state, "num_batches_tracked": np.array(1.5)})
    assert_state_unchanged(bn, state)


# -- one wording per error, wherever the check runs ---------------------------------------
class FakeCupyArray:
    """Looks like a CuPy array to the library's module checks (no GPU needed)."""

    __module__ = "cupy._core.core"

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)


@pytest.mark.parametrize(
    "make",
    [
        lambda: cbn.BatchNorm2d(3, channel_axis=4),
        lambda: cbn.batch_norm(np.ones((2, 3, 4, 4), np.float32), channel_axis=4),
    ],
)
def test_channel_axis_out_of_range_has_one_wording(make):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == "channel_axis must be in [-4, 4) for an input of rank 4, got 4"


def test_channel_axis_messages_name_every_accepted_rank_and_the_type():
    with pytest.raises(ValueError, match=r"in \[-3, 3\) for an input of rank 2 or 3, got -4$"):
        cbn.BatchNorm1d(3, channel_axis=-4)
    for make in (
        lambda: cbn.BatchNorm1d(3, channel_axis=1.0),
        lambda: cbn.batch_norm(np.ones((4, 3), np.float32), channel_axis=True),
    ):
        with pytest.raises(TypeError, match=r"^channel_axis must be an int, got (float|bool)$"):
            make()


def test_num_features_has_one_wording():
    from cupy_bn.distributed import SyncReducer

    class Solo:
        rank, size = 0, 1

        def allreduce_sum(self, buffer):
            return buffer

    messages = set()
    for make in (lambda: cbn.BatchNorm2d(0), lambda: SyncReducer(Solo(), 0)):
        with pytest.raises(ValueError) as info:
            make()
        messages.add(str(info.value))
    assert messages == {"num_features must be an int >= 1, got 0"}


def test_per_channel_vector_shape_has_one_wording():
    from cupy_bn.backends.cuda_backend import CudaBackend
    from cupy_bn.distributed import SyncReducer
    from cupy_bn.layout import canonical

    class Solo:
        rank, size = 0, 1

        def allreduce_sum(self, buffer):
            return buffer

    x = np.ones((4, 3), np.float32)
    four = np.ones(4, np.float32)
    expected = "{} must have shape (3,), one value per channel, got (4,)"
    checks = {
        "weight": lambda: cbn.batch_norm(x, four),
        "running_var": lambda: cbn.batch_norm(x, None, None, np.zeros(3, np.float32), four),
        "mean": lambda: SyncReducer(Solo(), 3).merge_stats(4, four, four),
        "sum_dy": lambda: SyncReducer(Solo(), 3).sum_grads(four, four),
        "scale": lambda: CudaBackend.for_simulator().apply(canonical(x, 1), four, four),
    }
    for name, call in checks.items():
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == expected.format(name)


def test_per_channel_vectors_must_be_arrays_of_the_module_of_x():
    pytest.importorskip("cupy", reason="telling a CuPy array's module imports cupy")
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"^weight must be a NumPy or CuPy array, got list$"):
        cbn.batch_norm(x, [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match=r"^bias must be a numpy array like x, got a cupy array$"):
        cbn.batch_norm(x, None, FakeCupyArray((3,)))


def test_an_array_of_the_other_library_names_the_way_out():
    pytest.importorskip("cupy", reason="telling a CuPy array's module imports cupy")
    bn = cbn.BatchNorm2d(3)
    with pytest.raises(TypeError) as info:
        bn(FakeCupyArray((2, 3, 4, 4)))
    assert str(info.value) == (
        "x must be a numpy array like the layer's state, got a cupy array; call .to(cupy) first"
    )
    with pytest.raises(TypeError) as info:
        cbn.get_backend("numpy", FakeCupyArray((2, 3)))
    assert str(info.value) == "x must be a numpy array for backend 'numpy', got a cupy array"


def test_too_few_values_per_channel_has_one_wording():
    from cupy_bn.backends.cuda_backend import CudaBackend

    with pytest.raises(ValueError) as info:
        cbn.batch_norm(np.ones((1, 3), np.float32))
    assert str(info.value) == (
        "a training batch needs more than one value per channel (input shape (1, 3)), got 1"
    )
    one = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        CudaBackend.for_simulator().update_running(one, one.copy(), one, one, 1, 0.1)
    assert str(info.value) == "a training batch needs more than one value per channel, got 1"
