"""Batch norm as a MyGrad operation: takes and returns `mygrad.Tensor`s.

    import mygrad as mg
    from cupy_bn.integrations.mygrad import batch_norm

    x, weight, bias = mg.tensor(x), mg.tensor(weight), mg.tensor(bias)
    y = batch_norm(x, weight, bias, running_mean, running_var, training=True)
    (y * r).sum().backward()      # fills x.grad, weight.grad, bias.grad

The forward is `cupy_bn.batch_norm` and the backward `cupy_bn.batch_norm_backward` (MyGrad
differentiates to first order only). Arguments, conventions and errors are the core's:
`momentum` is the weight of the new batch, `channel_axis` 1 for NCHW-style input and -1 for
channels-last. `x`, `weight` and `bias` may be Tensors or arrays (arrays are constants); the
running statistics are NumPy arrays, updated in place in training mode.
"""

from __future__ import annotations

from typing import Any

import mygrad
import numpy as np
from mygrad.operation_base import Operation

from cupy_bn.functional import SavedForBackward, batch_norm_backward
from cupy_bn.functional import batch_norm as _batch_norm
from cupy_bn.validation import type_name

__all__ = ["BatchNormOp", "batch_norm"]

Array = Any


class BatchNormOp(Operation):
    """MyGrad's node for one batch-norm call; `variables` are x and the given weight and bias.

    `backward` runs the core's backward once and hands each input its gradient.
    """

    def __call__(
        self,
        x: mygrad.Tensor,
        *affine: mygrad.Tensor,
        has_weight: bool,
        running_mean: Array | None,
        running_var: Array | None,
        training: bool,
        momentum: float,
        eps: float,
        channel_axis: int,
    ) -> np.ndarray:
        self.variables = (x, *affine)
        weight = affine[0].data if has_weight else None
        bias = affine[-1].data if len(affine) > has_weight else None
        self.saved: SavedForBackward
        y, self.saved = _batch_norm(
            x.data,
            weight,
            bias,
            running_mean,
            running_var,
            training=training,
            momentum=momentum,
            eps=eps,
            channel_axis=channel_axis,
        )
        self._grads: tuple[np.ndarray, ...] = ()
        return y

    def backward(self, grad: np.ndarray, **kwargs) -> None:
        dx, dweight, dbias = batch_norm_backward(grad, self.saved)
        self._grads = tuple(g for g in (dx, dweight, dbias) if g is not None)
        try:
            super().backward(grad, **kwargs)
        finally:
            self._grads = ()

    def backward_var(self, grad: np.ndarray, index: int, **kwargs) -> np.ndarray:
        return self._grads[index]


def batch_norm(
    x: mygrad.Tensor | Array,
    weight: mygrad.Tensor | Array | None = None,
    bias: mygrad.Tensor | Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> mygrad.Tensor:
    """`cupy_bn.batch_norm`'s output `y` as a Tensor whose `backward()` fills the gradients of
    `x`, `weight` and `bias`.

    training=True normalizes with the batch statistics and updates `running_mean` and
    `running_var` in place; training=False normalizes with them.
    """
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if isinstance(value, mygrad.Tensor):
            raise TypeError(
                f"{name} must be a NumPy array (running statistics are buffers, updated in "
                f"place), got {type_name(value)}; pass its .data"
            )
    affine = tuple(v for v in (weight, bias) if v is not None)
    return mygrad.execute_op(
        BatchNormOp,
        x,
        *affine,
        op_kwargs={
            "has_weight": weight is not None,
            "running_mean": running_mean,
            "running_var": running_var,
            "training": bool(training),
            "momentum": momentum,
            "eps": eps,
            "channel_axis": channel_axis,
        },
    )
