"""Sync batch norm in one process: the merge formulas, failure flags, the reducer and layer on
fake thread 'processes', conversion of layers, and the communicator adapters."""

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import sync_scenarios
from fake_comm import Counting, run_group

import cupy_bn as cbn
from cupy_bn.backends import cupy_usable
from cupy_bn.communicators import Communicator, as_communicator
from cupy_bn.distributed import (
    FLAG_BITS,
    RemoteFailure,
    SyncBatchNorm,
    SyncReducer,
    centred_m2,
    convert_sync_batchnorm,
    failed_ranks,
    failure_flags,
    merge_shifted,
    shifted_terms,
)


# -- Chan's merge as sums ------------------------------------------------------------------
def _parts(rng, sizes, loc, scale):
    data = rng.normal(loc, scale, (sum(sizes), 4))
    bounds = np.cumsum([0, *sizes])
    return data, [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _summed_terms(parts, shift):
    s1, s2 = np.zeros(4), np.zeros(4)
    for p in parts:
        n = len(p)
        mean = p.mean(0) if n else np.zeros(4)
        var = p.var(0) if n else np.zeros(4)
        t1, t2 = shifted_terms(n, mean, var, shift)
        s1, s2 = s1 + t1, s2 + t2
    return s1, s2


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1], [1, 1], [100], [0, 3, 0, 250, 2]])
def test_shifted_sums_merge_to_the_statistics_of_the_concatenation(sizes):
    rng = np.random.default_rng(len(sizes))
    data, parts = _parts(rng, sizes, loc=[0.0, 5.0, -3.0, 1.0], scale=[1.0, 2.0, 0.5, 3.0])
    shift = np.array([0.5, 4.0, -2.0, 0.0])
    s1, s2 = _summed_terms(parts, shift)
    mean, var, far = merge_shifted(len(data), s1, s2, shift)
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var, data.var(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(far, (data.mean(0) - shift) ** 2 > 1024 * data.var(0))


def test_unequal_parts_are_weighted_by_count_not_averaged():
    rng = np.random.default_rng(1)
    data, parts = _parts(rng, [2, 50], loc=0.0, scale=1.0)
    parts[0] += 10  # a small part far from the large one
    data = np.concatenate(parts)
    mean, var, _ = merge_shifted(len(data), *_summed_terms(parts, np.zeros(4)), np.zeros(4))
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, data.var(0), rtol=1e-12)
    mean_of_means = (parts[0].mean(0) + parts[1].mean(0)) / 2
    assert np.abs(mean_of_means - data.mean(0)).min() > 1  # the wrong answer is far off


def test_far_shift_is_flagged_and_the_centred_pass_is_exact():
    rng = np.random.default_rng(2)
    data, parts = _parts(rng, [7, 0, 30, 12], loc=1e7, scale=1.0)
    shift = np.zeros(4)
    total = len(data)
    mean, var, far = merge_shifted(total, *_summed_terms(parts, shift), shift)
    expected = ((data - data.mean(0)) ** 2).mean(0)
    assert far.all()
    assert np.abs(var / expected - 1).max() > 1e-7  # the shifted sums lost digits here
    m2 = sum(
        centred_m2(
            len(p), p.mean(0) if len(p) else np.zeros(4), p.var(0) if len(p) else np.zeros(4), mean
        )
        for p in parts
    )
    np.testing.assert_allclose(m2 / total, expected, rtol=1e-9)
    # and the same data with a shift near the mean needs no second pass
    near = data.mean(0) + 2.0
    mean2, var2, far2 = merge_shifted(total, *_summed_terms(parts, near), near)
    assert not far2.any()
    assert merge_shifted(total, *_summed_terms(parts, near), near, ratio=1.0)[2].all()
    np.testing.assert_allclose(var2, expected, rtol=1e-8)


def test_failure_flags_round_trip_through_a_sum():
    size = 2 * FLAG_BITS + 7
    for ranks in ([0], [FLAG_BITS - 1, FLAG_BITS], [3, 60, size - 1], list(range(size))):
        total = sum(failure_flags(r, size) for r in ranks)
        assert failed_ranks(total) == sorted(ranks)
    assert failed_ranks(np.zeros(3)) == []


# -- the reducer and layer on fake processes -----------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3])
def test_sync_batch_norm_on_fake_processes_matches_the_global_batch(size):
    counts = run_group(size, lambda comm: sync_scenarios.run_all(Counting(comm)))
    assert counts == [counts[0]] * size and counts[0] > 20


def test_one_process_group_equals_plain_batch_norm():
    rng = np.random.default_rng(3)
    x = rng.normal(2, 1, (6, 4, 5, 5))

    def step(comm):
        bn = SyncBatchNorm(4, dtype=np.float64, comm=comm)
        return bn(x), bn.backward(x * 0.5), bn.state_dict()

    ((y, dx, state),) = run_group(1, step)
    bn = cbn.BatchNorm2d(4, dtype=np.float64)
    np.testing.assert_allclose(y, bn(x), atol=1e-12)
    np.testing.assert_allclose(dx, bn.backward(x * 0.5), atol=1e-12)
    for k, v in bn.state_dict().items():
        np.testing.assert_allclose(state[k], v, atol=1e-12)


def test_a_process_missing_a_collective_times_out_instead_of_hanging():
    def fn(comm):
        if comm.rank == 0:
            return None  # never joins
        SyncBatchNorm(2, comm=comm)(np.ones((3, 2), np.float32))

    with pytest.raises(AssertionError, match="BrokenBarrierError"):
        run_group(2, fn, timeout=0.5)


def test_reducer_rejects_statistics_of_the_wrong_channel_count_before_communicating():
    def fn(comm):
        counting = Counting(comm)
        reducer = SyncReducer(counting, 3)
        with pytest.raises(ValueError, match=r"mean must have shape \(3,\), one value per channel"):
            reducer.merge_stats(4, np.zeros(2), np.zeros(2))
        return counting.calls

    assert run_group(1, fn) == [0]


def test_reducer_and_layer_argument_errors():
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        SyncBatchNorm(3, comm="world")
    with pytest.raises(TypeError, match="comm"):
        SyncBatchNorm(3)  # comm is required
    with pytest.raises(ValueError, match="num_features"):
        SyncReducer(_SoloComm(), 0)


class _SoloComm:
    rank, size = 0, 1

    def allreduce_sum(self, buffer):
        return buffer


def test_remote_failure_message_names_the_processes_and_phase():
    exc = RemoteFailure([1, 4], 6, "grads")
    assert "process(es) 1, 4 of 6" in str(exc) and "gradient all-reduce" in str(exc)
    assert isinstance(exc, RuntimeError)


def test_layer_accepts_ranks_two_to_five_and_reports_its_comm():
    bn = SyncBatchNorm(2, dtype=np.float64, comm=_SoloComm())
    rng = np.random.default_rng(4)
    for shape in [(4, 2), (4, 2, 3), (4, 2, 3, 3), (4, 2, 3, 3, 2)]:
        x = rng.normal(size=shape)
        np.testing.assert_allclose(bn(x), cbn.batch_norm(x)[0], atol=1e-12)
    with pytest.raises(ValueError, match="rank 2 or 3 or 4 or 5"):
        bn(np.ones((2, 2, 2, 2, 2, 2)))
    assert "comm=" in repr(bn) and isinstance(bn.comm, Communicator)


# -- convert_sync_batchnorm ----------------------------------------------------------------
def test_convert_replaces_batch_norm_layers_in_nested_containers_keeping_state():
    Pair = namedtuple("Pair", "first second")
    bn1 = cbn.BatchNorm1d(3, momentum=None, eps=1e-3, dtype=np.float64)
    bn2 = cbn.BatchNorm2d(4, affine=False, channel_axis=-1)
    bn3 = cbn.BatchNorm3d(2, track_running_stats=False).eval()
    bn1(np.random.default_rng(5).normal(size=(5, 3)))
    dense = {"w": np.ones((3, 3))}
    model = OrderedDict(head=[bn1, dense, (bn2, "relu")], tail=Pair(bn3, bn1), n=7)
    out = convert_sync_batchnorm(model, _SoloComm())

    assert type(out) is OrderedDict and list(out) == ["head", "tail", "n"]
    s1, kept, (s2, act) = out["head"]
    assert kept is dense and act == "relu" and out["n"] == 7
    assert isinstance(out["tail"], Pair) and out["tail"].second is s1  # shared layer stays shared
    s3 = out["tail"].first
    for old, new in ((bn1, s1), (bn2, s2), (bn3, s3)):
        assert type(new) is SyncBatchNorm
        assert (
            new.num_features,
            new.eps,
            new.momentum,
            new.affine,
            new.track_running_stats,
            new.channel_axis,
            new.dtype,
            new.training,
        ) == (
            old.num_features,
            old.eps,
            old.momentum,
            old.affine,
            old.track_running_stats,
            old.channel_axis,
            old.dtype,
            old.training,
        )
        for d_old, d_new in (
            (old.params, new.params),
            (old.buffers, new.buffers),
            (old.grads, new.grads),
        ):
            assert d_old.keys() == d_new.keys()
            assert all(d_new[k] is d_old[k] for k in d_old)  # the same arrays
    assert s1.num_batches_tracked == 1
    assert bn1 is model["head"][0]  # the input structure is untouched


def test_convert_a_single_layer_and_leave_other_objects_alone():
    bn = cbn.BatchNorm1d(2)
    assert type(convert_sync_batchnorm(bn, _SoloComm())) is SyncBatchNorm
    assert convert_sync_batchnorm("relu", _SoloComm()) == "relu"
    with pytest.raises(TypeError, match="comm must be"):
        convert_sync_batchnorm([bn], object())


# -- communicator adapters -----------------------------------------------------------------
def test_as_communicator_passes_communicators_through_and_rejects_others():
    solo = _SoloComm()
    assert as_communicator(solo) is solo
    with pytest.raises(TypeError, match="got builtins.int"):
        as_communicator(3)


class _FakeNccl:
    """Duck type of cupy.cuda.nccl.NcclCommunicator for a one-GPU group."""

    def rank_id(self):
        return 0

    def size(self):
        return 1

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (NCCL's name)
        assert send == recv and count > 0


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_usable(), reason="needs a usable CuPy device")
def test_nccl_adapter_reduces_cupy_and_staged_numpy_buffers():
    import cupy

    comm = as_communicator(_FakeNccl())
    assert (comm.rank, comm.size) == (0, 1)
    out = comm.allreduce_sum(cupy.arange(5, dtype=cupy.float64))
    assert isinstance(out, cupy.ndarray) and out.get().tolist() == [0, 1, 2, 3, 4]
    out = comm.allreduce_sum(np.arange(3, dtype=np.float64))
    assert isinstance(out, np.ndarray) and out.tolist() == [0, 1, 2]
