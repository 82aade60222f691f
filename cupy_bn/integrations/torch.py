"""Batch norm for PyTorch: a `torch.library` custom op with first and second derivatives.

    from cupy_bn.integrations.torch import BatchNorm2d, batch_norm

    y = batch_norm(x, weight, bias, running_mean, running_var, training=True)
    bn = BatchNorm2d(64)          # a torch.nn.BatchNorm2d whose forward is cupy_bn's
    y = bn(x)                     # same parameters, buffers and state_dict as PyTorch's

Three ops in the namespace `cupy_bn`, each with a fake implementation (shapes, dtypes and
strides for tracing: `make_fx`, `torch.export`, `torch.compile`):

- `cupy_bn::batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
  channel_axis) -> (y, mean, invstd, new_running_mean, new_running_var)`: functional (it
  mutates nothing). `mean`/`invstd` are the statistics `y` was normalized with, in the
  accumulation dtype; the new running statistics are the core's update of copies of the given
  ones (empty unless training with running statistics). `batch_norm` copies them into the
  running statistics in place, so buffers change as with `F.batch_norm`.
- `cupy_bn::batch_norm_backward(dy, x, weight, bias, mean, invstd, training, channel_axis)
  -> (dx, dweight, dbias)`, the autograd formula of the first (empty dweight/dbias without
  weight/bias);
- `cupy_bn::batch_norm_double_backward(ddx, ddweight, ddbias, dy, x, weight, bias, mean,
  invstd, training, channel_axis) -> (gx, gweight, gdy)`, the autograd formula of the second.
  It has none itself: a third derivative raises.

CPU tensors are handed to the CPU backend ("auto") without a copy (`.detach().numpy()`, results back
through `torch.from_numpy`); CUDA tensors to the CUDA backend as CuPy arrays through DLPack,
with CuPy on PyTorch's current stream and device, so the kernels are ordered with PyTorch's
work. bfloat16 goes through `ml_dtypes` on the CPU. Conventions are the core's: `momentum` is
the weight of the new batch, `channel_axis` 1 for NCHW (PyTorch's layout, channels_last memory
included) and -1 for NHWC-shaped tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cupy_bn.double_backward import batch_norm_double_backward
from cupy_bn.dtypes import BFLOAT16
from cupy_bn.functional import batch_norm as _batch_norm
from cupy_bn.functional import batch_norm_backward, restore_saved
from cupy_bn.validation import normalize_axis

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm"]

Array = Any


# -- tensors as arrays ---------------------------------------------------------------------
def _array(t: Tensor | None, name: str) -> Array | None:
    """`t` as a NumPy (CPU) or CuPy (CUDA) array sharing its memory; None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t)
    if t.device.type != "cpu":
        raise TypeError(f"{name} must be a CPU or CUDA tensor, got device {t.device}")
    if t.dtype == torch.bfloat16:
        if BFLOAT16 is None:
            raise TypeError(
                f"{name} must be float16, float32 or float64 on the CPU without ml_dtypes "
                "(pip install ml_dtypes for bfloat16), got bfloat16"
            )
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def _tensor(a: Array) -> Tensor:
    """The tensor of a NumPy or CuPy array, sharing its memory."""
    if not isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@contextmanager
def _device_of(x: Tensor) -> Iterator[None]:
    """For a CUDA tensor: CuPy on its device and on PyTorch's current stream there."""
    if x.device.type != "cuda":
        yield
        return
    import cupy

    stream = torch.cuda.current_stream(x.device)
    with (
        cupy.cuda.Device(x.device.index),
        cupy.cuda.ExternalStream(stream.cuda_stream, x.device.index),
    ):
        yield


def _or_empty(a: Array | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if a is None else _tensor(a)


# -- shapes for the fake implementations ---------------------------------------------------
def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_input(x: Tensor, channel_axis: int, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor with the shape and memory order the core gives outputs of `x`'s shape
    (`cupy_bn.layout.canonical`): contiguous, or channels-last memory kept as it is."""
    axis = normalize_axis(channel_axis, x.dim())
    dtype = x.dtype if dtype is None else dtype
    if x.is_contiguous() or prod(x.shape[axis + 1 :]) == 1:
        return x.new_empty(x.shape, dtype=dtype)
    moved = x.movedim(axis, -1)
    if moved.is_contiguous():
        return x.new_empty(moved.shape, dtype=dtype).movedim(-1, axis)
    return x.new_empty(x.shape, dtype=dtype)


def _channels(x: Tensor, channel_axis: int) -> int:
    return x.shape[normalize_axis(channel_axis, x.dim())]


def _vector_or_empty(v: Tensor | None, channels: int, like: Tensor) -> Tensor:
    return like.new_empty(0) if v is None else v.new_empty(channels)


# -- the forward ---------------------------------------------------------------------------
@torch.library.custom_op("cupy_bn::batch_norm", mutates_args=())
def _batch_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    channel_axis: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    update = training and running_mean is not None and running_var is not None
    if update:  # the core updates copies; the caller copies them back
        running_mean, running_var = running_mean.clone(), running_var.clone()
    with _device_of(x):
        y, saved = _batch_norm(
            _array(x, "x"),
            _array(weight, "weight"),
            _array(bias, "bias"),
            _array(running_mean, "running_mean"),
            _array(running_var, "running_var"),
            training=training,
            momentum=momentum,
            eps=eps,
            channel_axis=channel_axis,
        )
        outputs = (_tensor(y), _tensor(saved.mean), _tensor(saved.invstd))
    if update:
        return (*outputs, running_mean, running_var)
    return (*outputs, x.new_empty(0), x.new_empty(0))


@_batch_norm_op.register_fake
def _batch_norm_fake(
    x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis
):
    channels = _channels(x, channel_axis)
    acc = _accumulation(x.dtype)
    update = training and running_mean is not None and running_var is not None
    return (
        _like_input(x, channel_axis),
        x.new_empty(channels, dtype=acc),
        x.new_empty(channels, dtype=acc),
        _vector_or_empty(running_mean if update else None, channels, x),
        _vector_or_empty(running_var if update else None, channels, x),
    )


def _batch_norm_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, _, training, _, _, channel_axis = inputs
    _, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.training = training
    ctx.channel_axis = channel_axis
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _batch_norm_grad(ctx, dy, *_):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = _backward_op(
        dy, x, weight, bias, mean, invstd, ctx.training, ctx.channel_axis
    )
    return (
        dx,
        None if weight is None else dweight,
        None if bias is None else dbias,
        None,
        None,
        None,
        None,
        None,
        None,
    )


# -- the backward --------------------------------------------------------------------------
def _saved(x, weight, bias, mean, invstd, training: bool, channel_axis: int):
    return restore_saved(
        _array(x, "x"),
        _array(mean, "mean"),
        _array(invstd, "invstd"),
        _array(weight, "weight"),
        None if bias is None else _array(bias, "bias").dtype,
        batch_statistics=training,
        channel_axis=channel_axis,
    )


@torch.library.custom_op("cupy_bn::batch_norm_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    channel_axis: int,
) -> tuple[Tensor, Tensor, Tensor]:
    with _device_of(x):
        saved = _saved(x, weight, bias, mean, invstd, training, channel_axis)
        dx, dweight, dbias = batch_norm_backward(_array(dy, "dy"), saved)
        return _tensor(dx), _or_empty(dweight, x), _or_empty(dbias, x)


@_backward_op.register_fake
def _backward_fake(dy, x, weight, bias, mean, invstd, training, channel_axis):
    channels = _channels(x, channel_axis)
    return (
        _like_input(x, channel_axis),
        _vector_or_empty(weight, channels, x),
        _vector_or_empty(bias, channels, x),
    )


def _backward_setup(ctx, inputs, output) -> None:
    dy, x, weight, bias, mean, invstd, training, channel_axis = inputs
    ctx.save_for_backward(dy, x, weight, bias, mean, invstd)
    ctx.training = training
    ctx.channel_axis = channel_axis


def _backward_grad(ctx, ddx, ddweight, ddbias):
    dy, x, weight, bias, mean, invstd = ctx.saved_tensors
    gx, gweight, gdy = _double_backward_op(
        ddx,
        None if weight is None else ddweight,
        None if bias is None else ddbias,
        dy,
        x,
        weight,
        bias,
        mean,
        invstd,
        ctx.training,
        ctx.channel_axis,
    )
    return gdy, gx, None if weight is None else gweight, None, None, None, None, None


# -- the double backward -------------------------------------------------------------------
@torch.library.custom_op("cupy_bn::batch_norm_double_backward", mutates_args=())
def _double_backward_op(
    ddx: Tensor | None,
    ddweight: Tensor | None,
    ddbias: Tensor | None,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    channel_axis: int,
) -> tuple[Tensor, Tensor, Tensor]:
    with _device_of(x):
        saved = _saved(x, weight, bias, mean, invstd, training, channel_axis)
        gx, gweight, gdy = batch_norm_double_backward(
            _array(ddx, "ddx"),
            _array(ddweight, "ddweight"),
            _array(ddbias, "ddbias"),
            _array(dy, "dy"),
            saved,
        )
        return _tensor(gx), _or_empty(gweight, x), _tensor(gdy)


@_double_backward_op.register_fake
def _double_backward_fake(
    ddx, ddweight, ddbias, dy, x, weight, bias, mean, invstd, training, channel_axis
):
    return (
        _like_input(x, channel_axis),
        _vector_or_empty(weight, _channels(x, channel_axis), x),
        _like_input(x, channel_axis, dy.dtype),
    )


def _double_backward_grad(ctx, *_):
    raise RuntimeError(
        "cupy_bn's PyTorch op has first and second derivatives only; for a third, use "
        "cupy_bn.integrations.autograd (any order) or batch norm written in torch operations"
    )


torch.library.register_autograd(
    "cupy_bn::batch_norm", _batch_norm_grad, setup_context=_batch_norm_setup
)
torch.library.register_autograd(
    "cupy_bn::batch_norm_backward", _backward_grad, setup_context=_backward_setup
)
torch.library.register_autograd(
    "cupy_bn::batch_norm_double_backward",
    _double_backward_grad,
    setup_context=lambda ctx, inputs, output: None,
)


# -- the public function and modules -------------------------------------------------------
def batch_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> Tensor:
    """`cupy_bn.batch_norm` on tensors, differentiable twice in x, weight and bias.

    training=True normalizes with the batch statistics and updates `running_mean` and
    `running_var` in place (under `torch.no_grad`, as `F.batch_norm` does); training=False
    normalizes with them. Arguments as `torch.nn.functional.batch_norm`'s, in cupy_bn's order,
    plus `channel_axis`.
    """
    y, _, _, new_mean, new_var = torch.ops.cupy_bn.batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis
    )
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


class _CupyBatchNorm:
    """The forward of PyTorch's `_BatchNorm` on cupy_bn's op (mixed into its subclasses)."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        counted = tracking and self.num_batches_tracked is not None
        momentum = self.momentum
        if counted and momentum is None:  # cumulative average over the batches seen
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        use_buffers = not self.training or self.track_running_stats
        y = batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.training or (self.running_mean is None and self.running_var is None),
            0.0 if momentum is None else momentum,
            self.eps,
        )
        if counted:
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_CupyBatchNorm, torch.nn.BatchNorm1d):
    """`torch.nn.BatchNorm1d` ((N, C) or (N, C, L) input) computed by cupy_bn."""


class BatchNorm2d(_CupyBatchNorm, torch.nn.BatchNorm2d):
    """`torch.nn.BatchNorm2d` ((N, C, H, W) input, channels_last memory too) computed by
    cupy_bn."""


class BatchNorm3d(_CupyBatchNorm, torch.nn.BatchNorm3d):
    """`torch.nn.BatchNorm3d` ((N, C, D, H, W) input) computed by cupy_bn."""
