"""The CPU backend with compiled loops: the NumPy backend's primitives as numba kernels.

Where numba is installed (`pip install cupy-bn[cpu]`), `backend="auto"` sends NumPy arrays
here. float32 and float64 tensors run `cupy_bn.backends.numba_kernels`: the statistics in two
passes over `x` (the second from cache for a channels-first channel), `apply` and the input
gradient in one, the training backward of a channels-first tensor fused channel by channel.
The training forward's per-channel step (invstd, scale, shift, the running update) is one
compiled call too (`FusedTrainStatistics`). Everything else (float16/bfloat16 data, the fused
activation and residual, the double backward) is the NumPy backend's, which this class
extends.

Threads. A tensor of at least `PARALLEL_MIN_ELEMENTS` values is cut into one range per core
(channels for NCS, row chunks for MC); the ranges run on the NumPy backend's thread pool
(`tiling.run_parallel`), one kernel call each, with the GIL released. Smaller ones run on
the calling thread (a channels-first tensor with fewer channels than cores uses fewer cores).
No numba threading layer is involved, so calls from several threads at once and `fork` behave
as with the NumPy backend.

Kernels compile on first use for each dtype (a few seconds in all) and are cached on disk
(numba's `cache=True`: next to the module, or numba's user cache directory where that is
read-only), so later processes load them in milliseconds.
"""

from __future__ import annotations

import numpy as np

from cupy_bn.backends import numba_kernels as kernels
from cupy_bn.backends import tiling
from cupy_bn.backends.base import Array
from cupy_bn.backends.numpy_backend import NumpyBackend, dx_coefficients, empty_unaliased
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.intmath import ceil_div
from cupy_bn.layout import NCS, View

#: Tensors of at least this many values are shared among the cores: handing ranges to the pool
#: costs 70-100 us per pass on a 2-core VM, and from 2^20 values on the second core wins it
#: back (measured in `benchmarks/README.md`).
PARALLEL_MIN_ELEMENTS = 1 << 20
_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_WEIGHT, _BIAS, _RUNNING = 1, 2, 4


def compiled(view: View) -> bool:
    """Whether `view` takes the compiled loops: float32/float64 data with values."""
    return view.data.dtype in _COMPILED_DTYPES and view.data.size > 0


def _vector(v: Array, dtype: np.dtype) -> np.ndarray:
    """`v` as a contiguous vector of `dtype` (itself when it is one already)."""
    if type(v) is np.ndarray and v.dtype == dtype and v.flags.c_contiguous:
        return v
    return np.ascontiguousarray(v, dtype)


def _in_place(buffer: Array, acc: np.dtype) -> bool:
    """Whether the compiled step can update running buffer `buffer` itself."""
    return type(buffer) is np.ndarray and buffer.dtype == acc and buffer.flags.c_contiguous


def _chunks(view: View) -> int:
    return ceil_div(view.data.shape[0], kernels.CHUNK_ROWS)


def _units(view: View) -> int:
    """What a kernel's ranges count: channels (NCS) or row chunks (MC)."""
    return view.data.shape[1] if view.layout == NCS else _chunks(view)


def _ranges(view: View) -> list[tuple[int, int]]:
    """The kernel ranges of `view`: one per core for a large tensor, else a single one."""
    units = _units(view)
    if view.data.size < PARALLEL_MIN_ELEMENTS:
        return [(0, units)]
    shares = max(1, min(tiling.worker_count(), units))
    bounds = [units * k // shares for k in range(shares + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _run(kernel, view: View, inputs: tuple, outputs: tuple) -> None:
    """`kernel(*inputs, start, stop, *outputs)` for each range of `view`, in parallel."""
    if view.data.size < PARALLEL_MIN_ELEMENTS:  # one range, and no list of ranges to build
        kernel(*inputs, 0, _units(view), *outputs)
        return
    ranges = _ranges(view)
    if len(ranges) == 1:
        kernel(*inputs, *ranges[0], *outputs)
        return
    tiling.run_parallel(lambda i, r: kernel(*inputs, *r, *outputs), ranges)


class NumbaBackend(NumpyBackend):
    """Batch-norm primitives as compiled CPU loops (see the module docstring)."""

    name = "numba"

    # -- statistics -----------------------------------------------------------------------
    def batch_stats(self, x: View) -> tuple[Array, Array]:
        if not compiled(x):
            return super().batch_stats(x)
        mean, var = self._moments64(x)
        return mean.astype(x.data.dtype), var.astype(x.data.dtype)

    def _moments64(self, x: View) -> tuple[np.ndarray, np.ndarray]:
        """float64 mean and biased variance, two-pass."""
        c = x.num_channels
        mean, var = np.empty(c), np.empty(c)
        if x.layout == NCS:
            _run(kernels.ncs_moments, x, (x.data,), (mean, var))
            return mean, var
        ranges = _ranges(x)
        if len(ranges) == 1:
            kernels.mc_moments(x.data, mean, var)
            return mean, var
        n = x.count
        partials = np.empty((_chunks(x), c))
        _run(kernels.mc_sums, x, (x.data,), (partials,))
        first = partials.sum(axis=0) / n
        centred = np.empty((2, _chunks(x), c))
        _run(kernels.mc_centred_sums, x, (x.data, first), (centred,))
        offset, squares = centred.sum(axis=1) / n
        return first + offset, np.maximum(squares - offset * offset, 0.0)

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
        """`cupy_bn.backends.base.FusedTrainStatistics.train_statistics`: the moments, then one
        compiled call for the per-channel step (`numba_kernels.finish_statistics`; running
        buffers of another dtype, or not contiguous, are updated by `update_running`)."""
        acc = accumulation_dtype(x.data.dtype)
        if compiled(x):
            mean, var = self._moments64(x)
        else:
            mean, var = (np.asarray(v, np.float64) for v in super().batch_stats(x))
        out = np.empty((5, x.num_channels), acc)
        flags = (weight is not None) * _WEIGHT | (bias is not None) * _BIAS
        running = running_mean is not None
        fused = running and _in_place(running_mean, acc) and _in_place(running_var, acc)
        finite = kernels.finish_statistics(
            mean,
            var,
            out[0] if weight is None else _vector(weight, acc),
            out[0] if bias is None else _vector(bias, acc),
            flags | (_RUNNING if fused else 0),
            running_mean if fused else out[0],
            running_var if fused else out[0],
            float(momentum),
            float(eps),
            x.count,
            out,
        )
        if running and not fused and finite:
            self.update_running(running_mean, running_var, out[0], out[1], x.count, momentum)
        mean, var, invstd, scale, shift = out
        return mean, var, invstd, scale, shift

    # -- forward apply --------------------------------------------------------------------
    def apply(self, x: View, scale: Array, shift: Array) -> Array:
        if not compiled(x):
            return super().apply(x, scale, shift)
        acc = x.data.dtype
        out = empty_unaliased(x.data, x.data)
        kernel = kernels.ncs_apply if x.layout == NCS else kernels.mc_apply
        _run(kernel, x, (x.data, _vector(scale, acc), _vector(shift, acc)), (out,))
        return out

    # -- backward -------------------------------------------------------------------------
    def backward_reduce(
        self, dy: View, x: View, mean: Array, invstd: Array | None = None
    ) -> tuple[Array, Array]:
        """`sum(dy)` and `sum(dy * (x - mean))`, always centred (`invstd` is not needed)."""
        if not _compiled_pair(dy, x):
            return super().backward_reduce(dy, x, mean, invstd)
        sums = self._gradient_sums(dy, x, _vector(mean, x.data.dtype))
        return sums[0].astype(x.data.dtype), sums[1].astype(x.data.dtype)

    def _gradient_sums(self, dy: View, x: View, mean: np.ndarray) -> np.ndarray:
        """`(2, C)` float64: `sum(dy)` and `sum(dy * (x - mean))`."""
        if x.layout == NCS:
            sums = np.empty((2, x.num_channels))
            _run(kernels.ncs_gradient_sums, x, (dy.data, x.data, mean), (sums,))
            return sums
        partials = np.empty((2, _chunks(x), x.num_channels))
        _run(kernels.mc_gradient_sums, x, (dy.data, x.data, mean), (partials,))
        return partials.sum(axis=1)

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
        if not _compiled_pair(dy, x):
            return super().backward_apply(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count)
        vectors = (np.asarray(v, np.float64) for v in (invstd, gamma, sum_dy, sum_dy_xmu))
        p, q, r = dx_coefficients(*vectors, count)
        dx = empty_unaliased(dy.data, dy.data, x.data)
        kernel = kernels.ncs_input_gradient if x.layout == NCS else kernels.mc_input_gradient
        _run(kernel, x, (dy.data, x.data, _vector(mean, x.data.dtype), p, q, r), (dx,))
        return dx

    def backward(
        self, dy: View, x: View, mean: Array, invstd: Array, gamma: Array, count: int
    ) -> tuple[Array, Array, Array]:
        """`(sum_dy, sum_dy_xmu, dx)`; a channels-first tensor takes both passes channel by
        channel, a small channels-last one both in one call."""
        if not _compiled_pair(dy, x):
            return super().backward(dy, x, mean, invstd, gamma, count)
        acc = x.data.dtype
        mean, invstd, gamma = (_vector(v, acc) for v in (mean, invstd, gamma))
        sums = np.empty((2, x.num_channels))
        if x.layout == NCS or len(_ranges(x)) == 1:
            dx = empty_unaliased(dy.data, dy.data, x.data)
            if x.layout == NCS:
                _run(kernels.ncs_backward, x, (dy.data, x.data, mean, invstd, gamma), (sums, dx))
            else:
                kernels.mc_backward(dy.data, x.data, mean, invstd, gamma, sums, dx)
        else:  # a large channels-last tensor: the sums, then dx, each shared among the cores
            sums = self._gradient_sums(dy, x, mean)
            dx = self.backward_apply(dy, x, mean, invstd, gamma, sums[0], sums[1], count)
        return sums[0].astype(acc), sums[1].astype(acc), dx


def _compiled_pair(dy: View, x: View) -> bool:
    """Whether a backward of `dy` at `x` takes the compiled loops (one dtype for both)."""
    return compiled(x) and dy.data.dtype == x.data.dtype
