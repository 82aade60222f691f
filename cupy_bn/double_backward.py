"""Double backward of batch norm: gradients of the backward's outputs, for higher-order autodiff.

`batch_norm_backward(dy, saved)` maps `(x, weight, dy)` to `(dx, dweight, dbias)`. Given
cotangents `(ddx, ddweight, ddbias)` of those outputs, `batch_norm_double_backward` returns the
gradients of `L2 = sum(ddx * dx) + sum(ddweight * dweight) + sum(ddbias * dbias)` with respect
to `(x, weight, dy)` (`bias` does not enter the backward). It is what `torch.autograd.grad(...,
create_graph=True)` differentiates through for gradient penalties and Hessian-vector products.

In training mode (batch statistics) the result is the true second derivative: the mean and
variance depend on `x`. In inference mode the statistics are constants. Composed from two
primitives of the backend (`cupy_bn.backends.base`, where the formulas are):
`double_backward_reduce` (five per-channel sums in one pass over `dy`, `x`, `ddx`) and
`double_backward_apply` (`gx` and `gdy` in one pass, with per-channel coefficients from
`double_backward_coefficients` in float64). The backward of a `batch_norm` with a fused
activation or residual is refused with a ValueError before any work.

Sync batch norm (`saved.reducer`): the result is exact for the global batch. The per-channel
sums are summed over processes in the "grads" collective (four all-reduces of two per-channel
vectors each, in every training-mode call whatever is None, so every process takes part in
the same collectives). `ddweight`/`ddbias` are this process's cotangents of its share of
`dweight`/`dbias`, and `gweight` is this process's share (sum it across processes, as
`dweight`); `gx` and `gdy` are this process's parts of the global gradients.

Batch renormalization (`cupy_bn.renorm`): `r` and `d` are constants, as in the backward; the
result is batch norm's double backward at the weight `gamma * r` with the cotangents
`r * ddweight` and `ddbias + d * ddweight`, and `gweight` is `r` times that weight gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cupy_bn import deferred
from cupy_bn.backends.base import double_backward_coefficients, double_backward_weight_grad
from cupy_bn.functional import SavedForBackward, StatsReducer, grads_collective
from cupy_bn.layout import View
from cupy_bn.validation import check_array, check_array_module, check_channel_vector, type_name

Array = Any

__all__ = ["batch_norm_double_backward"]


def batch_norm_double_backward(
    ddx: Array | None,
    ddweight: Array | None,
    ddbias: Array | None,
    dy: Array,
    saved: SavedForBackward,
) -> tuple[Array, Array | None, Array]:
    """Gradients `(gx, gweight, gdy)` of the backward of the forward that produced `saved`.

    `ddx` (x's shape), `ddweight`, `ddbias` (one value per channel): cotangents of `dx`,
    `dweight`, `dbias`; any of them may be None (zero). `ddweight` needs a forward with
    `weight`, `ddbias` one with `bias`. `dy`: the gradient the backward was given.
    `gx` has x's shape, dtype and memory order, `gdy` x's shape and memory order and dy's
    dtype, `gweight` weight's dtype (None without weight). Sums accumulate in float32
    (float64 for float64 input). Under sync batch norm see the module docstring.
    """
    if not isinstance(saved, SavedForBackward):
        raise TypeError(
            f"saved must be the SavedForBackward that batch_norm returned, got {type_name(saved)}"
        )
    if saved.activation is not None or saved.residual_dtype is not None:
        raise ValueError(
            "double backward of a fused activation is not supported "
            "(a batch_norm with activation or residual)"
        )
    with grads_collective(saved):
        deferred.poll()
        dyv, ddxv = _check_arguments(ddx, ddweight, ddbias, dy, saved)
        return _double_backward(ddxv, ddweight, ddbias, dyv, saved)


def _check_arguments(
    ddx: Array | None, ddweight: Array | None, ddbias: Array | None, dy: Array, saved
) -> tuple[View, View | None]:
    """Canonical views of `dy` and `ddx`; raises naming the argument before any work."""
    view, xp = saved.view, saved.backend.xp
    tensors = {}
    for name, value in (("dy", dy), ("ddx", ddx)):
        if value is None and name == "ddx":
            tensors[name] = None
            continue
        check_array(name, value)
        check_array_module(name, value, xp, "like x")
        tensors[name] = view.match(value, name)
    for name, value, present in (
        ("ddweight", ddweight, saved.weight is not None),
        ("ddbias", ddbias, saved.bias_dtype is not None),
    ):
        if value is None:
            continue
        parameter = name.removeprefix("dd")
        if not present:
            raise ValueError(
                f"{name} must be None: the forward had no {parameter}, so the backward "
                f"returned no d{parameter}"
            )
        check_channel_vector(name, value, view.num_channels, xp)
    return tensors["dy"], tensors["ddx"]


def _double_backward(
    ddx: View | None,
    ddweight: Array | None,
    ddbias: Array | None,
    dy: View,
    saved: SavedForBackward,
) -> tuple[Array, Array | None, Array]:
    view, be, reducer = saved.view, saved.backend, saved.reducer
    xp, channels = be.xp, saved.view.num_channels
    training = saved.batch_statistics

    def vector(v: Array | None, fill: float) -> Array:
        return xp.full(channels, fill, np.float64) if v is None else v.astype(np.float64)

    invstd = saved.invstd.astype(np.float64)
    gamma = vector(saved.weight, 1.0)
    ddgamma, ddbeta = vector(ddweight, 0.0), vector(ddbias, 0.0)
    correction = saved.renorm  # renorm: batch norm's double backward at gamma * r
    if correction is not None:
        gamma, ddgamma, ddbeta = correction.double_backward_terms(gamma, ddgamma, ddbeta)

    synced = training and reducer is not None
    needs_sums = (
        synced or ddx is not None or ddweight is not None
        if training
        else ddx is not None and saved.weight is not None
    )
    local = _local_sums(saved, dy, ddx) if needs_sums else (vector(None, 0.0),) * 5
    totals, ddgamma_sums = local, (ddgamma * local[0], ddgamma * local[1])
    if synced:
        totals, ddgamma_sums = _summed_over_processes(reducer, local, ddgamma_sums)

    coefficients = double_backward_coefficients(
        invstd, gamma, ddgamma, ddbeta, totals, ddgamma_sums, saved.count, training
    )
    gx, gdy = be.double_backward_apply(dy, view, ddx, saved.mean, coefficients)
    gweight = None
    if saved.weight is not None:
        grad = double_backward_weight_grad(invstd, local, totals, saved.count, training)
        if correction is not None:
            grad = correction.weight_double_gradient(grad)
        gweight = grad.astype(saved.weight.dtype)
    return view.restore(gx), gweight, view.restore(gdy)


def _local_sums(saved: SavedForBackward, dy: View, ddx: View | None) -> tuple[Array, ...]:
    """This process's `(B1, B2, A1, A2, D)` in float64: one `double_backward_reduce`, or
    `backward_reduce` (R2) and zeros without `ddx`."""
    be, view = saved.backend, saved.view
    if ddx is not None:
        found = be.double_backward_reduce(dy, view, ddx, saved.mean)
    else:
        sum_dy, sum_dy_xmu = be.backward_reduce(dy, view, saved.mean, invstd=saved.invstd)
        zero = sum_dy * 0
        found = (sum_dy, sum_dy_xmu, zero, zero, zero)
    return tuple(v.astype(np.float64) for v in found)


def _summed_over_processes(
    reducer: StatsReducer, local: tuple[Array, ...], ddgamma_sums: tuple[Array, Array]
) -> tuple[tuple[Array, ...], tuple[Array, Array]]:
    """The global `(B1, B2, A1, A2, D)` and `(E1, E2)`: four all-reduces of two vectors each."""
    b1, b2 = reducer.sum_grads(local[0], local[1])
    a1, a2 = reducer.sum_grads(local[2], local[3])
    e1, e2 = reducer.sum_grads(*ddgamma_sums)
    d, _ = reducer.sum_grads(local[4], local[4] * 0)
    return (b1, b2, a1, a2, d), (e1, e2)
