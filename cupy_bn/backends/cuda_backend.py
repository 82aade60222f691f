"""The CUDA backend: the seven primitives as CUDA kernels, for CuPy arrays or the simulator.

The launch code is written once against an array module and a kernel loader
(`cupy_bn.kernels.loader`): `CudaBackend.for_cupy()` runs on CuPy arrays on the current GPU
(backend "cuda"); `CudaBackend.for_simulator()` runs the same kernels on NumPy arrays in
`cupy_bn.sim` (backend "sim").

One launch per primitive (R = a full read of a tensor, W = a full write; docs/kernels.md):

| primitive | kernel | passes |
|---|---|---|
| `batch_stats` | `bn_{ncs,mc}_stats`: Welford partials merged by the last block per channel | R1 |
| `apply` | `bn_{ncs,mc}_apply` | R1 W1 |
| `backward_reduce` | `bn_{ncs,mc}_reduce`: partial sums merged by the last block per channel | R2 |
| `backward_apply` | `bn_{ncs,mc}_backward` | R2 W1 |
| `update_running` | one ElementwiseKernel over C values | none |
| `double_backward_reduce` | `bn_{ncs,mc}_double_backward_reduce`: five sums, merged as above | R3 |
| `double_backward_apply` | `bn_{ncs,mc}_double_backward_apply`: `gx` and `gdy` | R3 W2 |

Training forward is 3 tensor passes in 2 launches, backward 5 in 2, eval 2 in 1, double
backward 8 in 2 (`cupy_bn.traffic` is this model). `train_statistics` (the optional
`cupy_bn.backends.base.FusedTrainStatistics`, which `cupy_bn.functional` uses) also computes
invstd, scale and shift and updates the running statistics inside the stats launch.

Launch heuristics: reductions get at most one wave of blocks (SM count x resident blocks per
SM), splitting a channel over several blocks only while each block keeps
`Tuning.reduction_min_work` elements; elementwise kernels get blocks of about
`Tuning.elementwise_work` elements. Cross-block merges run in a fixed order (integer atomic
counters decide only which block merges), so results are bitwise identical run to run on one
device (a device with another SM count may split differently).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from cupy_bn import deferred
from cupy_bn.backends.base import Array, DoubleBackwardCoefficients
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.intmath import ceil_div
from cupy_bn.kernels.elementwise import NONFINITE_CHANNELS, UPDATE_RUNNING
from cupy_bn.kernels.loader import CupyLoader, KernelLoader, SimLoader
from cupy_bn.layout import NCS, View
from cupy_bn.validation import check_batch_count, check_vector_shape

#: Threads of the tensor kernels' blocks (the kernels' shared memory is sized for 256).
BLOCK_THREADS = 256
#: Elements one block may own: the kernels count a block's elements in 32-bit integers.
MAX_BLOCK_WORK = 1 << 28
MAX_GRID_Y = 65535
# flags of the statistics kernels (bn_finalize.cuh)
_AFFINE, _WEIGHT, _BIAS, _RUNNING = 1, 2, 4, 8
# flags of the fused apply kernels (bn_fused.cu)
_FUSED_RESIDUAL, _FUSED_RELU = 1, 2
#: The rows of the double-backward coefficient array, in the kernels' order.
_COEFFICIENT_NAMES = tuple(f.name for f in fields(DoubleBackwardCoefficients))


@dataclass(frozen=True)
class Tuning:
    """Work sizes of the launch heuristics, in elements per block."""

    #: A reduction splits a channel over more blocks only while each keeps this many elements.
    reduction_min_work: int = 4096
    #: Elementwise kernels (apply, backward apply) give each block about this many elements.
    elementwise_work: int = 8192
    #: MC reductions: partials each thread of a last block merges per level (McGrid).
    merge_group: int = 4


@dataclass(frozen=True)
class NcsGrid:
    """Launch shape of an NCS kernel: grid (C, row_pieces * col_pieces), 1-D blocks."""

    channels: int
    row_pieces: int
    col_pieces: int

    @property
    def pieces(self) -> int:
        return self.row_pieces * self.col_pieces

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channels, self.pieces)

    @property
    def block(self) -> tuple[int]:
        return (BLOCK_THREADS,)


@dataclass(frozen=True)
class McGrid:
    """Launch shape of an MC kernel: grid (channel tiles, row ranges), blocks (bx, by).

    Reductions merge row ranges in groups of `group` = merge_group * by (the last block of a
    group merges at most `merge_group` partials per thread), then the `groups` group results
    (bn_mc.cu).
    """

    channels: int
    block_x: int
    pieces: int
    merge_group: int = 4

    @property
    def tiles(self) -> int:
        return ceil_div(self.channels, self.block_x)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.tiles, self.pieces)

    @property
    def block(self) -> tuple[int, int]:
        return (self.block_x, BLOCK_THREADS // self.block_x)

    @property
    def group(self) -> int:
        return self.merge_group * self.block[1]

    @property
    def groups(self) -> int:
        return ceil_div(self.pieces, self.group)

    @property
    def counters(self) -> int:
        """Group counters, tile counters, done and bad."""
        return self.tiles * self.groups + self.tiles + 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def reduction_pieces(units: int, work_per_unit: int, resident_blocks: int, min_work: int) -> int:
    """Blocks per unit (channel or channel tile) of a reduction grid.

    At most one wave (`units * pieces <= resident_blocks` unless one block per unit already
    exceeds it), each block with at least `min_work` elements, none above MAX_BLOCK_WORK.
    """
    pieces = max(1, resident_blocks // max(units, 1))
    pieces = min(pieces, max(1, work_per_unit // max(min_work, 1)))
    pieces = max(pieces, ceil_div(work_per_unit, MAX_BLOCK_WORK))
    return _check_pieces(pieces)


def elementwise_pieces(work_per_unit: int, work: int) -> int:
    """Blocks per unit of an elementwise grid: about `work` elements each."""
    pieces = min(max(1, ceil_div(work_per_unit, max(work, 1))), MAX_GRID_Y)
    return _check_pieces(max(pieces, ceil_div(work_per_unit, MAX_BLOCK_WORK)))


def _check_pieces(pieces: int) -> int:
    if pieces > MAX_GRID_Y:
        raise ValueError(
            f"a channel of this tensor needs {pieces} blocks, more than the grid "
            f"allows ({MAX_GRID_Y}); the tensor is too large for these kernels"
        )
    return pieces


def ncs_grid(n: int, c: int, s: int, pieces: int) -> NcsGrid:
    """Split each channel's (N, S) plane into about `pieces` tiles: whole rows first."""
    row_pieces = min(n, pieces)
    col_pieces = min(s, ceil_div(pieces, row_pieces), MAX_GRID_Y // row_pieces)
    tile = ceil_div(n, row_pieces) * ceil_div(s, col_pieces)
    if tile + 8 * BLOCK_THREADS >= 1 << 30:  # the kernels' 32-bit per-block counters
        raise ValueError(f"a block tile of {tile} elements is too large for the kernels")
    return NcsGrid(c, row_pieces, col_pieces)


def mc_block_x(channels: int) -> int:
    """Threads along C of an MC block: the channel count rounded up to a power of 2, <= 32."""
    return min(_next_pow2(channels), 32)


class CudaBackend:
    """Batch-norm primitives as CUDA kernels (see `cupy_bn.backends.base` for the contract).

    `xp` is the array module of the tensors (cupy, or numpy in the simulator) and `loader`
    compiles and launches the kernels for that target.
    """

    def __init__(
        self,
        name: str,
        xp: Any,
        loader: KernelLoader,
        tuning: Tuning | None = None,
        defers_checks: bool = False,
    ):
        self.name = name
        self.xp = xp
        self.loader = loader
        self.tuning = tuning or Tuning()
        self.defers_checks = defers_checks

    @classmethod
    def for_cupy(cls, tuning: Tuning | None = None) -> CudaBackend:
        """The "cuda" backend: CuPy arrays on the current GPU; statistics checks deferred."""
        import cupy

        return cls("cuda", cupy, CupyLoader(), tuning, defers_checks=True)

    @classmethod
    def for_simulator(
        cls,
        schedule: str = "forward",
        seed: int = 0,
        check_races: bool = False,
        tuning: Tuning | None = None,
        check_memory: bool = False,
        defers_checks: bool = False,
    ) -> CudaBackend:
        """The "sim" backend: NumPy arrays, kernels run by `cupy_bn.sim` on the CPU. With
        `defers_checks` its statistics checks take the CUDA backend's deferred path (their
        copies are ready at once)."""
        loader = SimLoader(schedule, seed, check_races, check_memory)
        return cls("sim", np, loader, tuning, defers_checks=defers_checks)

    # -- launch geometry ----------------------------------------------------------------------
    def _resident_blocks(self, kernel: Any, threads: int) -> int:
        device = self.loader.device()
        return device.sm_count * self.loader.resident_blocks_per_sm(kernel, threads)

    def _ncs_reduction_grid(self, x: View, kernel: Any) -> NcsGrid:
        n, c, s = x.data.shape
        pieces = reduction_pieces(
            c, n * s, self._resident_blocks(kernel, BLOCK_THREADS), self.tuning.reduction_min_work
        )
        return ncs_grid(n, c, s, pieces)

    def _ncs_elementwise_grid(self, x: View) -> NcsGrid:
        n, c, s = x.data.shape
        return ncs_grid(n, c, s, elementwise_pieces(n * s, self.tuning.elementwise_work))

    def _mc_reduction_grid(self, x: View, kernel: Any) -> McGrid:
        m, c = x.data.shape
        bx = mc_block_x(c)
        units = ceil_div(c, bx)
        pieces = reduction_pieces(
            units,
            m * bx,
            self._resident_blocks(kernel, BLOCK_THREADS),
            self.tuning.reduction_min_work,
        )
        return McGrid(c, bx, max(1, min(pieces, m)), self.tuning.merge_group)

    def _mc_elementwise_grid(self, x: View) -> McGrid:
        m, c = x.data.shape
        bx = mc_block_x(c)
        pieces = elementwise_pieces(m * bx, self.tuning.elementwise_work)
        return McGrid(c, bx, max(1, min(pieces, m)))

    # -- helpers ------------------------------------------------------------------------------
    def _vector(self, v: Array, dtype: np.dtype, channels: int, name: str) -> Array:
        """`v` as a contiguous (C,) array of `dtype` (no copy when it already is one)."""
        out = self.xp.ascontiguousarray(self.xp.asarray(v), dtype=dtype)
        check_vector_shape(name, out, channels)
        return out

    def _mc_reduction_args(self, x: View, grid: McGrid, acc: Any, counts: bool) -> tuple:
        """The MC reduce kernels' shape and scratch arguments: rows, channels, group, the two
        per-piece partial sums (and, for Welford statistics, int32 counts), the two per-group
        partials (and int64 counts), the merge counters."""
        xp, channels = self.xp, x.num_channels
        slots = channels * grid.pieces if grid.pieces > 1 else 1
        group_slots = channels * grid.groups if grid.groups > 1 else 1
        pieces = [xp.empty(slots, acc), xp.empty(slots, acc)]
        groups = [xp.empty(group_slots, acc), xp.empty(group_slots, acc)]
        if counts:
            pieces.append(xp.empty(slots, np.int32))
            groups.append(xp.empty(group_slots, np.int64))
        return (
            np.int64(x.data.shape[0]),
            np.int32(channels),
            np.int32(grid.group),
            *pieces,
            *groups,
            self._counters(grid.counters),
        )

    def _ncs_shape_args(self, x: View, grid: NcsGrid) -> tuple:
        n, c, s = x.data.shape
        return (np.int64(n), np.int32(c), np.int64(s), np.int32(grid.col_pieces))

    def _counters(self, counters: int) -> Array:
        """`counters` int32 zeros for the last-block merges of one launch.

        Every launch gets its own buffer, zeroed on the launching stream before the kernel
        (one memset): launches from several host threads, on several streams or replayed from
        CUDA graphs on several streams never share counters. The kernels leave the counters
        at zero again, but nothing relies on it.
        """
        return self.xp.zeros(counters, np.int32)

    def _common(self, *views: View) -> tuple[Any, ...]:
        """The views' data in one storage dtype (the wider one when they differ), then it."""
        dtypes = {np.dtype(v.data.dtype) for v in views}
        if len(dtypes) == 1:
            dtype = dtypes.pop()
        else:  # float16 and bfloat16 have no common 16-bit type: meet in float32 (or float64)
            dtype = np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)
        return (*(v.data.astype(dtype, copy=False) for v in views), dtype)

    # -- statistics ---------------------------------------------------------------------------
    def _stats(
        self,
        x: View,
        flags: int,
        weight: Array | None = None,
        bias: Array | None = None,
        eps: float = 1.0,
        momentum: float = 0.0,
        running: tuple[Array, Array] | None = None,
    ) -> tuple[Array, ...]:
        """One stats launch -> (mean, var, invstd, scale, shift); the last three with _AFFINE."""
        xp, data = self.xp, x.data
        channels, count = x.num_channels, x.count
        acc = accumulation_dtype(data.dtype)
        if x.layout == NCS:
            kernel = self.loader.function("ncs", "bn_ncs_stats", data.dtype)
            grid = self._ncs_reduction_grid(x, kernel)
            slots = channels * grid.pieces if grid.pieces > 1 else 1
            part_mean, part_m2 = xp.empty(slots, acc), xp.empty(slots, acc)
            part_count = xp.empty(slots, np.int32)
            layout_args = (
                *self._ncs_shape_args(x, grid),
                part_mean,
                part_m2,
                part_count,
                self._counters(channels + 2),
            )
        else:
            kernel = self.loader.function("mc", "bn_mc_stats", data.dtype)
            grid = self._mc_reduction_grid(x, kernel)
            layout_args = self._mc_reduction_args(x, grid, acc, counts=True)
        mean, var = xp.empty(channels, acc), xp.empty(channels, acc)
        unused = xp.empty(1, acc)
        invstd, scale, shift = (
            (xp.empty(channels, acc) for _ in range(3))
            if flags & _AFFINE
            else (unused, unused, unused)
        )
        running_mean, running_var = running if running is not None else (unused, unused)
        unbias = count / (count - 1) if count > 1 else 1.0
        self.loader.launch(
            kernel,
            grid.grid,
            grid.block,
            (
                data,
                *layout_args,
                np.int32(flags),
                unused if weight is None else weight,
                unused if bias is None else bias,
                acc.type(eps),
                np.float64(momentum),
                np.float64(unbias),
                mean,
                var,
                invstd,
                scale,
                shift,
                running_mean,
                running_var,
                xp.empty(2 * channels, acc) if running is not None else unused,
            ),
        )
        return mean, var, invstd, scale, shift

    def batch_stats(self, x: View) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0 or x.num_channels == 0:
            return self.xp.zeros(x.num_channels, acc), self.xp.zeros(x.num_channels, acc)
        mean, var, *_ = self._stats(x, 0)
        return mean, var

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
        """`cupy_bn.backends.base.FusedTrainStatistics.train_statistics` in one launch (R1).

        The block finalizing each channel derives its invstd, scale and shift and updates its
        running statistics, all channels or none (when given as contiguous vectors of the
        accumulation dtype; other running buffers are updated by `update_running` after the
        launch, under the same finiteness condition, decided on the device).
        """
        channels = x.num_channels
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0 or channels == 0:
            raise ValueError(f"train_statistics needs a non-empty batch, got shape {x.shape}")
        if running_mean is not None:
            check_batch_count(x.count, f" (input shape {x.shape})")
        flags = _AFFINE
        if weight is not None:
            weight = self._vector(weight, acc, channels, "weight")
            flags |= _WEIGHT
        if bias is not None:
            bias = self._vector(bias, acc, channels, "bias")
            flags |= _BIAS
        fused_running = (
            running_mean is not None
            and running_var is not None
            and all(
                r.dtype == acc and r.flags.c_contiguous and r.shape == (channels,)
                for r in (running_mean, running_var)
            )
        )
        if fused_running:
            flags |= _RUNNING
        stats = self._stats(
            x,
            flags,
            weight,
            bias,
            eps,
            momentum,
            (running_mean, running_var) if fused_running else None,
        )
        if running_mean is not None and not fused_running:
            self.update_running(running_mean, running_var, stats[0], stats[1], x.count, momentum)
        return stats

    # -- forward apply ------------------------------------------------------------------------
    def apply(self, x: View, scale: Array, shift: Array) -> Array:
        return self._launch_apply(
            x, scale, shift, ("ncs", "bn_ncs_apply"), ("mc", "bn_mc_apply"), lambda a, b: (a, b)
        )

    def _launch_apply(
        self,
        x: View,
        scale: Array,
        shift: Array,
        ncs_kernel: tuple[str, str],
        mc_kernel: tuple[str, str],
        operands: Callable[[Array, Array], tuple],
    ) -> Array:
        """One elementwise launch over `x` with `apply`'s grid: the kernel `(file, name)` of
        x's layout, called with `(x, *operands(scale, shift), *shape, out)`."""
        xp, data = self.xp, x.data
        acc = accumulation_dtype(data.dtype)
        out = xp.empty(data.shape, data.dtype)
        if data.size == 0:
            return out
        scale = self._vector(scale, acc, x.num_channels, "scale")
        shift = self._vector(shift, acc, x.num_channels, "shift")
        if x.layout == NCS:
            grid = self._ncs_elementwise_grid(x)
            kernel = self.loader.function(*ncs_kernel, data.dtype)
            shape = self._ncs_shape_args(x, grid)
        else:
            grid = self._mc_elementwise_grid(x)
            kernel = self.loader.function(*mc_kernel, data.dtype)
            shape = (np.int64(data.shape[0]), np.int32(data.shape[1]))
        args = (data, *operands(scale, shift), *shape, out)
        self.loader.launch(kernel, grid.grid, grid.block, args)
        return out

    def apply_activation(
        self, x: View, scale: Array, shift: Array, residual: View | None, relu: bool
    ) -> Array:
        """`FusedActivation.apply_activation`: `bn_{ncs,mc}_apply_fused`, `apply`'s launch
        geometry with the residual read alongside `x` (R1 W1, R2 W1 with a residual)."""
        data = x.data
        flags = (0 if residual is None else _FUSED_RESIDUAL) | (_FUSED_RELU if relu else 0)
        z = data if residual is None else residual.data.astype(data.dtype, copy=False)
        return self._launch_apply(
            x,
            scale,
            shift,
            ("fused", "bn_ncs_apply_fused"),
            ("fused", "bn_mc_apply_fused"),
            lambda a, b: (z, a, b, np.int32(flags)),
        )

    def relu_gradient(self, dy: View, y: View) -> Array:
        """`FusedActivation.relu_gradient`: `bn_relu_gradient`, a flat pass (R2 W1); `dy` and
        `y` of different dtypes meet in the wider one (exact for `dy`'s values)."""
        g, out_y, dtype = self._common(dy, y)
        out = self.xp.empty(g.shape, dtype)
        if g.size:
            blocks = ceil_div(g.size, self.tuning.elementwise_work)
            kernel = self.loader.function("fused", "bn_relu_gradient", dtype)
            args = (g, out_y, np.int64(g.size), out)
            self.loader.launch(kernel, (blocks,), (BLOCK_THREADS,), args)
        return out.astype(dy.data.dtype, copy=False)

    # -- backward -----------------------------------------------------------------------------
    def backward_reduce(
        self, dy: View, x: View, mean: Array, invstd: Array | None = None
    ) -> tuple[Array, Array]:
        """The kernels centre `x` in registers before the product: `invstd` is ignored."""
        xp = self.xp
        g, data, dtype = self._common(dy, x)
        acc = accumulation_dtype(dtype)
        channels = x.num_channels
        if x.count == 0 or channels == 0:
            return xp.zeros(channels, acc), xp.zeros(channels, acc)
        mean = self._vector(mean, acc, channels, "mean")
        if x.layout == NCS:
            kernel = self.loader.function("ncs", "bn_ncs_reduce", dtype)
            grid = self._ncs_reduction_grid(x, kernel)
            slots = channels * grid.pieces if grid.pieces > 1 else 1
            layout_args = (
                *self._ncs_shape_args(x, grid),
                xp.empty(slots, acc),
                xp.empty(slots, acc),
                self._counters(channels + 2),
            )
        else:
            kernel = self.loader.function("mc", "bn_mc_reduce", dtype)
            grid = self._mc_reduction_grid(x, kernel)
            layout_args = self._mc_reduction_args(x, grid, acc, counts=False)
        sum_dy, sum_dy_xmu = xp.empty(channels, acc), xp.empty(channels, acc)
        self.loader.launch(
            kernel, grid.grid, grid.block, (g, data, mean, *layout_args, sum_dy, sum_dy_xmu)
        )
        return sum_dy, sum_dy_xmu

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
        xp = self.xp
        g, data, dtype = self._common(dy, x)
        acc = accumulation_dtype(dtype)
        channels = x.num_channels
        out = xp.empty(data.shape, dtype)
        if data.size == 0:
            return out.astype(dy.data.dtype, copy=False)
        vectors = [
            self._vector(v, acc, channels, name)
            for v, name in (
                (mean, "mean"),
                (invstd, "invstd"),
                (gamma, "gamma"),
                (sum_dy, "sum_dy"),
                (sum_dy_xmu, "sum_dy_xmu"),
            )
        ]
        if x.layout == NCS:
            grid = self._ncs_elementwise_grid(x)
            kernel = self.loader.function("ncs", "bn_ncs_backward", dtype)
            shape_args = self._ncs_shape_args(x, grid)
        else:
            grid = self._mc_elementwise_grid(x)
            kernel = self.loader.function("mc", "bn_mc_backward", dtype)
            shape_args = (np.int64(data.shape[0]), np.int32(data.shape[1]))
        self.loader.launch(
            kernel, grid.grid, grid.block, (g, data, *vectors, np.int64(count), *shape_args, out)
        )
        return out.astype(dy.data.dtype, copy=False)

    # -- double backward ----------------------------------------------------------------------
    def double_backward_reduce(
        self, dy: View, x: View, ddx: View, mean: Array
    ) -> tuple[Array, Array, Array, Array, Array]:
        """The five sums in one launch (R3); `x` is centred in registers before the products."""
        xp = self.xp
        g, data, h, dtype = self._common(dy, x, ddx)
        acc = accumulation_dtype(dtype)
        channels = x.num_channels
        if x.count == 0 or channels == 0:
            return tuple(xp.zeros(channels, acc) for _ in range(5))
        mean = self._vector(mean, acc, channels, "mean")
        if x.layout == NCS:
            kernel = self.loader.function("double_backward", "bn_ncs_double_backward_reduce", dtype)
            grid = self._ncs_reduction_grid(x, kernel)
            slots = channels * grid.pieces if grid.pieces > 1 else 1
            layout_args = (
                *self._ncs_shape_args(x, grid),
                xp.empty(5 * slots, acc),
                self._counters(channels + 2),
            )
        else:
            kernel = self.loader.function("double_backward", "bn_mc_double_backward_reduce", dtype)
            grid = self._mc_reduction_grid(x, kernel)
            slots = channels * grid.pieces if grid.pieces > 1 else 1
            group_slots = channels * grid.groups if grid.groups > 1 else 1
            layout_args = (
                np.int64(data.shape[0]),
                np.int32(channels),
                np.int32(grid.group),
                xp.empty(5 * slots, acc),
                xp.empty(5 * group_slots, acc),
                self._counters(grid.counters),
            )
        sums = xp.empty((5, channels), acc)
        self.loader.launch(kernel, grid.grid, grid.block, (g, data, h, mean, *layout_args, sums))
        return tuple(sums[k] for k in range(5))

    def double_backward_apply(
        self,
        dy: View,
        x: View,
        ddx: View | None,
        mean: Array,
        coefficients: DoubleBackwardCoefficients,
    ) -> tuple[Array, Array]:
        """`gx` and `gdy` in one launch (R3 W2; R2 W2 without `ddx`), coefficients in `Acc`."""
        xp = self.xp
        g, data, *h, dtype = self._common(dy, x, *([] if ddx is None else [ddx]))
        acc = accumulation_dtype(dtype)
        channels = x.num_channels
        gx, gdy = xp.empty(data.shape, dtype), xp.empty(data.shape, dtype)
        if data.size:
            mean = self._vector(mean, acc, channels, "mean")
            rows = [
                self._vector(v, acc, channels, f"coefficients.{f}")
                for v, f in zip(coefficients.vectors(), _COEFFICIENT_NAMES, strict=True)
            ]
            coef = xp.ascontiguousarray(xp.stack(rows))
            ddx_data = h[0] if h else xp.empty(1, dtype)
            if x.layout == NCS:
                grid = self._ncs_elementwise_grid(x)
                kernel = self.loader.function(
                    "double_backward", "bn_ncs_double_backward_apply", dtype
                )
                shape_args = self._ncs_shape_args(x, grid)
            else:
                grid = self._mc_elementwise_grid(x)
                kernel = self.loader.function(
                    "double_backward", "bn_mc_double_backward_apply", dtype
                )
                shape_args = (np.int64(data.shape[0]), np.int32(channels))
            args = (g, data, ddx_data, np.int32(bool(h)), mean, coef, *shape_args, gx, gdy)
            self.loader.launch(kernel, grid.grid, grid.block, args)
        return gx.astype(x.data.dtype, copy=False), gdy.astype(dy.data.dtype, copy=False)

    # -- running statistics -------------------------------------------------------------------
    def update_running(
        self,
        running_mean: Array,
        running_var: Array,
        mean: Array,
        var: Array,
        count: int,
        momentum: float,
    ) -> None:
        """The base contract's update, on the device and only when every channel of `mean` and
        `var` is finite (else nothing changes), decided there: no host synchronization."""
        check_batch_count(count)
        unbias = count / (count - 1)
        dtype = running_mean.dtype
        skip = self._nonfinite_channels(mean, var).any().reshape(1)
        if (
            dtype in (np.float32, np.float64)
            and running_var.dtype == dtype
            and running_mean.flags.c_contiguous
            and running_var.flags.c_contiguous
        ):
            kernel = self.loader.elementwise(UPDATE_RUNNING)
            kernel(
                mean.astype(dtype, copy=False),
                var.astype(dtype, copy=False),
                float(momentum),
                float(unbias),
                skip,
                running_mean,
                running_var,
            )
            return
        xp = self.xp  # other dtypes (float16 / bfloat16 buffers): the same formula, in float64
        old_mean = running_mean.astype(np.float64)
        old_var = running_var.astype(np.float64)
        new_mean = (1.0 - momentum) * old_mean + momentum * mean.astype(np.float64)
        new_var = (1.0 - momentum) * old_var + momentum * (xp.asarray(var, np.float64) * unbias)
        running_mean[...] = xp.where(skip, old_mean, new_mean)
        running_var[...] = xp.where(skip, old_var, new_var)

    # -- statistics checks --------------------------------------------------------------------
    def _nonfinite_channels(self, mean: Array, var: Array) -> Array:
        """(C,) uint8 on the device: 1 where a channel's mean or variance is NaN or Inf."""
        out = self.xp.empty(mean.shape, np.uint8)
        self.loader.elementwise(NONFINITE_CHANNELS)(mean, var.astype(mean.dtype, copy=False), out)
        return out

    def report_nonfinite(self, mean: Array, var: Array, context: str) -> None:
        """Queue the check of `mean` and `var` (`cupy_bn.deferred`): the per-channel mask is
        copied to the host behind the kernels that produce them; nothing waits for it."""
        mask = self._nonfinite_channels(mean, var)
        host, ready, wait = self.loader.to_host_async(mask)
        deferred.defer(deferred.PendingCheck(host, ready, wait, context, keep=mask))


def simulator_usable() -> bool:
    """True when the simulator's toolchain (g++, CUDA headers) is found."""
    return SimLoader.available()


__all__ = [
    "CudaBackend",
    "McGrid",
    "NcsGrid",
    "Tuning",
    "elementwise_pieces",
    "mc_block_x",
    "ncs_grid",
    "reduction_pieces",
    "simulator_usable",
]
