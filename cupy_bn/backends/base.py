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
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from cupy_bn.layout import View

Array = Any

#: Minimal tensor passes per phase (reads, writes), ARCHITECTURE.md's traffic model.
MINIMAL_PASSES: dict[str, tuple[int, int]] = {
    "forward_train": (1, 1),
    "backward": (2, 1),
    "eval": (1, 1),
}


def minimal_bytes(phase: str, numel: int, itemsize: int) -> int:
    """Bytes a phase must move at the least: the GB/s figures of benchmarks divide this."""
    reads, writes = MINIMAL_PASSES[phase]
    return (reads + writes) * numel * itemsize


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

        `invstd` (the forward's) tells how far the mean is from zero in standard deviations:
        a backend may then sum `dy * x` and subtract `mean * sum(dy)` where that is exact.
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

    def traffic(self, phase: str, numel: int, itemsize: int) -> int:
        """Bytes this backend moves for `phase` ("forward_train", "backward", "eval")."""
