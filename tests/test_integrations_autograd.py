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
    assert_matches,
    case,
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
    import torch

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
