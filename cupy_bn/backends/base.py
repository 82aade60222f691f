"""The interface every backend implements: seven per-channel primitives on canonical views.

All per-channel vectors (`mean`, `var`, `invstd`, `scale`, `shift`, `gamma`, the gradient
sums) have shape `(C,)` and the accumulation dtype of the data (float64 for float64 input,
float32 otherwise). Tensors are `cupy_bn.layout.View` objects in NCS or MC layout; outputs are
returned in the canonical shape and the input's dtype (callers use `View.restore`).

Conventions:
- `var` is the biased (population) variance of the batch.
- `apply` computes `y = x * scale[c] + shift[c]`; the functional layer derives
  `scale = gamma * invstd` and `shift = beta - mean * scale`.
- `backward_reduce` returns `sum_dy = sum(dy)` and `sum_dy_xmu = sum(dy * (x - mean))`.
- `backward_apply` computes
  `dx = gamma * invstd * (dy - sum_dy / M - (x - mean) * invstd**2 * sum_dy_xmu / M)`
  with `M = count`, the number of values per channel (the global count under sync BN).
- `update_running` follows PyTorch: `momentum` is the weight of the new batch
  (`r = (1 - momentum) * r + momentum * batch`), `momentum=None` is a cumulative average
  (`momentum = 1 / num_batches_tracked`, which the caller passes), and the variance that enters
  the running average is the unbiased one, `var * count / (count - 1)`.

Double backward. The gradients `(gx, ggamma, gdy)` of
`L2 = sum(ddx * dx) + sum(ddgamma * dgamma) + sum(ddbeta * dbeta)` with respect to
`(x, gamma, dy)`, for cotangents `ddx` (shaped like `x`) and `ddgamma`, `ddbeta` (per channel)
of the backward's outputs `(dx, dgamma, dbeta)`, take two more primitives:
- `double_backward_reduce` returns the five per-channel sums
  `(sum(dy), sum(dy * (x - mean)), sum(ddx), sum(ddx * (x - mean)), sum(ddx * dy))`, written
  `B1, B2, A1, A2, D` below; `x - mean` is formed before any product (exact when
  |mean| >> std).
- `double_backward_apply` streams, with per-channel coefficients `k` (`DoubleBackwardCoefficients`),
  `gx = k.gx_dy * dy + k.gx_ddx * ddx + k.gx_xmu * (x - mean) + k.gx_one` and
  `gdy = k.gdy_ddx * ddx + k.gx_dy * (x - mean) + k.gdy_one` in one pass (the coefficient of `dy`
  in `gx` is that of `x - mean` in `gdy`: both are the mixed derivative of `L2`). Without `ddx`
  its terms are left out.
The coefficients are one pure function of the sums, `double_backward_coefficients`, computed
in float64 for every backend; with `s = invstd`, `M = count`, training mode (batch
statistics, which depend on `x`):

    gx_dy   = ddgamma * s - gamma * s**3 * A2 / M
    gx_ddx  = -gamma * s**3 * B2 / M
    gx_xmu  = -s**3 * E2 / M + gamma * s**3 / M * (3 * s**2 * A2 * B2 / M - D + A1 * B1 / M)
    gx_one  = -s * E1 / M + gamma * s**3 * (A2 * B1 + A1 * B2) / M**2
    gdy_ddx = gamma * s
    gdy_one = ddbeta - gamma * s * A1 / M
    ggamma  = s * (D - A1 * B1 / M - s**2 * A2 * B2 / M)

where `E1 = ddgamma * B1` and `E2 = ddgamma * B2` (under sync batch norm, where each process
has its own `ddgamma` for its share of `dgamma`, the sums of `ddgamma_p * B1_p` and
`ddgamma_p * B2_p` over processes). Inference mode (running statistics, constants):
`gx = ddgamma * s * dy`, `gdy = gamma * s * ddx + ddgamma * s * (x - mean) + ddbeta`,
`ggamma = s * D`.

`Backend` is exactly these seven primitives (plus `name` and `xp`). A backend may also offer the
fused training statistics of `FusedTrainStatistics`; `cupy_bn.functional` uses them when
`has_fused_statistics(backend)` (the CUDA backend), and composes `batch_stats`,
per-channel array operations and `update_running` otherwise. Likewise `FusedBackward` (the
NumPy backend): one call for the training backward when no all-reduce separates its halves.
`FusedActivation` (both built-in backends) takes the fused forms of `batch_norm`'s
`activation="relu"` and `residual`: `apply_activation` is `apply` with the residual added and
the ReLU taken before the single rounding to the output dtype, and `relu_gradient` masks `dy`
with the saved output (`dy` where `y > 0`). The backward of a fused form is `relu_gradient`
followed by the usual primitives on the masked gradient; without the capability
`cupy_bn.functional` composes `apply` with array operations (two roundings for 16-bit data).
What each backend moves and launches per phase is `cupy_bn.traffic`'s model, not part of this
interface.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

from cupy_bn.layout import View

Array = Any


@dataclass(frozen=True)
class DoubleBackwardCoefficients:
    """Per-channel coefficients of `double_backward_apply` (module docstring), `(C,)` each.

    `gx = gx_dy * dy + gx_ddx * ddx + gx_xmu * (x - mean) + gx_one`,
    `gdy = gdy_ddx * ddx + gx_dy * (x - mean) + gdy_one`.
    """

    gx_dy: Array
    gx_ddx: Array
    gx_xmu: Array
    gx_one: Array
    gdy_ddx: Array
    gdy_one: Array

    def vectors(self) -> tuple[Array, ...]:
        """The six vectors in field order (the kernels' `[6][C]` coefficient rows)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def double_backward_coefficients(
    invstd: Array,
    gamma: Array,
    ddgamma: Array,
    ddbeta: Array,
    sums: tuple[Array, Array, Array, Array, Array],
    ddgamma_sums: tuple[Array, Array],
    count: int,
    batch_statistics: bool,
) -> DoubleBackwardCoefficients:
    """The coefficients of the module docstring's formulas, from `(C,)` float64 vectors.

    `gamma` is ones without a weight, `ddgamma` and `ddbeta` zeros when not given; `sums` are
    `(B1, B2, A1, A2, D)` and `ddgamma_sums` `(E1, E2)`, over the whole (global) batch; both are
    unused in inference mode (`batch_statistics=False`). Pure: the same arithmetic on NumPy or
    CuPy vectors.
    """
    s = invstd
    if not batch_statistics:
        zero = s * 0.0
        return DoubleBackwardCoefficients(
            gx_dy=ddgamma * s,
            gx_ddx=zero,
            gx_xmu=zero,
            gx_one=zero,
            gdy_ddx=gamma * s,
            gdy_one=ddbeta + zero,
        )
    b1, b2, a1, a2, d = sums
    e1, e2 = ddgamma_sums
    m = float(count)
    s3 = s * s * s
    gs3 = gamma * s3
    return DoubleBackwardCoefficients(
        gx_dy=ddgamma * s - gs3 * a2 / m,
        gx_ddx=-gs3 * b2 / m,
        gx_xmu=-s3 * e2 / m + gs3 / m * (3.0 * s * s * a2 * b2 / m - d + a1 * b1 / m),
        gx_one=-s * e1 / m + gs3 * (a2 * b1 + a1 * b2) / (m * m),
        gdy_ddx=gamma * s,
        gdy_one=ddbeta - gamma * s * a1 / m,
    )


def double_backward_weight_grad(
    invstd: Array,
    local_sums: tuple[Array, Array, Array, Array, Array],
    global_sums: tuple[Array, Array, Array, Array, Array],
    count: int,
    batch_statistics: bool,
) -> Array:
    """`ggamma` of the module docstring: `s * (D - A1 * B1 / M - s**2 * A2 * B2 / M)` in
    training mode, `s * D` in inference mode (float64 `(C,)` vectors).

    `A1, A2, D` are this process's (`local_sums`), `B1, B2` the global batch's: summed over
    processes the result is the whole gradient, as `dweight` is under sync batch norm. Without
    sync batch norm both tuples are the same sums.
    """
    s = invstd
    _, _, a1, a2, d = local_sums
    if not batch_statistics:
        return s * d
    b1, b2 = global_sums[0], global_sums[1]
    m = float(count)
    return s * (d - a1 * b1 / m - s * s * a2 * b2 / m)


@runtime_checkable
class Backend(Protocol):
    """Seven primitives over canonical views; see the module docstring for the formulas."""

    name: str
    xp: Any  # the array module of the tensors this backend takes (numpy or cupy)

    def batch_stats(self, x: View) -> tuple[Array, Array]:
        """Per-channel `(mean, var)` (biased) of `x`; zeros for an empty batch."""

    def apply(self, x: View, scale: Array, shift: Array) -> Array:
        """`x * scale[c] + shift[c]` in canonical shape and `x`'s dtype."""

    def backward_reduce(
        self, dy: View, x: View, mean: Array, invstd: Array | None = None
    ) -> tuple[Array, Array]:
        """Per-channel `(sum(dy), sum(dy * (x - mean)))`.

        `invstd` is the forward's `1 / sqrt(var + eps)` for the same `x` and `mean`, or None
        when the caller does not have it. It is a hint about the data, never an operand: the
        result is `sum(dy * (x - mean))` to the accumulation dtype's accuracy whether or not
        it is given. A backend may use it to choose how to sum (the NumPy backend sums
        `dy * x` and subtracts `mean * sum(dy)` only where `invstd` shows `|mean|` within one
        standard deviation, where that is exact, and centres `x` first otherwise or without
        it) or ignore it (the CUDA kernels always centre `x` in registers).
        """

    def backward_apply(
        self,
        dy: View,
        x: View,
        mean: Array,
        invstd: Array,
        gamma: Array,
        sum_dy: Array,
        sum_dy_xmu: Array,
        count: int,
    ) -> Array:
        """`dx` of training-mode batch norm, in canonical shape and `dy`'s dtype."""

    def update_running(
        self,
        running_mean: Array,
        running_var: Array,
        mean: Array,
        var: Array,
        count: int,
        momentum: float,
    ) -> None:
        """Running averages in place (unbiased variance, `momentum` weights the new batch)."""

    def double_backward_reduce(
        self, dy: View, x: View, ddx: View, mean: Array
    ) -> tuple[Array, Array, Array, Array, Array]:
        """Per-channel `(sum(dy), sum(dy * (x - mean)), sum(ddx), sum(ddx * (x - mean)),
        sum(ddx * dy))`, in the accumulation dtype; zeros for an empty batch.

        `x - mean` is formed before the products, so the sums stay exact when |mean| >> std.
        """

    def double_backward_apply(
        self,
        dy: View,
        x: View,
        ddx: View | None,
        mean: Array,
        coefficients: DoubleBackwardCoefficients,
    ) -> tuple[Array, Array]:
        """`(gx, gdy)` of the module docstring in one pass, in canonical shape; `gx` in `x`'s
        dtype, `gdy` in `dy`'s. Computed in the accumulation dtype (the coefficients are cast
        to it); without `ddx` (None) its terms are left out and it is not read.
        """


@runtime_checkable
class FusedTrainStatistics(Protocol):
    """The optional capability of a backend: a training forward's statistics in one step."""

    def train_statistics(
        self,
        x: View,
        weight: Array | None,
        bias: Array | None,
        running_mean: Array | None,
        running_var: Array | None,
        momentum: float,
        eps: float,
    ) -> tuple[Array, Array, Array, Array, Array]:
        """`(mean, var, invstd, scale, shift)` of `x`, running statistics updated in place.

        The same values as `batch_stats`, `invstd = 1 / sqrt(var + eps)`,
        `scale = weight * invstd` (`invstd` without weight), `shift = bias - mean * scale`
        (`-mean * scale` without bias) and `update_running` would give. The running statistics
        (when given) are updated if and only if every channel's mean and var are finite; the
        caller checks the returned statistics and reports non-finite channels. Needs
        `x.count >= 2` when running statistics are given.
        """


@runtime_checkable
class FusedBackward(Protocol):
    """The optional capability of a backend: a training-mode backward in one step."""

    def backward(
        self, dy: View, x: View, mean: Array, invstd: Array, gamma: Array, count: int
    ) -> tuple[Array, Array, Array]:
        """`(sum_dy, sum_dy_xmu, dx)`: the values of `backward_reduce` and of
        `backward_apply` given those sums, for a batch whose sums need no all-reduce in between
        (`count` is `x.count`)."""


@runtime_checkable
class FusedActivation(Protocol):
    """The optional capability of a backend: `apply` with a residual and a ReLU fused in."""

    def apply_activation(
        self, x: View, scale: Array, shift: Array, residual: View | None, relu: bool
    ) -> Array:
        """`act(x * scale[c] + shift[c] + residual)` in canonical shape and `x`'s dtype, with
        `act` the ReLU (`max(v, 0)`) when `relu`, else the identity; `residual` (None: zero) has
        `x`'s layout, shape and dtype. Computed in the accumulation dtype, rounded once."""

    def relu_gradient(self, dy: View, y: View) -> Array:
        """`dy` where `y > 0`, else zero, in canonical shape and `dy`'s dtype (`y` is the
        forward's output, in `dy`'s layout; `dy`'s NaNs where `y > 0` pass through)."""


@functools.cache
def _class_implements(cls: type, capability: type) -> bool:
    return issubclass(cls, capability)


def has_fused_statistics(backend: object) -> bool:
    """Whether `backend` implements `FusedTrainStatistics`, decided once per backend class
    (a protocol's `isinstance` check costs microseconds on every call)."""
    return _class_implements(type(backend), FusedTrainStatistics)


def has_fused_backward(backend: object) -> bool:
    """Whether `backend` implements `FusedBackward`, decided once per backend class."""
    return _class_implements(type(backend), FusedBackward)


def has_fused_activation(backend: object) -> bool:
    """Whether `backend` implements `FusedActivation`, decided once per backend class."""
    return _class_implements(type(backend), FusedActivation)
