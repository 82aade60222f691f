"""PyTorch as the reference of the framework integrations' tests.

`case` draws one input (NumPy arrays); `torch_first_order` runs it through PyTorch's
`F.batch_norm` (a training step, then inference with the updated running statistics) and
returns what every integration is compared with; `plain_batch_norm` is batch norm written in
torch arithmetic (mean, var, rsqrt), whose derivatives of every order are autograd's own: the
reference for third derivatives, which PyTorch's batch-norm kernel gets wrong (its double
backward treats the saved statistics as constants).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

#: Agreement asked of every integration with PyTorch, by dtype (absolute and relative).
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
DTYPES = [np.float64, np.float32]
#: (channel_axis, shape): NCHW, and NHWC with channels last.
LAYOUTS = [(1, (6, 3, 4, 5)), (-1, (6, 4, 5, 3))]
MOMENTUM = 0.3


@dataclass
class Case:
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    dy: np.ndarray
    channel_axis: int

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        """Fresh copies of the running statistics (each run updates its own)."""
        return self.running_mean.copy(), self.running_var.copy()


def case(dtype, channel_axis: int, shape: tuple[int, ...], seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    channels = shape[channel_axis]
    x = (
        rng.standard_normal(shape) * 2
        + rng.standard_normal(channels).reshape(
            [channels if a == channel_axis % len(shape) else 1 for a in range(len(shape))]
        )
    ).astype(dtype)
    return Case(
        x,
        rng.uniform(0.5, 1.5, channels).astype(dtype),
        rng.standard_normal(channels).astype(dtype),
        rng.standard_normal(channels).astype(dtype),
        rng.uniform(0.5, 2.0, channels).astype(dtype),
        rng.standard_normal(shape).astype(dtype),
        channel_axis,
    )


def to_channels_first(t, channel_axis: int):
    return t if channel_axis == 1 else t.movedim(channel_axis, 1)


def from_channels_first(t, channel_axis: int):
    return t if channel_axis == 1 else t.movedim(1, channel_axis)


def torch_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, axis):
    """`F.batch_norm` with the channels on `axis`."""
    y = F.batch_norm(
        to_channels_first(x, axis), running_mean, running_var, weight, bias, training, momentum, eps
    )
    return from_channels_first(y, axis)


def torch_first_order(c: Case, training: bool = True) -> dict[str, np.ndarray]:
    """PyTorch's y and gradients of `sum(y * dy)` for one call (training, or inference with the
    case's running statistics), the running statistics after it, and the inference output
    with them."""
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (c.x, c.weight, c.bias))
    rm, rv = (torch.tensor(a) for a in c.running())
    y = torch_batch_norm(x, w, b, rm, rv, training, MOMENTUM, 1e-5, c.channel_axis)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.tensor(c.dy))
    with torch.no_grad():
        inference = torch_batch_norm(x, w, b, rm, rv, False, MOMENTUM, 1e-5, c.channel_axis)
    return {
        "y": y.detach().numpy(),
        "dx": dx.numpy(),
        "dweight": dw.numpy(),
        "dbias": db.numpy(),
        "running_mean": rm.numpy(),
        "running_var": rv.numpy(),
        "inference": inference.numpy(),
    }


def gradient_penalty(bn, c, training: bool) -> list[np.ndarray]:
    """Gradients in (x, weight, bias) of `|d sum(y * dy) / d(x, weight)|^2` for `bn`, a
    batch norm with F.batch_norm's arguments and channel_axis."""
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (c.x, c.weight, c.bias))
    rm, rv = (torch.tensor(a) for a in c.running())
    y = bn(x, w, b, rm, rv, training, MOMENTUM, 1e-5, c.channel_axis)
    gx, gw = torch.autograd.grad((y * torch.tensor(c.dy)).sum(), (x, w), create_graph=True)
    grads = torch.autograd.grad((gx**2).sum() + (gw**2).sum(), (x, w, b), allow_unused=True)
    return [np.zeros_like(c.bias) if g is None else g.numpy() for g in grads]


def assert_close(actual, expected, what: str = "") -> None:
    """Agreement to `TOLERANCE` of the expected dtype (relative and absolute)."""
    expected = np.asarray(expected)
    tol = TOLERANCE[expected.dtype]
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def assert_matches(results: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert results.keys() == expected.keys()
    for key in expected:
        assert_close(results[key], expected[key], key)


def plain_batch_norm(x, weight, bias, channel_axis: int, eps: float = 1e-5):
    """Training-mode batch norm in torch arithmetic: every derivative is autograd's own."""
    dims = [a for a in range(x.dim()) if a != channel_axis % x.dim()]
    shape = [-1 if a == channel_axis % x.dim() else 1 for a in range(x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)
