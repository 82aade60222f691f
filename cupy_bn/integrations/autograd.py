"""Batch norm as a HIPS autograd primitive, differentiable in x, weight and bias to any order.

    import autograd.numpy as anp
    from autograd import grad
    from cupy_bn.integrations.autograd import batch_norm

    loss = lambda x, w, b: anp.sum(batch_norm(x, w, b, running_mean, running_var) ** 2)
    dx = grad(loss)(x, weight, bias)

Three primitives, each the derivative of the one before:

- the forward: `cupy_bn.batch_norm` (running statistics updated in place once per call, as
  the core does); its vjp is
- the backward: `cupy_bn.batch_norm_backward` on the forward's saved statistics, returning
  `(dx, dweight, dbias)`; its vjp is
- the double backward: `cupy_bn.batch_norm_double_backward`, returning `(gx, gweight, gdy)`;
  its vjp (third order and beyond) is autograd's own derivative of
  `double_backward_formula`, the same double backward written in `autograd.numpy`.

Arguments, conventions and errors are `cupy_bn.batch_norm`'s: `momentum` is the weight of the
new batch, `channel_axis` 1 for NCHW-style input and -1 for channels-last, statistics
accumulate in float32 (float64 for float64 input). Autograd works on NumPy arrays only; the
running statistics are plain NumPy arrays (buffers, not differentiated).
"""

from __future__ import annotations

from typing import Any

import autograd.numpy as anp
from autograd import make_vjp
from autograd.builtins import tuple as boxed_tuple
from autograd.extend import Box, defvjp_argnums, primitive

from cupy_bn.double_backward import batch_norm_double_backward
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.functional import SavedForBackward, batch_norm_backward
from cupy_bn.functional import batch_norm as _batch_norm
from cupy_bn.validation import type_name

__all__ = ["batch_norm", "double_backward_formula"]

Array = Any


class _Call:
    """One forward call: its options, and the statistics the core saved for its derivatives."""

    __slots__ = ("channel_axis", "eps", "has_bias", "has_weight", "saved", "training")

    def __init__(
        self, training: bool, eps: float, channel_axis: int, has_weight: bool, has_bias: bool
    ):
        self.training = training
        self.eps = eps
        self.channel_axis = channel_axis
        self.has_weight = has_weight
        self.has_bias = has_bias
        self.saved: SavedForBackward | None = None

    def grads(self, packed) -> tuple[Any, Any, Any]:
        """`(dx, dweight, dbias)` from a tuple holding only the present ones, None for absent."""
        dweight = packed[1] if self.has_weight else None
        dbias = packed[1 + self.has_weight] if self.has_bias else None
        return packed[0], dweight, dbias

    def second_grads(self, packed) -> tuple[Any, Any, Any]:
        """`(gx, gweight, gdy)` from a tuple without gweight when there is no weight."""
        return packed[0], packed[1] if self.has_weight else None, packed[-1]


def _present(*values) -> tuple:
    return tuple(v for v in values if v is not None)


def batch_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> Array:
    """`cupy_bn.batch_norm`'s output `y`, as a primitive autograd differentiates in x, weight and
    bias to any order.

    training=True normalizes with the batch statistics (they depend on x, and the derivatives
    say so) and updates `running_mean`/`running_var` in place; training=False normalizes with
    the running statistics (constants for the derivatives).
    """
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if isinstance(value, Box):
            raise TypeError(
                f"{name} must be a NumPy array (running statistics are not differentiated), "
                f"got an autograd {type_name(value)} (a traced value)"
            )
    call = _Call(bool(training), eps, channel_axis, weight is not None, bias is not None)
    return _forward(x, weight, bias, call, running_mean, running_var, momentum)


@primitive
def _forward(x, weight, bias, call: _Call, running_mean, running_var, momentum):
    y, call.saved = _batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training=call.training,
        momentum=momentum,
        eps=call.eps,
        channel_axis=call.channel_axis,
    )
    return y


def _forward_vjp(argnums, y, args, kwargs):
    x, weight, _, call = args[:4]

    def vjp(g):
        by_argnum = call.grads(_backward(g, x, weight, call))
        return tuple(by_argnum[i] for i in argnums)

    return vjp


@primitive
def _backward(dy, x, weight, call: _Call) -> tuple:
    """`(dx, dweight, dbias)` without the absent ones; `x` and `weight` are arguments so that
    autograd sees what the result depends on (their values are the saved ones)."""
    return _present(*batch_norm_backward(dy, call.saved))


def _backward_vjp(argnums, grads, args, kwargs):
    dy, x, weight, call = args

    def vjp(g):
        ddx, ddweight, ddbias = call.grads(g)
        gx, gweight, gdy = call.second_grads(
            _double_backward(ddx, ddweight, ddbias, dy, x, weight, call)
        )
        by_argnum = (gdy, gx, gweight)
        return tuple(by_argnum[i] for i in argnums)

    return vjp


@primitive
def _double_backward(ddx, ddweight, ddbias, dy, x, weight, call: _Call) -> tuple:
    """`(gx, gweight, gdy)` of the core, without gweight when there is no weight."""
    return _present(*batch_norm_double_backward(ddx, ddweight, ddbias, dy, call.saved))


def _double_backward_vjp(argnums, ans, args, kwargs):
    """The vjp of the double backward: autograd's own, of `double_backward_formula`."""
    arrays, call = list(args[:-1]), args[-1]

    def vjp(g):
        def formula(varying):
            values = list(arrays)
            for i, v in zip(argnums, varying, strict=True):
                values[i] = v
            return double_backward_formula(*values, call.saved, call.eps)

        formula_vjp, _ = make_vjp(formula)(tuple(arrays[i] for i in argnums))
        return formula_vjp(g)

    return vjp


defvjp_argnums(_forward, _forward_vjp)
defvjp_argnums(_backward, _backward_vjp)
defvjp_argnums(_double_backward, _double_backward_vjp)


def double_backward_formula(
    ddx, ddweight, ddbias, dy, x, weight, saved: SavedForBackward, eps: float
) -> tuple:
    """`(gx, gweight, gdy)` of the backward `(dy, x, weight) -> (dx, dweight, dbias)` against
    the cotangents `(ddx, ddweight, ddbias)`, in `autograd.numpy` so that autograd can
    differentiate it (gweight left out without weight; a None cotangent counts as zero).

    `saved` is the forward's (its mode, channel axis, and in inference mode its statistics);
    in training mode the batch mean and variance are recomputed from `x` with `eps`, so that
    autograd differentiates through them.

    Per channel, with `<a>` the mean over the batch, `xhat = (x - mean) * invstd`,
    `dyc = dy - <dy>`, `ddxc = ddx - <ddx>`, `A = <ddx xhat>`, `B = <dy xhat>`, `N` the
    values per channel and gamma the weight (1 without one), training mode gives:

        gdy = gamma invstd (ddxc - xhat A) + ddweight xhat + ddbias
        gweight = N invstd (<ddxc dyc> - A B)
        gx = gamma invstd^2 (xhat (3 A B - <ddxc dyc>) - B ddxc - A dyc)
             + ddweight invstd (dyc - xhat B)

    and inference mode (statistics constant): `gdy = gamma invstd ddx + ddweight xhat +
    ddbias`, `gweight = invstd sum(ddx dy)`, `gx = ddweight invstd dy`.
    """
    training = saved.batch_statistics
    ndim = len(x.shape)
    axis = saved.view.channel_axis
    over = tuple(a for a in range(ndim) if a != axis)
    shape = tuple(-1 if a == axis else 1 for a in range(ndim))
    count = saved.count
    acc = accumulation_dtype(x.dtype)

    def channel(v):
        return anp.reshape(v if v.dtype == acc else v.astype(acc), shape)

    def mean(v):
        return anp.mean(v, axis=over, keepdims=True)

    xa = x if x.dtype == acc else x.astype(acc)
    dya = dy if dy.dtype == acc else dy.astype(acc)
    if training:
        centred = xa - mean(xa)
        invstd = 1.0 / anp.sqrt(mean(centred * centred) + eps)
        xhat = centred * invstd
    else:
        invstd = anp.reshape(saved.invstd, shape)
        xhat = (xa - anp.reshape(saved.mean, shape)) * invstd
    gamma_invstd = invstd if weight is None else channel(weight) * invstd
    gdy = 0.0 * dya
    gx = 0.0 * xa
    gweight = None
    if training:
        dyc = dya - mean(dya)
        b = mean(dya * xhat)
        if ddx is not None:
            ddxa = ddx if ddx.dtype == acc else ddx.astype(acc)
            ddxc = ddxa - mean(ddxa)
            a = mean(ddxa * xhat)
            cross = mean(ddxc * dyc)
            gdy = gdy + gamma_invstd * (ddxc - xhat * a)
            gx = gx + gamma_invstd * invstd * (xhat * (3.0 * a * b - cross) - b * ddxc - a * dyc)
            gweight = count * anp.reshape(invstd * (cross - a * b), (-1,))
        if ddweight is not None:
            gx = gx + channel(ddweight) * invstd * (dyc - xhat * b)
    else:
        if ddx is not None:
            ddxa = ddx if ddx.dtype == acc else ddx.astype(acc)
            gdy = gdy + gamma_invstd * ddxa
            gweight = anp.reshape(invstd, (-1,)) * anp.sum(ddxa * dya, axis=over)
        if ddweight is not None:
            gx = gx + channel(ddweight) * invstd * dya
    if ddweight is not None:
        gdy = gdy + channel(ddweight) * xhat
    if ddbias is not None:
        gdy = gdy + channel(ddbias)
    gx = gx if gx.dtype == x.dtype else gx.astype(x.dtype)
    gdy = gdy if gdy.dtype == dy.dtype else gdy.astype(dy.dtype)
    if weight is None:
        return boxed_tuple((gx, gdy))
    if gweight is None:
        gweight = 0.0 * weight
    gweight = gweight if gweight.dtype == weight.dtype else gweight.astype(weight.dtype)
    return boxed_tuple((gx, gweight, gdy))
