"""The interface every backend implements: five per-channel primitives on canonical views.

All per-channel vectors (`mean`, `var`, `invstd`, `scale`, `shift`, `gamma`, the two gradient
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

`Backend` is exactly these five primitives (plus `name` and `xp`). A backend may also offer the
fused training statistics of `FusedTrainStatistics`; `cupy_bn.functional` uses them when
`has_fused_statistics(backend)` (the CUDA backend), and composes `batch_stats`,
per-channel array operations and `update_running` otherwise. Likewise `FusedBackward` (the
NumPy backend): one call for the training backward when no all-reduce separates its halves.
What each backend moves and launches per phase is `cupy_bn.traffic`'s model, not part of this
interface.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

from cupy_bn.layout import View

Array = Any


@runtime_checkable
class Backend(Protocol):
    """Five primitives over canonical views; see the module docstring for the formulas."""

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
