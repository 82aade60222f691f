"""Sync batch norm checks run by every process of a group (fake threads or real MPI ranks).

Each process builds the same global batch from a shared seed, takes its own slice (unequal
sizes, one process possibly empty) and checks its results against the float64 textbook
formulas (`reference.py`) on the concatenated batch: forward, running statistics (and that
they are bit-identical on all processes), dx, and dweight/dbias summed over processes. Then
it checks that failures on some processes make every process raise instead of hanging.

`run_all(comm)` returns the number of checks; any failure raises AssertionError.
"""

from __future__ import annotations

import numpy as np
import reference as ref

from cupy_bn.distributed import RemoteFailure, SyncBatchNorm, SyncReducer, sync_batch_norm
from cupy_bn.functional import batch_norm_backward

C = 3
# name, per-sample shape builder, channel_axis, channels-last memory for a channel_axis=1 array
LAYOUTS = [
    ("NC", lambda n: (n, C), 1, False),
    ("NCL", lambda n: (n, C, 5), 1, False),
    ("NCHW", lambda n: (n, C, 3, 4), 1, False),
    ("NCHW channels_last memory", lambda n: (n, C, 3, 4), 1, True),
    ("NHWC", lambda n: (n, 3, 4, C), -1, False),
    ("NCDHW", lambda n: (n, C, 2, 3, 2), 1, False),
]
ATOL = 1e-10


def batch_sizes(size: int, empty: bool) -> list[int]:
    """Unequal per-process batch sizes; with `empty`, process 1 has none."""
    sizes = [2 + 3 * r for r in range(size)]
    if empty:
        sizes[1 if size > 1 else 0] = 0
    if sum(sizes) < 2:
        sizes[0] = 2
    return sizes


def gather(comm, v: np.ndarray) -> np.ndarray:
    """All processes' copies of `v`, stacked (an all-gather made of an exact all-reduce sum)."""
    buf = np.zeros((comm.size, v.size), np.float64)
    buf[comm.rank] = v.reshape(-1)
    return comm.allreduce_sum(buf.reshape(-1)).reshape(comm.size, *v.shape)


def _local(global_x: np.ndarray, sizes: list[int], rank: int, channels_last: bool):
    start = sum(sizes[:rank])
    part = global_x[start : start + sizes[rank]]
    if channels_last:  # same logical shape, NHWC memory
        part = np.ascontiguousarray(np.moveaxis(part, 1, -1))
        part = np.moveaxis(part, -1, 1)
        assert not part.flags.c_contiguous or part.shape[0] == 0
    return part


def check_layer_matches_global_batch(
    comm, shape_of, channel_axis, channels_last, sizes, offset: float = 0.0, steps: int = 2
) -> int:
    rank = comm.rank
    rng = np.random.default_rng(1234)
    weight, bias = rng.normal(1, 0.3, C), rng.normal(0, 0.5, C)
    bn = SyncBatchNorm(C, momentum=0.3, channel_axis=channel_axis, dtype=np.float64, comm=comm)
    bn.params["weight"][:] = weight
    bn.params["bias"][:] = bias
    r_mean, r_var = np.zeros(C), np.ones(C)
    axes = ref.reduce_axes(len(shape_of(1)), channel_axis)
    checks = 0
    for step in range(steps):
        global_x = (
            rng.normal(0, 1, shape_of(sum(sizes)))
            * (1 + np.arange(C) * 0.5).reshape(ref.channel_shape(len(shape_of(1)), channel_axis, C))
            + offset
            + step
        )
        global_dy = rng.normal(0, 1, global_x.shape)
        x = _local(global_x, sizes, rank, channels_last)
        dy = _local(global_dy, sizes, rank, channels_last)
        calls = comm.calls
        y = bn(x)
        assert comm.calls - calls in (1, 2)  # two when the shift was far off (tiny batches)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        np.testing.assert_allclose(
            y, ref.forward(global_x, weight, bias, channel_axis=channel_axis)[mine], atol=ATOL
        )
        mean, var = global_x.mean(axis=axes), global_x.var(axis=axes)
        n = global_x.size // C
        r_mean = 0.7 * r_mean + 0.3 * mean
        r_var = 0.7 * r_var + 0.3 * var * n / (n - 1)
        np.testing.assert_allclose(bn.running_mean, r_mean, rtol=ATOL, atol=ATOL)
        np.testing.assert_allclose(bn.running_var, r_var, rtol=ATOL, atol=ATOL)
        for buffer in (bn.running_mean, bn.running_var):
            copies = gather(comm, buffer)
            assert (copies == copies[0]).all(), "running statistics differ between processes"
        calls = comm.calls
        dx = bn.backward(dy)
        assert comm.calls - calls == 1
        rdx, rdw, rdb = ref.backward(global_x, global_dy, weight, channel_axis=channel_axis)
        np.testing.assert_allclose(dx, rdx[mine], atol=ATOL)
        assert dx.shape == x.shape and dx.strides == y.strides
        np.testing.assert_allclose(comm.allreduce_sum(bn.grads["weight"].copy()), rdw, atol=ATOL)
        np.testing.assert_allclose(comm.allreduce_sum(bn.grads["bias"].copy()), rdb, atol=ATOL)
        checks += 1
    bn.eval()
    calls = comm.calls
    y = bn(x)
    assert comm.calls == calls, "eval mode communicated"
    np.testing.assert_allclose(
        y,
        ref.forward(x, weight, bias, channel_axis=channel_axis, mean=r_mean, var=r_var),
        atol=ATOL,
    )
    return checks + 1


def check_functional(comm, sizes) -> int:
    """`sync_batch_norm` + `batch_norm_backward`, with a plain comm and with a SyncReducer."""
    rng = np.random.default_rng(99)
    global_x = rng.normal(2, 3, (sum(sizes), C, 4))
    global_dy = rng.normal(size=global_x.shape)
    start = sum(sizes[: comm.rank])
    mine = slice(start, start + sizes[comm.rank])
    x, dy = global_x[mine], global_dy[mine]
    w = rng.normal(1, 0.2, C)
    for how in (comm, SyncReducer(comm, C)):
        rm, rv = np.zeros(C), np.ones(C)
        y, saved = sync_batch_norm(x, w, None, rm, rv, momentum=1.0, comm=how)
        np.testing.assert_allclose(y, ref.forward(global_x, w)[mine], atol=ATOL)
        n = global_x.size // C
        np.testing.assert_allclose(rm, global_x.mean(axis=(0, 2)), atol=ATOL)
        np.testing.assert_allclose(rv, global_x.var(axis=(0, 2)) * n / (n - 1), atol=ATOL)
        dx, dw, db = batch_norm_backward(dy, saved)
        rdx, rdw, _ = ref.backward(global_x, global_dy, w)
        np.testing.assert_allclose(dx, rdx[mine], atol=ATOL)
        np.testing.assert_allclose(comm.allreduce_sum(dw.copy()), rdw, atol=ATOL)
        assert db is None
        y_eval, _ = sync_batch_norm(x, w, None, rm, rv, training=False, comm=how)
        np.testing.assert_allclose(y_eval, ref.forward(x, w, mean=rm, var=rv), atol=ATOL)
    return 2


def check_far_mean_is_exact(comm) -> int:
    """|mean| >> std: the first step re-centres (two all-reduces), later steps need one."""
    sizes = [4 * n for n in batch_sizes(comm.size, empty=False)]
    rng = np.random.default_rng(5)
    bn = SyncBatchNorm(C, dtype=np.float64, comm=comm)
    start = sum(sizes[: comm.rank])
    prev_var = np.ones(C)
    for step, expected_calls in enumerate((2, 1)):
        global_x = 1e8 + step + rng.normal(0, 1, (sum(sizes), C))
        calls = comm.calls
        y = bn(global_x[start : start + sizes[comm.rank]])
        assert comm.calls - calls == expected_calls, (step, comm.calls - calls)
        np.testing.assert_allclose(
            y, ref.forward(global_x)[start : start + sizes[comm.rank]], atol=1e-6
        )
        var = global_x.var(axis=0) * len(global_x) / (len(global_x) - 1)
        got = (bn.running_var - 0.9 * prev_var) / 0.1
        np.testing.assert_allclose(got, var, rtol=1e-6)
        prev_var = bn.running_var.copy()
    return 1


def check_float32(comm) -> int:
    sizes = batch_sizes(comm.size, empty=True)
    rng = np.random.default_rng(8)
    global_x = rng.normal(1, 2, (sum(sizes), C, 6)).astype(np.float32)
    start = sum(sizes[: comm.rank])
    bn = SyncBatchNorm(C, comm=comm)
    y = bn(global_x[start : start + sizes[comm.rank]])
    assert y.dtype == np.float32
    np.testing.assert_allclose(
        y, ref.forward(global_x)[start : start + sizes[comm.rank]], atol=2e-5
    )
    return 1


def _expect(exc_type, fn, *args) -> BaseException:
    try:
        fn(*args)
    except exc_type as exc:
        return exc
    raise AssertionError(f"expected {exc_type.__name__}")


def check_failures_do_not_hang(comm) -> int:
    """Bad input on some processes: they raise their own error, the others RemoteFailure
    naming them, nothing changes anywhere, and the group keeps working afterwards."""
    rank, size = comm.rank, comm.size
    rng = np.random.default_rng(7 + rank)
    bn = SyncBatchNorm(C, dtype=np.float64, comm=comm)
    state = bn.state_dict()
    good = rng.normal(size=(4, C, 2))

    def same_state() -> None:
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, state[k])

    # 1. the last process passes the wrong number of channels
    bad = size - 1
    x = rng.normal(size=(4, C + 1, 2)) if rank == bad else good
    if rank == bad:
        assert "channels" in str(_expect(ValueError, bn, x))
    else:
        exc = _expect(RemoteFailure, bn, x)
        assert exc.ranks == [bad] and f"process(es) {bad} of {size}" in str(exc)
    same_state()

    # 2. processes 0 and (for 3+) 2 pass integer input
    failing = [0] if size < 3 else [0, 2]
    x = np.ones((4, C, 2), np.int64) if rank in failing else good
    if rank in failing:
        _expect(TypeError, bn, x)
    else:
        assert _expect(RemoteFailure, bn, x).ranks == failing
    same_state()

    # 3. a NaN on one process: the global statistics are NaN, every process raises
    x = good.copy()
    if rank == 0:
        x[0, 1, 0] = np.nan
    assert "channel(s) 1" in str(_expect(FloatingPointError, bn, x))
    same_state()

    # 4. every process empty: no global batch to normalize with
    assert "over all processes" in str(_expect(ValueError, bn, np.zeros((0, C, 2))))
    same_state()

    # 5. a good step still works, then process 0 passes dy of the wrong shape to backward
    y = bn(good)
    assert y.shape == good.shape and bn.num_batches_tracked == 1
    dy = np.ones((3, C, 2)) if rank == 0 else np.ones_like(good)
    if rank == 0:
        assert "dy" in str(_expect(ValueError, bn.backward, dy))
    else:
        assert _expect(RemoteFailure, bn.backward, dy).phase == "grads"
    dx = bn.backward(np.ones_like(good) * (1 + rank))
    assert dx.shape == good.shape
    return 5


def run_all(comm) -> int:
    """Every check above on `comm` (a Counting-wrapped communicator); returns the count."""
    checks = 0
    for _name, shape_of, axis, channels_last in LAYOUTS:
        for empty in (False, True):
            sizes = batch_sizes(comm.size, empty)
            checks += check_layer_matches_global_batch(
                comm, shape_of, axis, channels_last, sizes, offset=3.0
            )
    checks += check_functional(comm, batch_sizes(comm.size, empty=True))
    checks += check_far_mean_is_exact(comm)
    checks += check_float32(comm)
    checks += check_failures_do_not_hang(comm)
    return checks
