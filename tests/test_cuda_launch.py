"""Launch heuristics, the traffic and launch model, kernel sources and the loader's naming.

Pure Python, except one check of the traffic model that runs the kernels in the simulator.
"""

import numpy as np
import pytest

from cupy_bn import traffic
from cupy_bn.backends.cuda_backend import (
    BLOCK_THREADS,
    MAX_BLOCK_WORK,
    MAX_GRID_Y,
    CudaBackend,
    McGrid,
    elementwise_pieces,
    mc_block_x,
    ncs_grid,
    reduction_pieces,
    simulator_usable,
)
from cupy_bn.kernels.loader import KERNEL_FILES, dtype_name, read_source


def ncs_tiles(n, s, grid):
    """The tiles the kernels compute from (row_pieces, col_pieces): bn::ncs_tile in Python."""
    tiles = []
    for p in range(grid.pieces):
        pr, pc = divmod(p, grid.col_pieces)
        n0, n1 = n * pr // grid.row_pieces, n * (pr + 1) // grid.row_pieces
        s0, s1 = s * pc // grid.col_pieces, s * (pc + 1) // grid.col_pieces
        tiles.append((n0, n1, s0, s1))
    return tiles


@pytest.mark.parametrize(
    "n,s,pieces",
    [
        (32, 3136, 16),
        (2, 100_000, 64),
        (1, 7, 5),
        (5, 1, 3),
        (256, 49, 4),
        (3, 300, 1),
        (7, 11, 100),
    ],
)
def test_ncs_tiles_partition_each_channel(n, s, pieces):
    grid = ncs_grid(n, 4, s, pieces)
    assert grid.row_pieces <= n and grid.col_pieces <= s
    tiles = ncs_tiles(n, s, grid)
    covered = np.zeros((n, s), np.int32)
    for n0, n1, s0, s1 in tiles:
        assert n1 > n0 and s1 > s0  # no empty tile
        covered[n0:n1, s0:s1] += 1
    assert (covered == 1).all()
    sizes = [(n1 - n0) * (s1 - s0) for n0, n1, s0, s1 in tiles]
    assert max(sizes) <= 2 * min(sizes) + s  # balanced up to a row


def test_reductions_fill_one_wave_and_split_small_channel_counts():
    resident = 132 * 8
    # 64 channels of 100K values: 16 blocks each, one wave (not 17, which would need a second)
    assert reduction_pieces(64, 100_352, resident, 4096) == 16
    assert 64 * reduction_pieces(64, 100_352, resident, 4096) <= resident
    # many channels: one block each
    assert reduction_pieces(2048, 1568, resident, 4096) == 1
    # a small tensor is not split below the minimum work per block
    assert reduction_pieces(2, 1000, resident, 4096) == 1
    assert reduction_pieces(1, 40_000, resident, 4096) == 9
    # a huge channel is split so no block owns more than MAX_BLOCK_WORK elements
    assert reduction_pieces(4096, 3 * MAX_BLOCK_WORK, resident, 4096) == 3


def test_grids_stay_within_the_grid_limit():
    pieces = elementwise_pieces((1 << 31) + 1024, 8192)
    assert pieces == MAX_GRID_Y
    grid = ncs_grid(2, 1, (1 << 30) + 512, pieces)
    assert grid.pieces <= MAX_GRID_Y and grid.row_pieces == 2
    assert ncs_grid(3, 1, 1 << 30, MAX_GRID_Y).pieces <= MAX_GRID_Y


def test_elementwise_blocks_and_limits():
    assert elementwise_pieces(100, 32768) == 1
    assert elementwise_pieces(100_000, 32768) == 4
    with pytest.raises(ValueError, match="too large"):
        reduction_pieces(1, (MAX_GRID_Y + 1) * MAX_BLOCK_WORK, 1, 1)


@pytest.mark.parametrize("channels,bx", [(1, 1), (3, 4), (32, 32), (37, 32), (2048, 32)])
def test_mc_blocks_run_threads_along_channels(channels, bx):
    assert mc_block_x(channels) == bx
    grid = McGrid(channels, bx, 5)
    assert grid.block[0] * grid.block[1] == BLOCK_THREADS
    assert grid.grid[0] * bx >= channels > (grid.grid[0] - 1) * bx


def test_traffic_model_counts_passes():
    assert traffic.moved_bytes("forward_train", 1000, 4) == 3 * 4000  # R2 W1
    assert traffic.moved_bytes("backward", 1000, 2) == 5 * 2000  # R4 W1
    assert traffic.moved_bytes("eval", 10, 8) == 2 * 80  # R1 W1
    assert traffic.minimal_bytes("forward_train", 1000, 4) == 2 * 4000  # R1 W1
    assert traffic.minimal_bytes("backward", 1000, 2) == 3 * 2000  # R2 W1
    assert traffic.minimal_bytes("eval", 10, 8) == 2 * 80
    assert [traffic.launches(p) for p in traffic.PHASES] == [2, 2, 1]
    assert str(traffic.moved_passes("backward")) == "R4 W1"
    assert traffic.ALL_PHASES == (*traffic.PHASES, "double_backward")
    assert str(traffic.minimal_passes("double_backward")) == "R3 W2"
    assert str(traffic.moved_passes("double_backward")) == "R6 W2"
    assert traffic.launches("double_backward") == 2
    for phase in ("inference", "forward"):
        with pytest.raises(
            ValueError, match="phase must be one of forward_train, backward, eval, double_backward"
        ):
            traffic.moved_bytes(phase, 10, 4)
        with pytest.raises(ValueError, match="phase must be one of"):
            traffic.launches(phase)


class RecordingLoader:
    """A kernel loader that records each tensor kernel launch's arguments, then runs it."""

    def __init__(self, loader):
        self._loader = loader
        self.launches: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def launch(self, kernel, grid, block, args):
        self.launches.append(args)
        return self._loader.launch(kernel, grid, block, args)


def _passes(launches, numel: int, inputs) -> traffic.Passes:
    """Tensor-sized arguments of the launches: the inputs' buffers read, the others written."""
    reads = writes = 0
    for args in launches:
        for arg in args:
            if isinstance(arg, np.ndarray) and arg.size == numel:
                if any(np.shares_memory(arg, i) for i in inputs):
                    reads += 1
                else:
                    writes += 1
    return traffic.Passes(reads, writes)


@pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator toolchain not found")
@pytest.mark.parametrize(("shape", "channel_axis"), [((4, 3, 16, 16), 1), ((2048, 3), -1)])
def test_cuda_backend_moves_and_launches_what_the_traffic_model_says(shape, channel_axis):
    import cupy_bn

    be = CudaBackend.for_simulator()
    be.loader = recorder = RecordingLoader(be.loader)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[channel_axis]
    weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
    running = np.zeros(c, np.float32), np.ones(c, np.float32)
    ddx = rng.standard_normal(shape).astype(np.float32)

    def phase(name):
        recorder.launches.clear()
        if name == "forward_train":
            out = cupy_bn.batch_norm(
                x, weight, bias, *running, channel_axis=channel_axis, backend=be
            )
        elif name == "backward":
            out = cupy_bn.batch_norm_backward(dy, saved)
        elif name == "double_backward":
            out = cupy_bn.batch_norm_double_backward(ddx, weight, bias, dy, saved)
        else:
            out = cupy_bn.batch_norm(
                x, weight, bias, *running, training=False, channel_axis=channel_axis, backend=be
            )
        return out, list(recorder.launches)

    (_, saved), _ = phase("forward_train")
    for name in traffic.ALL_PHASES:
        _, launches = phase(name)
        assert len(launches) == traffic.launches(name), name
        assert _passes(launches, x.size, (x, dy, ddx)) == traffic.moved_passes(name), name


def test_sources_inline_the_common_header_once():
    for spec in KERNEL_FILES.values():
        text = spec.source()
        assert '#include "' not in text
        assert text.count("struct Welford") == 1
        reduces = any(k.endswith(("_stats", "_reduce")) for k in spec.kernels)
        assert text.count("bool arrive_last(") == int(reduces)  # bn_finalize.cuh, once
        assert '#line 1 "bn_common.cuh"' in text
    assert read_source("bn_mc.cu").count("namespace bn {") >= 2


def test_every_kernel_source_is_compiled():
    """Each `.cu` file is in KERNEL_FILES, so the loader, NVRTC and simulator tests see it."""
    from cupy_bn.kernels.loader import KERNEL_DIR

    listed = {spec.filename for spec in KERNEL_FILES.values()}
    assert listed == {path.name for path in KERNEL_DIR.glob("*.cu")}
    assert "bn_double_backward.cu" in listed


def test_name_expressions_cover_every_storage_type():
    names = KERNEL_FILES["ncs"].name_expressions()
    for t in ("__half", "__nv_bfloat16", "float", "double"):
        assert any(f"bn_ncs_stats<{t}," in n for n in names)
    assert "bn_ncs_stats<__half, float>" in names
    assert "bn_ncs_stats<double, double>" in names
    assert len(names) == 4 * 4 and len(set(names)) == len(names)
    with pytest.raises(TypeError, match="no kernels for dtype int32"):
        dtype_name(np.int32)
