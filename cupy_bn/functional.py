"""Batch normalization as functions: training and inference forward, and backward.

Composed from the first five primitives of the backend (`cupy_bn.backends.base`; the other
two make the double backward, `cupy_bn.double_backward`):

- training: `batch_stats` -> `update_running` -> `apply` (scale = gamma * invstd,
  shift = beta - mean * scale);
- inference: `apply` with the running statistics;
- backward: `backward_reduce` -> `backward_apply` (through the batch statistics), or `apply`
  on `dy` alone when the statistics were fixed (inference mode).

Fused activation and residual (`activation="relu"`, `residual=z`): `y = act(bn(x) + z)`,
ResNet's BN + add + ReLU, as one `apply_activation` pass where the backend has the
`FusedActivation` capability (both built-in backends). The backward masks `dy` with the saved
output `y` (`relu_gradient`: `dy` where `y > 0`), which is also the residual's gradient, and
runs the usual backward on it. Saving `y` rather than a boolean mask costs the forward
nothing (no extra pass or buffer: `y` is the output the caller holds anyway); the backward
reads it once. `y` must therefore not be modified in place before the backward.

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

import functools
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from cupy_bn import deferred
from cupy_bn.arrays import array_module, to_host
from cupy_bn.backends import (
    Backend,
    get_backend,
    has_fused_activation,
    has_fused_backward,
    has_fused_statistics,
)
from cupy_bn.dtypes import accumulation_dtype, check_float_dtype
from cupy_bn.layout import View, canonical
from cupy_bn.renorm import DEFAULT_DMAX, DEFAULT_RMAX, RenormCorrection, RenormPrior, renorm_prior
from cupy_bn.renorm import PLAIN as RENORM_PLAIN
from cupy_bn.validation import (
    check_activation,
    check_array,
    check_array_module,
    check_batch_count,
    check_channel_vector,
    check_eps,
    check_momentum,
)

if TYPE_CHECKING:
    from cupy_bn.ghost import GhostSaved

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


@dataclass(slots=True)
class SavedForBackward:
    """What `batch_norm` keeps for `batch_norm_backward` (read-only by convention).

    `mean` and `invstd` are the statistics the forward normalized with (batch statistics, or
    the running ones in inference mode), in the accumulation dtype. `count` is the number of
    values per channel they were computed over (global under sync BN).

    Fused forms: `activation` is the forward's (None or "relu"), `output` the canonical view
    of its `y` (kept for the ReLU's backward; None without activation), `residual_dtype` the
    residual's dtype (None without residual: the backward then returns three gradients).
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
    activation: str | None = None
    output: View | None = None
    residual_dtype: Any = None
    renorm: RenormCorrection | None = None
    """`r` and `d` of a batch-renormalization forward (`cupy_bn.renorm`), else None."""


def restore_saved(
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None = None,
    bias_dtype: Any = None,
    *,
    batch_statistics: bool = True,
    channel_axis: int = 1,
    backend: str | Backend = "auto",
) -> SavedForBackward:
    """The `SavedForBackward` of a forward of `x` that normalized with `mean` and `invstd`.

    For callers that keep arrays, not Python objects, between a forward and its backward
    (PyTorch's custom ops pass tensors only): `mean` and `invstd` are that forward's
    `saved.mean` and `saved.invstd`, in the accumulation dtype of `x`; `bias_dtype` is the
    bias's dtype (None without bias); `batch_statistics` is the forward's `training`. The
    result feeds `batch_norm_backward` as the forward's own `saved` does (no reducer).
    """
    view = canonical(check_array("x", x), channel_axis)
    xp = array_module(x)
    acc = accumulation_dtype(x.dtype)
    for name, v in (("mean", mean), ("invstd", invstd)):
        check_channel_vector(name, v, view.num_channels, xp)
        if v.dtype != acc:
            raise TypeError(
                f"{name} must have dtype {acc}, the accumulation dtype of {x.dtype} input, "
                f"got {v.dtype}"
            )
    if weight is not None:
        check_channel_vector("weight", weight, view.num_channels, xp)
    return SavedForBackward(
        view,
        mean,
        invstd,
        weight,
        None if bias_dtype is None else check_float_dtype("bias_dtype", bias_dtype),
        bool(batch_statistics),
        view.count,
        get_backend(backend, x),
    )


def check_finite_stats(mean: Array, var: Array) -> None:
    """Raise FloatingPointError naming the channels whose batch statistics are NaN or Inf."""
    xp = array_module(mean)
    if xp is np and math.isfinite(np.dot(mean, var)):
        return  # a NaN or Inf makes the dot product non-finite (an overflow: checked below)
    finite = xp.isfinite(mean) & xp.isfinite(var)
    if not bool(finite.all()):
        raise deferred.nonfinite_error((~to_host(finite)).nonzero()[0])


def _defers_checks(be: Backend) -> bool:
    """Whether `be` checks on its device without waiting (`cupy_bn.deferred`)."""
    return getattr(be, "defers_checks", False) and deferred.deferred_checks_enabled()


def _check_statistics(be: Backend, mean: Array, var: Array, view: View) -> None:
    """`check_finite_stats` now, or queued on the device by a backend that `defers_checks`
    (`cupy_bn.deferred`; it leaves the running statistics unchanged itself)."""
    if _defers_checks(be):
        be.report_nonfinite(mean, var, f"input shape {view.shape}, backend {be.name!r}")
    else:
        check_finite_stats(mean, var)


def _scale_shift(
    mean: Array, invstd: Array, weight: Array | None, bias: Array | None, acc
) -> tuple[Array, Array]:
    """`scale = gamma * invstd`, `shift = beta - mean * scale` (gamma 1 and beta 0 if absent)."""
    scale = invstd if weight is None else _in_dtype(weight, acc) * invstd
    shift = mean * scale
    if bias is None:
        return scale, -shift
    return scale, _in_dtype(bias, acc) - shift


def _in_dtype(a: Array, dtype) -> Array:
    """`a` itself when it has `dtype`, else a converted copy (no call in the common case)."""
    return a if a.dtype == dtype else a.astype(dtype)


def _invstd(var: Array, eps: float, acc) -> Array:
    """`1 / sqrt(var + eps)` in the accumulation dtype."""
    root = _in_dtype(var, acc) + eps  # a Python float keeps the array's dtype
    xp = array_module(root)
    xp.sqrt(root, out=root)
    return xp.divide(1.0, root, out=root)


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
    activation: str | None = None,
    residual: Array | None = None,
    virtual_batch: int | None = None,
    renorm: bool = False,
    rmax: float = DEFAULT_RMAX,
    dmax: float = DEFAULT_DMAX,
) -> tuple[Array, SavedForBackward | GhostSaved]:
    """Normalize `x` per channel; return `(y, saved)` where `saved` feeds the backward.

    x: rank >= 2, channels on `channel_axis` (1: NCHW-style, -1: channels-last / dense (N, C)).
    training=True normalizes with the batch statistics and, when `running_mean`/`running_var`
    are given, updates them in place: `running = (1 - momentum) * running + momentum * batch`
    with the unbiased batch variance. training=False normalizes with the running statistics.
    `y` has the dtype, shape and memory order of `x`; statistics accumulate in float32
    (float64 for float64 input). With a `reducer`, training statistics are those of the
    batches of all processes together (sync batch norm).

    Fused forms: `y = act(bn(x) + residual)`, with `residual` (None: none) an array of x's
    shape, module and a float dtype (converted to x's dtype when it differs), added before the
    activation, and `activation` None or "relu". The sum and the ReLU are taken in the
    accumulation dtype and rounded once. The backward then also returns the residual's
    gradient; the ReLU's backward reads `y`, which must not be modified in place before it.

    Ghost batches: `virtual_batch=G` (None: off) normalizes each chunk of `G` consecutive
    samples along axis 0 with its own statistics in training mode; `saved` is then a
    `cupy_bn.ghost.GhostSaved`. Last chunk, running statistics and the rest: `cupy_bn.ghost`.

    Batch renormalization (`renorm=True`, training only; `cupy_bn.renorm` has the formulas and
    the defaults' reasons): `y = gamma * (xhat * r + d) + beta` with
    `r = clip(sigma_B / sigma, 1/rmax, rmax)` and `d = clip((mean_B - running_mean) / sigma,
    -dmax, dmax)` from the running statistics before this call's update, constants of the
    backward. Needs `running_mean`/`running_var`; `rmax >= 1`, `dmax >= 0`, both finite;
    `rmax=1, dmax=0` is batch norm. In inference mode (`training=False`) it changes nothing.
    With `virtual_batch`, each chunk is renormalized against the running statistics.
    """
    if renorm is False and rmax is DEFAULT_RMAX and dmax is DEFAULT_DMAX:
        options = RENORM_PLAIN  # the defaults, as given: nothing to check
    else:
        options = (renorm, rmax, dmax)
    run = _batch_norm if virtual_batch is None else _ghost_forward(virtual_batch)
    if reducer is not None and training:
        with reducer.collective("stats"):
            return run(
                x, weight, bias, running_mean, running_var, training, momentum, eps,
                channel_axis, backend, reducer, activation, residual, options,
            )  # fmt: skip
    return run(
        x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis,
        backend, reducer, activation, residual, options,
    )  # fmt: skip


def _ghost_forward(virtual_batch: int):
    """`cupy_bn.ghost`'s forward for `virtual_batch`, with `_batch_norm`'s arguments."""
    from cupy_bn.ghost import ghost_batch_norm  # it builds on this module

    return functools.partial(ghost_batch_norm, virtual_batch=virtual_batch)


def _batch_norm(
    x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis, backend,
    reducer, activation=None, residual=None, renorm=RENORM_PLAIN,
) -> tuple[Array, SavedForBackward]:  # fmt: skip
    """`batch_norm`'s work, inside the reducer's collective when there is one."""
    deferred.poll()
    view = canonical(check_array("x", x), channel_axis)
    xp = array_module(x)
    activation = check_activation(activation)
    residual_view = None if residual is None else _residual_view(view, residual, xp)
    channels = view.data.shape[1]
    for name, v in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if v is not None:
            check_channel_vector(name, v, channels, xp)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    count = view.count
    if training and reducer is None and count < 2:
        check_batch_count(count, f" (input shape {view.shape})")
    be = get_backend(backend, x)
    acc = accumulation_dtype(x.dtype)
    if renorm is RENORM_PLAIN:
        prior = None
    elif isinstance(renorm, RenormPrior):  # ghost batches: the whole call's, for every chunk
        prior = renorm
    else:
        prior = renorm_prior(
            renorm, training, running_mean, running_var, acc, not _defers_checks(be)
        )

    if not training:
        mean = running_mean.astype(acc)
        invstd = _invstd(running_var, eps, acc)
        scale, shift = _scale_shift(mean, invstd, weight, bias, acc)
    elif reducer is None and has_fused_statistics(be):
        # one launch: statistics, scale/shift and the running update
        mean, var, invstd, scale, shift = be.train_statistics(
            view, weight, bias, running_mean, running_var, momentum, eps
        )
        _check_statistics(be, mean, var, view)  # the fused update skips non-finite statistics
    else:
        mean, var = be.batch_stats(view)
        if reducer is not None:
            count, mean, var = reducer.merge_stats(count, mean, var)
            check_batch_count(count, " over all processes")
        _check_statistics(be, mean, var, view)
        invstd = _invstd(var, eps, acc)
        if running_mean is not None:
            be.update_running(running_mean, running_var, mean, var, count, momentum)
        scale, shift = _scale_shift(mean, invstd, weight, bias, acc)
    correction = None if prior is None else prior.correction(mean, var, eps)
    if correction is not None:  # batch norm with weight gamma * r and bias beta + gamma * d
        affine = correction.effective_affine(weight, bias, acc)
        scale, shift = _scale_shift(mean, invstd, *affine, acc)

    if activation is None and residual_view is None:
        out = be.apply(view, scale, shift)
    else:
        out = _apply_activation(be, view, scale, shift, residual_view, activation == "relu")
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
        activation,
        None if activation is None else _like(view, out),
        None if residual is None else residual.dtype,
        correction,
    )
    return view.restore(out), saved


def _like(view: View, data: Array) -> View:
    """A view of canonical `data` in `view`'s layout and caller's shape."""
    return View(view.layout, data, view.shape, view.channel_axis, view.channels_last_memory)


def _residual_view(view: View, residual: Array, xp) -> View:
    """The canonical view of `residual` in x's layout and dtype; raises before any work."""
    check_array("residual", residual)
    check_array_module("residual", residual, xp, "like x")
    r = view.match(residual, "residual")
    dtype = view.data.dtype
    return r if r.data.dtype == dtype else _like(view, r.data.astype(dtype))


def _apply_activation(
    be: Backend, view: View, scale: Array, shift: Array, residual: View | None, relu: bool
) -> Array:
    """`act(x * scale + shift + residual)` in canonical shape: the backend's fused pass, or
    `apply` and array operations in the accumulation dtype (one rounding more for 16-bit)."""
    if has_fused_activation(be):
        return be.apply_activation(view, scale, shift, residual, relu)
    out = be.apply(view, scale, shift)
    if residual is None and not relu:
        return out
    xp, acc = be.xp, accumulation_dtype(view.data.dtype)
    total = out.astype(acc)
    if residual is not None:
        total += residual.data
    if relu:
        xp.maximum(total, 0, out=total)
    return total.astype(out.dtype, copy=False)


def batch_norm_backward(
    dy: Array, saved: SavedForBackward | GhostSaved
) -> tuple[Array | None, ...]:
    """Gradients `(dx, dweight, dbias)` of the forward that produced `saved`, and
    `(dx, dweight, dbias, dresidual)` when that forward had a residual.

    dweight/dbias are None without weight/bias. Under sync batch norm they are this process's
    share (sum them across processes, as data-parallel training does); dx is exact globally.
    With `activation="relu"` the gradient entering the normalization is `dy` where `y > 0`
    (zero at the kink, as PyTorch's ReLU); `dresidual` is that gradient in the residual's
    dtype, with `dy`'s shape (without activation it may share memory with `dy`, as the
    gradient of an addition does).
    """
    if type(saved) is not SavedForBackward:  # a ghost-batch forward's (cupy_bn.ghost)
        from cupy_bn.ghost import GhostSaved, ghost_batch_norm_backward

        if isinstance(saved, GhostSaved):
            return ghost_batch_norm_backward(dy, saved)
    with grads_collective(saved):
        return _batch_norm_backward(dy, saved)


def grads_collective(saved: SavedForBackward) -> AbstractContextManager[None]:
    """The reducer's "grads" collective that a backward of `saved` runs in (sync batch norm in
    training mode), else a context that does nothing."""
    reducer = saved.reducer
    if reducer is not None and saved.batch_statistics:
        return reducer.collective("grads")
    return nullcontext()


def _parameter_gradients(
    saved: SavedForBackward, sum_dy: Array, sum_dy_xmu: Array
) -> tuple[Array | None, Array | None]:
    """`dweight = sum(dy * (x - mean)) * invstd` (renorm: `cupy_bn.renorm`'s) and
    `dbias = sum(dy)` (None without them)."""
    dweight = None
    if saved.weight is not None:
        correction = saved.renorm
        grad = (
            sum_dy_xmu * saved.invstd
            if correction is None
            else correction.weight_gradient(sum_dy, sum_dy_xmu, saved.invstd)
        )
        dweight = grad.astype(saved.weight.dtype)
    dbias = None if saved.bias_dtype is None else sum_dy.astype(saved.bias_dtype)
    return dweight, dbias


def _batch_norm_backward(dy: Array, saved: SavedForBackward) -> tuple[Array | None, ...]:
    deferred.poll()
    view = saved.view
    dyv = view.match(check_array("dy", dy), "dy")
    be = saved.backend
    if saved.activation is not None:
        dyv = _like(view, _relu_gradient(be, dyv, saved.output))
    grads = _normalization_backward(dyv, saved)
    if saved.residual_dtype is None:
        return grads
    dresidual = view.restore(dyv.data.astype(saved.residual_dtype, copy=False))
    return *grads, dresidual


def _relu_gradient(be: Backend, dy: View, y: View) -> Array:
    """`dy` where `y > 0`, else zero (canonical shape, dy's dtype)."""
    if has_fused_activation(be):
        return be.relu_gradient(dy, y)
    return be.xp.where(y.data > 0, dy.data, be.xp.zeros((), dy.data.dtype))


def _normalization_backward(
    dyv: View, saved: SavedForBackward
) -> tuple[Array, Array | None, Array | None]:
    """`(dx, dweight, dbias)` of the normalization alone, for its gradient `dyv`."""
    view = saved.view
    be = saved.backend
    acc = accumulation_dtype(view.data.dtype)
    xp = be.xp
    gamma = xp.ones(view.num_channels, acc) if saved.weight is None else saved.weight.astype(acc)
    if saved.renorm is not None:
        gamma = saved.renorm.backward_gamma(gamma)
    if saved.batch_statistics and saved.reducer is None and has_fused_backward(be):
        sum_dy, sum_dy_xmu, dx = be.backward(
            dyv, view, saved.mean, saved.invstd, gamma, saved.count
        )
        return view.restore(dx), *_parameter_gradients(saved, sum_dy, sum_dy_xmu)
    need_sums = saved.batch_statistics or saved.weight is not None or saved.bias_dtype is not None
    if need_sums:
        sum_dy, sum_dy_xmu = be.backward_reduce(dyv, view, saved.mean, invstd=saved.invstd)
        dweight, dbias = _parameter_gradients(saved, sum_dy, sum_dy_xmu)
    else:
        dweight = dbias = None
    if saved.batch_statistics:
        if saved.reducer is not None:
            sum_dy, sum_dy_xmu = saved.reducer.sum_grads(sum_dy, sum_dy_xmu)
        dx = be.backward_apply(
            dyv, view, saved.mean, saved.invstd, gamma, sum_dy, sum_dy_xmu, saved.count
        )
    else:
        dx = be.apply(dyv, gamma * saved.invstd, xp.zeros(view.num_channels, acc))
    return view.restore(dx), dweight, dbias
