"""Checks of the library's arguments: one function, and one wording, per kind of bad input.

Every message names the argument and says what was expected, then what was given:
`"<name> must be <expected>, got <given>"`. Type errors (not an int, not an array, an array of
the other library) raise `TypeError`, bad values `ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import numpy as np

from cupy_bn.arrays import array_module
from cupy_bn.dtypes import SUPPORTED as FLOAT_DTYPES
from cupy_bn.dtypes import check_float_dtype

__all__ = [
    "check_array",
    "check_array_module",
    "check_batch_count",
    "check_channel_axis",
    "check_channel_vector",
    "check_eps",
    "check_momentum",
    "check_num_features",
    "check_positive_finite",
    "check_seed",
    "check_vector_shape",
    "normalize_axis",
    "ranks_text",
    "type_name",
]


def type_name(value: Any) -> str:
    """`list` for builtins, `module.Name` for other types (`cupy.ndarray`)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def ranks_text(ranks: Iterable[int]) -> str:
    """`"2 or 3"` for ranks (2, 3)."""
    return " or ".join(str(r) for r in ranks)


def check_num_features(num_features: int) -> int:
    """The channel count of a layer or reducer: an int >= 1 (NumPy integers too, not bool)."""
    if (
        isinstance(num_features, bool)
        or not isinstance(num_features, (int, np.integer))
        or num_features < 1
    ):
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    return int(num_features)


def check_channel_axis(channel_axis: int, ranks: int | Iterable[int]) -> int:
    """`channel_axis` when it is an int naming an axis of an input of (one of) `ranks`."""
    if not isinstance(channel_axis, int) or isinstance(channel_axis, bool):
        raise TypeError(f"channel_axis must be an int, got {type_name(channel_axis)}")
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    widest = max(ranks)
    if not -widest <= channel_axis < widest:
        raise ValueError(
            f"channel_axis must be in [-{widest}, {widest}) for an input of rank "
            f"{ranks_text(ranks)}, got {channel_axis}"
        )
    return channel_axis


def normalize_axis(channel_axis: int, ndim: int) -> int:
    """`channel_axis` checked against an input of rank `ndim`, as an index in `[0, ndim)`."""
    return check_channel_axis(channel_axis, ndim) % ndim


def check_array(name: str, value: Any) -> Any:
    """`value` when it is an array (has `shape` and `dtype`)."""
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type_name(value)}")
    return value


def check_array_module(name: str, value: Any, xp: Any, reason: str, hint: str = "") -> None:
    """Raise unless `value` is an array of module `xp`; `reason` says why (`"like x"`).

    `hint` is appended to the message: what to do about it.
    """
    if xp is np and type(value) is np.ndarray:
        return
    got = array_module(value)
    if got is not xp:
        raise TypeError(
            f"{name} must be a {xp.__name__} array {reason}, got a {got.__name__} array{hint}"
        )


def check_vector_shape(name: str, value: Any, channels: int) -> None:
    """Raise unless `value` has shape `(channels,)`: one value per channel."""
    if tuple(value.shape) != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel, got {tuple(value.shape)}"
        )


def check_channel_vector(name: str, value: Any, channels: int, xp: Any) -> None:
    """A per-channel vector given with an input `x`: an array of x's module, float, `(C,)`."""
    if (
        xp is np
        and type(value) is np.ndarray
        and value.shape == (channels,)
        and value.dtype in FLOAT_DTYPES
    ):
        return  # the common case, checked in a fraction of the general path's time
    check_array(name, value)
    check_array_module(name, value, xp, "like x")
    check_float_dtype(name, value.dtype)
    check_vector_shape(name, value, channels)


def check_positive_finite(name: str, value: object, error: type[ValueError] = ValueError) -> float:
    """`value` as a float when it is a real number, finite and above 0 (eps, tolerances,
    steps); else `error` (a `ValueError` subclass, so each package keeps its error type)."""
    if type(value) is float and 0 < value < math.inf:  # the common case, without ABC checks
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise error(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_eps(eps: object, error: type[ValueError] = ValueError) -> float:
    """`eps` as a float: a finite number > 0."""
    return check_positive_finite("eps", eps, error)


def check_seed(seed: object, error: type[ValueError] = ValueError) -> int:
    """`seed` as an int >= 0 (what NumPy's generators take); else `error`."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise error(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def check_momentum(momentum: float | None, allow_none: bool = False) -> float | None:
    """`momentum` as a float in [0, 1] (or None when `allow_none`: a cumulative average)."""
    if type(momentum) is float and 0 <= momentum <= 1:  # the common case, without ABC checks
        return momentum
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, Real) or not 0 <= momentum <= 1:
        what = "a number in [0, 1] or None" if allow_none else "a number in [0, 1]"
        raise ValueError(f"momentum must be {what}, got {momentum!r}")
    return float(momentum)


def check_batch_count(count: int, where: str = "") -> None:
    """Raise unless a training batch has more than one value per channel (the unbiased
    variance divides by `count - 1`); `where` qualifies the count (`" over all processes"`)."""
    if count < 2:
        raise ValueError(
            f"a training batch needs more than one value per channel{where}, got {count}"
        )


#: The activations `batch_norm` and the layers fuse after the normalization (and residual).
ACTIVATIONS = (None, "relu")


def check_activation(activation: object) -> str | None:
    """`activation` when it is one of ACTIVATIONS: None or "relu"."""
    if activation is None or (type(activation) is str and activation == "relu"):
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None or 'relu', got {type_name(activation)}")
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")
