"""cupy_bn.integrations.mygrad against PyTorch: forward, gradients, running statistics."""

from __future__ import annotations

import numpy as np
import pytest

mg = pytest.importorskip("mygrad")

from torch_reference import (  # noqa: E402
    DTYPES,
    LAYOUTS,
    MOMENTUM,
    assert_matches,
    case,
    torch_first_order,
)

from cupy_bn.integrations.mygrad import batch_norm  # noqa: E402


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("channel_axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_first_order_matches_pytorch(dtype, channel_axis, shape, training):
    c = case(dtype, channel_axis, shape)
    running_mean, running_var = c.running()
    x, weight, bias = mg.tensor(c.x), mg.tensor(c.weight), mg.tensor(c.bias)
    y = batch_norm(
        x, weight, bias, running_mean, running_var, training, MOMENTUM, 1e-5, c.channel_axis
    )
    assert isinstance(y, mg.Tensor)
    (y * c.dy).sum().backward()
    inference = batch_norm(
        c.x, c.weight, c.bias, running_mean, running_var, False, channel_axis=c.channel_axis
    )
    assert inference.constant  # arrays in, a constant out
    results = {
        "y": y.data,
        "dx": x.grad,
        "dweight": weight.grad,
        "dbias": bias.grad,
        "running_mean": running_mean,
        "running_var": running_var,
        "inference": inference.data,
    }
    assert_matches(results, torch_first_order(c, training))


def test_bias_without_weight_and_constant_inputs():
    c = case(np.float64, 1, (5, 3, 4))
    x, bias = mg.tensor(c.x), mg.tensor(c.bias)
    y = batch_norm(x, None, bias)
    (y * c.dy).sum().backward()
    expected = torch_first_order(c)
    # without weight, dx is the dx of weight 1: scale PyTorch's by 1 / weight per channel
    np.testing.assert_allclose(
        x.grad, expected["dx"] / c.weight.reshape(1, 3, 1), rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(bias.grad, expected["dbias"], rtol=1e-10, atol=1e-10)
    x, weight = mg.tensor(c.x), mg.tensor(c.weight, constant=True)
    (batch_norm(x, weight) * c.dy).sum().backward()
    assert weight.grad is None
    np.testing.assert_allclose(x.grad, expected["dx"], rtol=1e-10, atol=1e-10)


def test_running_statistics_must_be_arrays():
    c = case(np.float64, 1, (5, 3, 4))
    with pytest.raises(TypeError, match="running_mean must be a NumPy array"):
        batch_norm(mg.tensor(c.x), None, None, mg.tensor(c.running_mean), c.running_var)
