"""Folding eval-mode batch norm into the conv / linear / conv-transpose layer before it.

In eval mode batch norm is a per-channel affine map, `y = (z - mean) * s + beta` with
`s = gamma / sqrt(running_var + eps)`, applied to the layer output `z = W * x + b`. Both maps
are linear in the output channel, so they compose into one layer:

    W' = W * s   (per output channel)        b' = (b - mean) * s + beta

A missing layer bias counts as zero (the folded layer gets one); `affine=False` batch norm has
`gamma = 1, beta = 0`. Everything is computed in float64 and stored in the layer's dtypes.

Weight layouts are PyTorch's: Linear `(out, in)`, Conv1d/2d/3d `(out, in/groups, *k)`,
ConvTranspose1d/2d/3d `(in, out/groups, *k)`. For a transposed convolution with `groups > 1`,
output channel `g * (out/groups) + j` is column `j` of the rows of group `g`, so the scale is
applied per (group, column), not along axis 1 alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from cupy_bn.validation import check_eps


class FoldError(ValueError):
    """The arrays cannot be folded as asked (the message names the offending array or module)."""


class FoldDtypeError(FoldError, TypeError):
    """An array has a dtype that cannot be folded (integer, bool, complex, object)."""


def _float_array(name: str, value: ArrayLike) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise FoldDtypeError(f"{name}: expected a floating-point array, got dtype {array.dtype}")
    return array


def _channel_vector(name: str, value: ArrayLike, channels: int) -> np.ndarray:
    vector = _float_array(name, value)
    if vector.shape != (channels,):
        raise FoldError(f"{name}: expected shape ({channels},), got {vector.shape}")
    if not np.all(np.isfinite(vector)):
        bad = np.flatnonzero(~np.isfinite(vector))[:5].tolist()
        raise FoldError(f"{name}: non-finite values at channels {bad}")
    return vector


def _bn_scale_shift(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    channels: int,
    names: Mapping[str, str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate batch-norm statistics; return float64 (scale, mean, beta)."""
    eps = check_eps(eps, FoldError)
    mean = _channel_vector(names["running_mean"], running_mean, channels).astype(np.float64)
    var = _channel_vector(names["running_var"], running_var, channels).astype(np.float64)
    if np.any(var < 0):
        bad = np.flatnonzero(var < 0)[:5].tolist()
        raise FoldError(f"{names['running_var']}: negative variance at channels {bad}")
    g = (
        np.ones(channels)
        if gamma is None
        else _channel_vector(names["gamma"], gamma, channels).astype(np.float64)
    )
    b = (
        np.zeros(channels)
        if beta is None
        else _channel_vector(names["beta"], beta, channels).astype(np.float64)
    )
    return g / np.sqrt(var + eps), mean, b


def _store(name: str, value64: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        stored = value64.astype(dtype)
    if not np.all(np.isfinite(stored)) and np.all(np.isfinite(value64)):
        raise FoldError(f"{name}: folded values overflow {np.dtype(dtype).name}")
    return stored


def fold_conv_bn(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode batch norm into the convolution before it; return `(weight, bias)`.

    `weight` is `(out, in/groups, *k)`, or `(in, out/groups, *k)` with `transpose=True`
    (PyTorch's ConvTranspose layout; then `groups` must be the layer's groups). Rank 2
    (a linear layer or a 1x1 convolution without spatial axes) through 5 is accepted.
    `bias=None` means no bias; `gamma=None`/`beta=None` mean `affine=False` (1 and 0).
    The result is computed in float64; the weight keeps its dtype, the bias keeps its dtype
    (the weight's when it is created). Raises `FoldError` naming the argument on bad input.
    """
    names = {
        "weight": "weight",
        "bias": "bias",
        "running_mean": "running_mean",
        "running_var": "running_var",
        "gamma": "gamma",
        "beta": "beta",
    }
    return fold_named(
        weight, bias, running_mean, running_var, gamma, beta, eps, transpose, groups, names
    )


def fold_named(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    transpose: bool,
    groups: int,
    names: Mapping[str, str],
) -> tuple[np.ndarray, np.ndarray]:
    """`fold_conv_bn`, with error messages naming the arrays by `names` (keys of a model file)."""
    w = _float_array(names["weight"], weight)
    if not 2 <= w.ndim <= 5:
        raise FoldError(f"{names['weight']}: expected rank 2 to 5, got shape {w.shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise FoldError(f"groups: expected a positive integer, got {groups!r}")
    groups = int(groups)
    if transpose:
        if w.ndim < 3:
            raise FoldError(
                f"{names['weight']}: a transposed convolution has rank 3 to 5, got {w.shape}"
            )
        if w.shape[0] % groups:
            raise FoldError(
                f"{names['weight']}: {w.shape[0]} input channels (axis 0) are not divisible "
                f"by groups={groups}"
            )
        channels = w.shape[1] * groups
    else:
        channels = w.shape[0]
        if channels % groups:
            raise FoldError(
                f"{names['weight']}: {channels} output channels are not divisible by "
                f"groups={groups}"
            )
    scale, mean, beta64 = _bn_scale_shift(
        running_mean, running_var, gamma, beta, eps, channels, names
    )
    if bias is None:
        b64 = np.zeros(channels)
        bias_dtype = w.dtype
    else:
        b = _float_array(names["bias"], bias)
        if b.shape != (channels,):
            raise FoldError(f"{names['bias']}: expected shape ({channels},), got {b.shape}")
        b64 = b.astype(np.float64)
        bias_dtype = b.dtype

    folded_w = scale_output_channels(w.astype(np.float64), scale, transpose, groups)
    folded_b = (b64 - mean) * scale + beta64
    return (
        _store(names["weight"], folded_w, w.dtype),
        _store(names["bias"], folded_b, bias_dtype),
    )


def scale_output_channels(
    weight: np.ndarray, scale: np.ndarray, transpose: bool = False, groups: int = 1
) -> np.ndarray:
    """`weight` with output channel `c` multiplied by `scale[c]`.

    A linear or convolution weight `(out, in/groups, *k)` scales along axis 0. A transposed
    convolution's `(in, out/groups, *k)` holds output channel `g * (out/groups) + j` in column
    `j` of the rows of group `g`, so it scales per (group, column).
    """
    ones = (1,) * (weight.ndim - 2)
    if not transpose:
        return weight * scale.reshape(weight.shape[0], 1, *ones)
    per_group = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    per_group = per_group * scale.reshape(groups, 1, weight.shape[1], *ones)
    return per_group.reshape(weight.shape)


def fold_linear_bn(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode `BatchNorm1d` into the `Linear` layer before it (`weight` `(out, in)`).

    Same conventions as `fold_conv_bn`; returns `(weight, bias)`.
    """
    w = _float_array("weight", weight)
    if w.ndim != 2:
        raise FoldError(f"weight: a linear layer's weight is (out, in), got shape {w.shape}")
    return fold_conv_bn(w, bias, running_mean, running_var, gamma, beta, eps)
