"""Fused activation and residual: `batch_norm(..., activation="relu", residual=z)` computes
`relu(bn(x) + z)`; checked against PyTorch's `relu(F.batch_norm(x) + z)` and its gradients,
against finite differences away from the ReLU's kink, and on both NumPy paths."""

from __future__ import annotations

import numpy as np
import pytest

import cupy_bn as cbn
from cupy_bn.backends import has_fused_activation
from cupy_bn.backends import numpy_direct as direct
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.dtypes import SUPPORTED
from cupy_bn.functional import batch_norm, batch_norm_backward
from cupy_bn.layout import canonical
from tests.reference import numeric_gradient
from tests.torch_reference import (
    DTYPES,
    LAYOUTS,
    MOMENTUM,
    assert_close,
    case,
    from_channels_first,
    to_channels_first,
    torch,
)

F = torch.nn.functional
FORMS = [("relu", True), ("relu", False), (None, True)]  # (activation, with residual)


def torch_fused(c, z, activation, training):
    """PyTorch's `act(F.batch_norm(x) + z)`, its gradients and running statistics."""
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (c.x, c.weight, c.bias))
    zt = None if z is None else torch.tensor(z, requires_grad=True)
    rm, rv = (torch.tensor(a) for a in c.running())
    y = F.batch_norm(to_channels_first(x, c.channel_axis), rm, rv, w, b, training, MOMENTUM)
    y = from_channels_first(y, c.channel_axis)
    if zt is not None:
        y = y + zt
    if activation == "relu":
        y = F.relu(y)
    inputs = (x, w, b) if zt is None else (x, w, b, zt)
    grads = torch.autograd.grad(y, inputs, torch.tensor(c.dy))
    return y.detach().numpy(), [g.numpy() for g in grads], rm.numpy(), rv.numpy()


def run_fused(c, z, activation, training, backend="numpy"):
    rm, rv = c.running()
    y, saved = batch_norm(
        c.x, c.weight, c.bias, rm, rv, training, MOMENTUM, 1e-5, c.channel_axis, backend,
        activation=activation, residual=z,
    )  # fmt: skip
    return y, batch_norm_backward(c.dy, saved), rm, rv


def residual_for(c, seed=1):
    return np.random.default_rng(seed).standard_normal(c.x.shape).astype(c.x.dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_pytorch(dtype, layout, training, form):
    activation, with_residual = form
    c = case(dtype, *layout)
    z = residual_for(c) if with_residual else None
    y, grads, rm, rv = run_fused(c, z, activation, training)
    ty, tgrads, trm, trv = torch_fused(c, z, activation, training)
    assert len(grads) == len(tgrads)
    assert_close(y, ty, "y")
    for name, got, want in zip(
        ("dx", "dweight", "dbias", "dresidual"), grads, tgrads, strict=False
    ):
        assert_close(got, want, name)
    assert_close(rm, trm, "running_mean")
    assert_close(rv, trv, "running_var")


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_blocked_path_matches_pytorch(channel_axis):
    """A tensor above the direct path's thresholds takes the blocked one."""
    shape = (4, 16, 96, 96) if channel_axis == 1 else (4, 96, 96, 16)
    c = case(np.float32, channel_axis, shape)
    assert not direct.is_small(canonical(c.x, channel_axis))
    z = residual_for(c)
    y, grads, *_ = run_fused(c, z, "relu", True)
    ty, tgrads, *_ = torch_fused(c, z, "relu", True)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, tgrads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("size", ["direct", "blocked"])
@pytest.mark.parametrize("dtype", [d for d in SUPPORTED if d.itemsize == 2])
def test_16_bit_output_is_rounded_once(dtype, size):
    """`y` is `relu(x * scale + shift + z)` in float32, rounded once to the 16-bit dtype."""
    shape = (4, 8, 6, 5) if size == "direct" else (4, 8, 160, 160)
    c = case(np.float32, 1, shape)
    x, z = c.x.astype(dtype), residual_for(c).astype(dtype)
    y, saved = batch_norm(x, c.weight, c.bias, activation="relu", residual=z)
    scale = (c.weight * saved.invstd).reshape(1, -1, 1, 1)
    shift = (c.bias - saved.mean * scale.reshape(-1)).reshape(1, -1, 1, 1)
    pre = x.astype(np.float32) * scale + shift + z.astype(np.float32)
    expected = np.maximum(pre, 0).astype(dtype)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.astype(np.float32), expected.astype(np.float32))
    dy = c.dy.astype(dtype)
    dx, dw, db, dz = batch_norm_backward(dy, saved)
    np.testing.assert_array_equal(dz, np.where(y > 0, dy, 0).astype(dtype))
    assert dx.dtype == dtype and dz.dtype == dtype


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_gradients_match_finite_differences(channel_axis, training):
    shape = (4, 3, 5) if channel_axis == 1 else (4, 5, 3)
    c = case(np.float64, channel_axis, shape, seed=3)
    rng = np.random.default_rng(4)
    z = rng.standard_normal(shape)
    y0, _ = batch_norm(c.x, c.weight, c.bias, *c.running(), training, channel_axis=channel_axis)
    pre = y0 + z
    z += np.where(np.abs(pre) < 0.2, np.sign(pre) * 0.3 + (pre == 0) * 0.3, 0.0)
    assert np.abs(y0 + z).min() > 0.05  # away from the kink: finite differences are exact
    assert (y0 + z < 0).any() and (y0 + z > 0).any()

    def f(x=c.x, w=c.weight, b=c.bias, r=z):
        out, _ = batch_norm(
            x, w, b, *c.running(), training, channel_axis=channel_axis,
            activation="relu", residual=r,
        )  # fmt: skip
        return out

    _, saved = batch_norm(
        c.x, c.weight, c.bias, *c.running(), training, channel_axis=channel_axis,
        activation="relu", residual=z,
    )  # fmt: skip
    dx, dw, db, dz = batch_norm_backward(c.dy, saved)
    tol = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, numeric_gradient(lambda a: f(x=a), c.x, c.dy), **tol)
    np.testing.assert_allclose(dz, numeric_gradient(lambda a: f(r=a), z, c.dy), **tol)
    np.testing.assert_allclose(dw, numeric_gradient(lambda a: f(w=a), c.weight, c.dy), **tol)
    np.testing.assert_allclose(db, numeric_gradient(lambda a: f(b=a), c.bias, c.dy), **tol)


def test_relu_gradient_is_zero_where_the_output_is_not_positive():
    """As PyTorch's ReLU: zero at the kink, and a NaN in `dy` there does not pass through."""
    x = np.array([[-1.0, 0.0], [1.0, 0.0]])
    y, saved = batch_norm(x, training=True, activation="relu", residual=np.zeros_like(x))
    dy = np.array([[np.nan, 2.0], [3.0, np.nan]])
    _, _, _, dz = batch_norm_backward(dy, saved)
    np.testing.assert_array_equal(dz, np.where(y > 0, dy, 0.0))
    assert not np.isnan(dz[0, 0])


def test_layer_with_activation_and_residual_matches_pytorch():
    c = case(np.float32, 1, (6, 3, 4, 5))
    z = residual_for(c)
    bn = cbn.BatchNorm2d(3, activation="relu", momentum=MOMENTUM)
    bn.params["weight"][...] = c.weight
    bn.params["bias"][...] = c.bias
    tbn = torch.nn.BatchNorm2d(3, momentum=MOMENTUM)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(c.weight))
        tbn.bias.copy_(torch.tensor(c.bias))
    xt, zt = torch.tensor(c.x, requires_grad=True), torch.tensor(z, requires_grad=True)
    ty = F.relu(tbn(xt) + zt)
    ty.backward(torch.tensor(c.dy))
    y = bn(c.x, residual=z)
    dx, dz = bn.backward(c.dy)
    for got, want in (
        (y, ty.detach()),
        (dx, xt.grad),
        (dz, zt.grad),
        (bn.grads["weight"], tbn.weight.grad),
        (bn.grads["bias"], tbn.bias.grad),
        (bn.running_mean, tbn.running_mean),
        (bn.running_var, tbn.running_var),
    ):
        assert_close(got, want.numpy())
    # without a residual the backward returns dx alone
    y = bn(c.x)
    dx = bn.backward(c.dy)
    assert isinstance(dx, np.ndarray) and dx.shape == c.x.shape
    np.testing.assert_array_equal(y, np.maximum(y, 0))
    assert "activation='relu'" in repr(bn)
    bn.eval()
    y_eval = bn(c.x, residual=z)
    assert (y_eval >= 0).all()


@pytest.mark.parametrize(
    ("activation", "error", "message"),
    [
        ("gelu", ValueError, "activation must be None or 'relu', got 'gelu'"),
        (1, TypeError, "activation must be None or 'relu', got int"),
    ],
)
def test_bad_activation_is_refused(activation, error, message):
    x = np.ones((4, 3))
    with pytest.raises(error, match=message):
        batch_norm(x, activation=activation)
    with pytest.raises(error, match=message):
        cbn.BatchNorm1d(3, activation=activation)


@pytest.mark.parametrize(
    ("residual", "error", "message"),
    [
        (np.ones((4, 2)), ValueError, r"residual must have the input's shape \(4, 3\)"),
        ([[1.0] * 3] * 4, TypeError, "residual must be a NumPy or CuPy array, got list"),
        (np.ones((4, 3), np.int64), TypeError, "residual must have a floating dtype"),
    ],
)
def test_bad_residual_is_refused_before_any_state_changes(residual, error, message):
    x = np.random.default_rng(0).standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(error, match=message):
        batch_norm(x, None, None, rm, rv, True, activation="relu", residual=residual)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    bn = cbn.BatchNorm1d(3, dtype=np.float64)
    with pytest.raises(error, match=message):
        bn(x, residual=residual)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0.0)


def test_residual_of_another_float_dtype_is_converted_to_xs():
    c = case(np.float64, 1, (6, 3, 4, 5))
    z = residual_for(c)
    y64, saved = batch_norm(c.x, activation="relu", residual=z)
    y32, saved32 = batch_norm(c.x, activation="relu", residual=z.astype(np.float32))
    assert y32.dtype == np.float64
    np.testing.assert_allclose(y32, y64, atol=1e-6)
    assert batch_norm_backward(c.dy, saved32)[3].dtype == np.float32


@pytest.mark.parametrize("form", FORMS)
def test_double_backward_is_refused(form):
    activation, with_residual = form
    c = case(np.float64, 1, (6, 3, 4, 5))
    z = residual_for(c) if with_residual else None
    _, saved = batch_norm(c.x, c.weight, c.bias, activation=activation, residual=z)
    with pytest.raises(ValueError, match="double backward of a fused activation is not supported"):
        cbn.batch_norm_double_backward(np.ones_like(c.x), None, None, c.dy, saved)


PRIMITIVES = (
    "batch_stats",
    "apply",
    "backward_reduce",
    "backward_apply",
    "update_running",
    "double_backward_reduce",
    "double_backward_apply",
)


class PrimitivesOnly:
    """The NumPy backend's seven primitives, without its optional capabilities."""

    name = "primitives-only"
    xp = np

    def __init__(self):
        inner = NumpyBackend()
        for primitive in PRIMITIVES:
            setattr(self, primitive, getattr(inner, primitive))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_backend_without_the_capability_composes_the_primitives(channel_axis, form):
    assert has_fused_activation(NumpyBackend())
    assert not has_fused_activation(PrimitivesOnly())
    activation, with_residual = form
    c = case(np.float64, channel_axis, (6, 3, 4, 5) if channel_axis == 1 else (6, 4, 5, 3))
    z = residual_for(c) if with_residual else None
    expected = run_fused(c, z, activation, True)
    got = run_fused(c, z, activation, True, PrimitivesOnly())
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[1], expected[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sync_batch_norm_with_activation_and_residual_matches_the_global_batch():
    """Two fake processes, half the batch each: their outputs and input gradients are the
    slices of one layer's on the whole batch, their weight gradients its shares."""
    from fake_comm import run_group

    from cupy_bn.distributed import SyncBatchNorm

    c = case(np.float64, 1, (6, 3, 4, 5))
    z = residual_for(c)

    def step(comm):
        part = slice(3 * comm.rank, 3 * comm.rank + 3)
        bn = SyncBatchNorm(3, dtype=np.float64, comm=comm, activation="relu")
        y = bn(c.x[part], residual=z[part])
        dx, dz = bn.backward(c.dy[part])
        return y, dx, dz, bn.grads["weight"].copy(), bn.running_var.copy()

    parts = run_group(2, step)
    bn = cbn.BatchNorm2d(3, dtype=np.float64, activation="relu")
    y = bn(c.x, residual=z)
    dx, dz = bn.backward(c.dy)
    for i, got in enumerate((y, dx, dz)):
        np.testing.assert_allclose(np.concatenate([p[i] for p in parts]), got, atol=1e-12)
    np.testing.assert_allclose(parts[0][3] + parts[1][3], bn.grads["weight"], atol=1e-12)
    np.testing.assert_allclose(parts[0][4], bn.running_var, atol=1e-12)
    np.testing.assert_allclose(parts[1][4], bn.running_var, atol=1e-12)


def test_channels_last_memory_and_a_residual_in_another_memory_order():
    """x in NHWC memory seen as NCHW (channel_axis=1), the residual a plain NCHW array: the
    output keeps x's memory order and the gradients have x's shape."""
    c = case(np.float64, 1, (6, 3, 4, 5))
    z = residual_for(c)
    x_cl = np.ascontiguousarray(c.x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    expected, saved = batch_norm(c.x, c.weight, c.bias, activation="relu", residual=z)
    y, saved_cl = batch_norm(x_cl, c.weight, c.bias, activation="relu", residual=z)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_allclose(y, expected, atol=1e-12)
    for got, want in zip(
        batch_norm_backward(c.dy, saved_cl), batch_norm_backward(c.dy, saved), strict=True
    ):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_sync_forms_keep_the_activation():
    """`convert_sync_batchnorm` keeps a layer's activation; `sync_batch_norm` takes the fused
    arguments (one fake process: plain batch norm's results)."""
    from fake_comm import run_group

    from cupy_bn.distributed import convert_sync_batchnorm, sync_batch_norm

    c = case(np.float64, 1, (6, 3, 4, 5))
    z = residual_for(c)

    def step(comm):
        (layer,) = convert_sync_batchnorm([cbn.BatchNorm2d(3, activation="relu")], comm)
        y, saved = sync_batch_norm(c.x, activation="relu", residual=z, comm=comm)
        return layer.activation, y, batch_norm_backward(c.dy, saved)

    ((activation, y, grads),) = run_group(1, step)
    expected, saved = batch_norm(c.x, activation="relu", residual=z)
    assert activation == "relu"
    np.testing.assert_allclose(y, expected, atol=1e-12)
    expected_grads = batch_norm_backward(c.dy, saved)
    assert [g is None for g in grads] == [False, True, True, False]
    for got, want in zip(grads, expected_grads, strict=True):
        if want is not None:
            np.testing.assert_allclose(got, want, atol=1e-12)
