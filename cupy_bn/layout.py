"""Canonical views of batch-norm inputs: every rank and channel axis becomes NCS or MC.

- NCS (channels-first): `(N, C, S)` where N is the product of the axes before the channel
  axis and S the product of the axes after it (PyTorch's NCL, NCHW, NCDHW).
- MC (channels-last): `(M, C)` where M is the product of all other axes (NHWC, and dense
  `(N, C)` input).

Contiguous input is viewed without a copy. An input whose channel axis is logically not last but
whose memory is channels-last (PyTorch's `channels_last` format, a transposed NHWC array) is
viewed as MC, and outputs come back in the same memory order. Anything else is copied once.
Kernels only ever see the canonical array: no rank or axis arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Literal

import numpy as np

from cupy_bn.arrays import array_module
from cupy_bn.dtypes import check_float_dtype
from cupy_bn.validation import normalize_axis

NCS: Literal["NCS"] = "NCS"
MC: Literal["MC"] = "MC"


@dataclass(slots=True)
class View:
    """An input seen in canonical layout (read-only by convention: a plain slots class, since
    it is built on every call and a frozen dataclass costs a microsecond to build).

    `data` is C-contiguous with shape `(N, C, S)` for NCS or `(M, C)` for MC. `shape` and
    `channel_axis` describe the caller's array; `channels_last_memory` says whether `data` is the
    caller's memory read with the channel axis moved last.
    """

    layout: Literal["NCS", "MC"]
    data: Any
    shape: tuple[int, ...]
    channel_axis: int
    channels_last_memory: bool

    @property
    def num_channels(self) -> int:
        return self.data.shape[1]

    @property
    def count(self) -> int:
        """Values per channel: N*S for NCS, M for MC."""
        return self.data.size // self.num_channels if self.num_channels else 0

    def restore(self, data: Any) -> Any:
        """View an array of the canonical shape (an output) in the caller's shape and order."""
        if self.channels_last_memory:
            moved = self.shape[: self.channel_axis] + self.shape[self.channel_axis + 1 :]
            xp = array_module(data)
            return xp.moveaxis(
                data.reshape(moved + (self.shape[self.channel_axis],)), -1, self.channel_axis
            )
        return data.reshape(self.shape)

    def match(self, other: Any, name: str) -> View:
        """Canonical view of `other` (e.g. `dy`) in this view's layout; it must have our shape."""
        if tuple(other.shape) != self.shape:
            raise ValueError(f"{name} must have the input's shape {self.shape}, got {other.shape}")
        check_float_dtype(name, other.dtype)
        xp = array_module(other)
        if self.channels_last_memory:
            data = xp.ascontiguousarray(xp.moveaxis(other, self.channel_axis, -1))
        else:
            data = xp.ascontiguousarray(other)
        return View(
            self.layout,
            data.reshape(self.data.shape),
            self.shape,
            self.channel_axis,
            self.channels_last_memory,
        )


def canonical(x: Any, channel_axis: int = 1) -> View:
    """View `x` (rank >= 2, float dtype) as NCS or MC; see the module docstring."""
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(
            f"x must have rank >= 2 (batch and channel axes), got shape {getattr(x, 'shape', None)}"
        )
    check_float_dtype("x", x.dtype)
    shape = x.shape if type(x) is np.ndarray else tuple(int(d) for d in x.shape)
    ndim = len(shape)
    if type(channel_axis) is int and -ndim <= channel_axis < ndim:
        axis = channel_axis % ndim
    else:
        axis = normalize_axis(channel_axis, ndim)  # raises the error
    channels = shape[axis]
    outer, inner = prod(shape[:axis]), prod(shape[axis + 1 :])
    if type(x) is np.ndarray and x.flags.c_contiguous:  # the common case: no copy, no lookup
        if inner == 1:
            return View(MC, x.reshape(outer, channels), shape, axis, False)
        return View(NCS, x.reshape(outer, channels, inner), shape, axis, False)
    xp = array_module(x)
    if inner == 1 or x.flags.c_contiguous:
        data = xp.ascontiguousarray(x)
        if inner == 1:
            return View(MC, data.reshape(outer, channels), shape, axis, False)
        return View(NCS, data.reshape(outer, channels, inner), shape, axis, False)
    moved = xp.moveaxis(x, axis, -1)
    if moved.flags.c_contiguous:
        return View(MC, moved.reshape(outer * inner, channels), shape, axis, True)
    data = xp.ascontiguousarray(x)
    return View(NCS, data.reshape(outer, channels, inner), shape, axis, False)
