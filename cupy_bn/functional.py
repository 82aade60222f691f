"""Batch normalization as functions: training and inference forward, and backward.

Composed from the five primitives of the backend (`cupy_bn.backends.base`):

- training: `batch_stats` -> `update_running` -> `apply` (scale = gamma * invstd,
  shift = beta - mean * scale);
- inference: `apply` with the running statistics;
- backward: `backward_reduce` -> `backward_apply` (through the batch statistics), or `apply`
  on `dy` alone when the statistics were fixed (inference mode).

Conventions follow PyTorch: `momentum` is the weight of the new batch,
`running = (1 - momentum) * running + momentum * batch` (Keras, Chainer and Flax use the
opposite convention), and the running variance is updated with the unbiased batch variance.

A `reducer` turns per-process statistics into global ones (sync batch norm): it has
`merge_stats(count, mean, var) -> (count, mean, var)`,
`sum_grads(sum_dy, sum_dy_xmu) -> (sum_dy, sum_dy_xmu)`, and `collective(phase)`, a context
the training forward ("stats") and backward ("grads") run in, so that a process whose call
fails before reaching the reducer still takes part in the collective and no process waits
forever.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal, Protocol

from cupy_bn.backends import Backend, FusedTrainStatistics, get_backend
from cupy_bn.dtypes import accumulation_dtype, check_float_dtype
from cupy_bn.layout import View, array_module, canonical

Array = Any


class StatsReducer(Protocol):
    """Combines statistics and gradient sums across processes (see `cupy_bn.distributed`)."""

    def merge_stats(self, count: int, mean: Array, var: Array) -> tuple[int, Array, Array]: ...

    def sum_grads(self, sum_dy: Array, sum_dy_xmu: Array) -> tuple[Array, Array]: ...

    def collective(self, phase: Literal["stats", "grads"]) -> AbstractContextManager[None]:
        """Context around a call that reaches `merge_stats` ("stats") or `sum_grads` ("grads").

        If the block raises before that method ran, the reducer takes part in the collective on
        this process's behalf (announcing the failure) before the exception propagates.
        """
        ...


@dataclass(frozen=True)
class SavedForBackward:
    """What `batch_norm` keeps for `batch_norm_backward`.

    `mean` and `invstd` are the statistics the forward normalized with (batch statistics, or
    the running ones in inference mode), in the accumulation dtype. `count` is the number of
    values per channel they were computed over (global under sync BN).
    """

    view: View
    mean: Array
    invstd: Array
    weight: Array | None
    bias_dtype: Any
    batch_statistics: bool
    count: int
    backend: Backend
    reducer: StatsReducer | None = None


def check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum: float | None, allow_none: bool = False) -> float | None:
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, Real) or not 0 <= momentum <= 1:
        what = "a number in [0, 1] or None" if allow_none else "a number in [0, 1]"
        raise ValueError(f"momentum must be {what}, got {momentum!r}")
    return float(momentum)


def _check_vector(name: str, v: Array | None, channels: int, xp) -> None:
    if v is None:
        return
    if array_module(v) is not xp:
        raise TypeError(
            f"{name} must be a {xp.__name__} array like x, "
            f"got {type(v).__module__}.{type(v).__name__}"
        )
    check_float_dtype(name, v.dtype)
    if tuple(v.shape) != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) for {channels} channels, got {tuple(v.shape)}"
        )


def _as_array(x: Array) -> Array:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"x must be a NumPy or CuPy array, got {type(x).__name__}")
    return x


def _describe_channels(bad) -> str:
    shown = ", ".join(str(int(c)) for c in bad[:10])
    return shown + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")


def check_finite_stats(mean: Array, var: Array) -> None:
    """Raise FloatingPointError naming the channels whose batch statistics are NaN or Inf."""
    xp = array_module(mean)
    finite = xp.isfinite(mean) & xp.isfinite(var)
    if not bool(finite.all()):
        import numpy

        bad = numpy.flatnonzero(~numpy.asarray(finite.get() if xp.__name__ == "cupy" else finite))
        raise FloatingPointError(
            f"batch statistics are not finite in channel(s) {_describe_channels(bad)}; "
            "the input holds NaN or Inf (running statistics left unchanged)"
        )


def _scale_shift(
    mean: Array, invstd: Array, weight: Array | None, bias: Array | None, acc
) -> tuple[Array, Array]:
    """`scale = gamma * invstd`, `shift = beta - mean * scale` (gamma 1 and beta 0 if absent)."""
    scale = invstd if weight is None else weight.astype(acc) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.astype(acc)
    return scale, shift


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
    backend: str | Backend = "auto",
    *,
    reducer: StatsReducer | None = None,
) -> tuple[Array, SavedForBackward]:
    """Normalize `x` per channel; return `(y, saved)` where `saved` feeds the backward.

    x: rank >= 2, channels on `channel_axis` (1: NCHW-style, -1: channels-last / dense (N, C)).
    training=True normalizes with the batch statistics and, when `running_mean`/`running_var`
    are given, updates them in place: `running = (1 - momentum) * running + momentum * batch`
    with the unbiased batch variance. training=False normalizes with the running statistics.
    `y` has the dtype, shape and memory order of `x`; statistics accumulate in float32
    (float64 for float64 input). With a `reducer`, training statistics are those of the
    batches of all processes together (sync batch norm).
    """
    if reducer is not None and training:
        with reducer.collective("stats"):
            return _batch_norm(
                x,
                weight,
                bias,
                running_mean,
                running_var,
                training,
                momentum,
                eps,
                channel_axis,
                backend,
                reducer,
            )
    return _batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        channel_axis,
        backend,
        reducer,
    )


def _batch_norm(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    channel_axis,
    backend,
    reducer,
) -> tuple[Array, SavedForBackward]:
    x = _as_array(x)
    view = canonical(x, channel_axis)
    xp = array_module(x)
    channels = view.num_channels
    for name, v in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        _check_vector(name, v, channels, xp)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    be = get_backend(backend, x)
    acc = accumulation_dtype(x.dtype)

    if training:
        if reducer is None and view.count < 2:
            raise ValueError(
                f"a training batch needs more than one value per channel, got "
                f"input shape {view.shape} ({view.count} value(s) per channel)"
            )
        if reducer is None and isinstance(be, FusedTrainStatistics):
            # one launch: statistics, scale/shift and the running update
            mean, var, invstd, scale, shift = be.train_statistics(
                view, weight, bias, running_mean, running_var, momentum, eps
            )
            check_finite_stats(mean, var)  # the fused update skips non-finite statistics
            count = view.count
        else:
            mean, var = be.batch_stats(view)
            count = view.count
            if reducer is not None:
                count, mean, var = reducer.merge_stats(count, mean, var)
                if count < 2:
                    raise ValueError(
                        f"a training batch needs more than one value per channel "
                        f"over all processes, got {count}"
                    )
            check_finite_stats(mean, var)
            invstd = (1.0 / xp.sqrt(var.astype(acc) + acc.type(eps))).astype(acc)
            if running_mean is not None:
                be.update_running(running_mean, running_var, mean, var, count, momentum)
            scale, shift = _scale_shift(mean, invstd, weight, bias, acc)
    else:
        count = view.count
        mean = running_mean.astype(acc)
        invstd = (1.0 / xp.sqrt(running_var.astype(acc) + acc.type(eps))).astype(acc)
        scale, shift = _scale_shift(mean, invstd, weight, bias, acc)

    y = view.restore(be.apply(view, scale, shift))
    saved = SavedForBackward(
        view,
        mean,
        invstd,
        weight,
        None if bias is None else bias.dtype,
        training,
        count,
        be,
        reducer,
    )
    return y, saved


def batch_norm_backward(
    dy: Array, saved: SavedForBackward
) -> tuple[Array, Array | None, Array | None]:
    """Gradients `(dx, dweight, dbias)` of the forward that produced `saved`.

    dweight/dbias are None without weight/bias. Under sync batch norm they are this process's
    share (sum them across processes, as data-parallel training does); dx is exact globally.
    """
    if saved.reducer is not None and saved.batch_statistics:
        with saved.reducer.collective("grads"):
            return _batch_norm_backward(dy, saved)
    return _batch_norm_backward(dy, saved)


def _batch_norm_backward(
    dy: Array, saved: SavedForBackward
) -> tuple[Array, Array | None, Array | None]:
    dy = _as_array(dy)
    view = saved.view
    dyv = view.match(dy, "dy")
    be = saved.backend
    acc = accumulation_dtype(view.data.dtype)
    xp = be.xp
    gamma = xp.ones(view.num_channels, acc) if saved.weight is None else saved.weight.astype(acc)
    need_sums = saved.batch_statistics or saved.weight is not None or saved.bias_dtype is not None
    if need_sums:
        sum_dy, sum_dy_xmu = be.backward_reduce(dyv, view, saved.mean, invstd=saved.invstd)
    dweight = (
        None if saved.weight is None else (sum_dy_xmu * saved.invstd).astype(saved.weight.dtype)
    )
    dbias = None if saved.bias_dtype is None else sum_dy.astype(saved.bias_dtype)
    if saved.batch_statistics:
        if saved.reducer is not None:
            sum_dy, sum_dy_xmu = saved.reducer.sum_grads(sum_dy, sum_dy_xmu)
        dx = be.backward_apply(
            dyv, view, saved.mean, saved.invstd, gamma, sum_dy, sum_dy_xmu, saved.count
        )
    else:
        dx = be.apply(dyv, gamma * saved.invstd, xp.zeros(view.num_channels, acc))
    return view.restore(dx), dweight, dbias
