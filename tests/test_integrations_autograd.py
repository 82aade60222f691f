"""cupy_bn.integrations.autograd against PyTorch: forward, gradients, running statistics."""

from __future__ import annotations

import numpy as np
import pytest

autograd = pytest.importorskip("autograd")
anp = pytest.importorskip("autograd.numpy")

from torch_reference import (  # noqa: E402
    DTYPES,
    LAYOUTS,
    MOMENTUM,
    assert_close,
    assert_matches,
    case,
    gradient_penalty,
    plain_batch_norm,
    torch,
    torch_batch_norm,
    torch_first_order,
)

from cupy_bn.integrations.autograd import batch_norm  # noqa: E402


def first_order(c, training: bool) -> dict[str, np.ndarray]:
    running_mean, running_var = c.running()

    def loss(x, weight, bias):
        y = batch_norm(
            x, weight, bias, running_mean, running_var, training, MOMENTUM, 1e-5, c.channel_axis
        )
        outputs["y"] = y._value if isinstance(y, autograd.extend.Box) else y
        return anp.sum(y * c.dy)

    outputs: dict[str, np.ndarray] = {}
    dx, dweight, dbias = autograd.grad(loss, (0, 1, 2))(c.x, c.weight, c.bias)
    inference = batch_norm(
        c.x, c.weight, c.bias, running_mean, running_var, False, channel_axis=c.channel_axis
    )
    return {
        "y": outputs["y"],
        "dx": dx,
        "dweight": dweight,
        "dbias": dbias,
        "running_mean": running_mean,
        "running_var": running_var,
        "inference": inference,
    }


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("channel_axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_first_order_matches_pytorch(dtype, channel_axis, shape, training):
    c = case(dtype, channel_axis, shape)
    assert_matches(first_order(c, training), torch_first_order(c, training))


def test_without_weight_and_bias_and_running_statistics():
    c = case(np.float64, 1, (5, 3, 4))

    def loss(x):
        return anp.sum(batch_norm(x) * c.dy)

    dx = autograd.grad(loss)(c.x)
    tx = torch.tensor(c.x, requires_grad=True)
    torch.nn.functional.batch_norm(tx, None, None, training=True).backward(torch.tensor(c.dy))
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_running_statistics_must_not_be_traced():
    c = case(np.float64, 1, (5, 3, 4))

    def loss(running_mean):
        return anp.sum(batch_norm(c.x, None, None, running_mean, c.running_var.copy()))

    with pytest.raises(TypeError, match="running_mean must be a NumPy array"):
        autograd.grad(loss)(c.running_mean.copy())


def test_errors_are_the_cores():
    c = case(np.float64, 1, (5, 3, 4))
    with pytest.raises(ValueError, match="momentum must be a number in"):
        batch_norm(c.x, momentum=2.0)
    with pytest.raises(ValueError, match="weight must have shape \\(3,\\)"):
        batch_norm(c.x, np.ones(4))


# -- second and third derivatives ----------------------------------------------------------
def gradient_penalty_autograd(c, training: bool):
    """Gradients in (x, weight, bias) of `|d sum(y * dy) / d(x, weight)|^2`."""
    running_mean, running_var = c.running()

    def first(x, weight, bias):
        y = batch_norm(
            x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, c.channel_axis
        )
        return anp.sum(y * c.dy)

    def penalty(x, weight, bias):
        gx, gweight = autograd.grad(first, (0, 1))(x, weight, bias)
        return anp.sum(gx**2) + anp.sum(gweight**2)

    return autograd.grad(penalty, (0, 1, 2))(c.x, c.weight, c.bias)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("channel_axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_second_order_matches_pytorchs_double_backward(dtype, channel_axis, shape, training):
    c = case(dtype, channel_axis, shape)
    ours = gradient_penalty_autograd(c, training)
    theirs = gradient_penalty(torch_batch_norm, c, training)
    for name, a, b in zip(("x", "weight", "bias"), ours, theirs, strict=True):
        assert_close(a, b, f"d penalty / d {name}")


@pytest.mark.parametrize("channel_axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
def test_third_order_matches_torch_arithmetic(channel_axis, shape):
    """d/dx of |H v|^2 where H v = d/dx <d sum(y^3)/dx, v>: third derivatives of batch norm."""
    import torch

    c = case(np.float64, channel_axis, shape)
    v = np.random.default_rng(5).standard_normal(c.x.shape)

    def objective(x, weight, bias, bn, grad, total):
        def first(x):
            return total(bn(x, weight, bias) ** 3)

        def hessian_vector(x):
            return total(grad(first, x) * v)

        return total(grad(hessian_vector, x) ** 2)

    def bn_autograd(x, weight, bias):
        return batch_norm(x, weight, bias, channel_axis=c.channel_axis)

    def ag_grad(f, x):
        return autograd.grad(f)(x)

    third = autograd.grad(
        lambda x, weight: objective(x, weight, c.bias, bn_autograd, ag_grad, anp.sum), (0, 1)
    )(c.x, c.weight)

    def t_grad(f, x):
        return torch.autograd.grad(f(x), x, create_graph=True)[0]

    x, w = torch.tensor(c.x, requires_grad=True), torch.tensor(c.weight, requires_grad=True)
    v = torch.tensor(v)
    reference = torch.autograd.grad(
        objective(
            x,
            w,
            torch.tensor(c.bias),
            lambda x, w, b: plain_batch_norm(x, w, b, c.channel_axis),
            t_grad,
            torch.sum,
        ),
        (x, w),
    )
    for name, a, b in zip(("x", "weight"), third, reference, strict=True):
        assert_close(a, b.numpy(), f"third order, {name}")


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "neither"])
def test_double_backward_formula_matches_the_core(training, affine):
    from cupy_bn.double_backward import batch_norm_double_backward
    from cupy_bn.functional import batch_norm as core_batch_norm
    from cupy_bn.integrations.autograd import double_backward_formula

    c = case(np.float64, -1, (6, 4, 5, 3))
    weight = c.weight if affine in ("both", "weight") else None
    bias = c.bias if affine in ("both", "bias") else None
    rng = np.random.default_rng(4)
    ddx = rng.standard_normal(c.x.shape)
    ddweight = None if weight is None else rng.standard_normal(3)
    ddbias = None if bias is None else rng.standard_normal(3)
    _, saved = core_batch_norm(c.x, weight, bias, *c.running(), training, channel_axis=-1)
    core = batch_norm_double_backward(ddx, ddweight, ddbias, c.dy, saved)
    formula = double_backward_formula(ddx, ddweight, ddbias, c.dy, c.x, weight, saved, 1e-5)
    if weight is None:
        formula = (formula[0], None, formula[1])
    for name, a, b in zip(("gx", "gweight", "gdy"), formula, core, strict=True):
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, name)


def test_running_statistics_update_once_per_forward_at_any_order():
    c = case(np.float64, 1, (5, 3, 4))
    running_mean, running_var = c.running()

    def loss(x):
        return anp.sum(batch_norm(x, c.weight, c.bias, running_mean, running_var) ** 3)

    autograd.grad(lambda x: anp.sum(autograd.grad(loss)(x) ** 2))(c.x)
    once_mean, once_var = c.running()
    batch_norm(c.x, c.weight, c.bias, once_mean, once_var)
    np.testing.assert_array_equal(running_mean, once_mean)
    np.testing.assert_array_equal(running_var, once_var)
