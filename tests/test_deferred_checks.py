"""Non-finite statistics checks that the CUDA backend defers (`cupy_bn.deferred`).

The queue is tested with stand-in events; the backend's side (mask kernel, guarded running
update, no read-back in the forward) runs in the simulator with `defers_checks=True`, whose
copies are ready at once.
"""

import threading

import numpy as np
import pytest

import cupy_bn as cbn
from cupy_bn import deferred
from cupy_bn import functional as F
from cupy_bn.backends.cuda_backend import CudaBackend, Tuning, simulator_usable

needs_sim = pytest.mark.skipif(
    not simulator_usable(), reason="CUDA simulator toolchain (g++, CUDA headers) not found"
)
SPLIT = Tuning(reduction_min_work=32, elementwise_work=64)


@pytest.fixture(autouse=True)
def _empty_queue():
    """Each test starts and ends with no pending check on its thread, deferral enabled."""
    deferred._pending.checks.clear()
    previous = deferred.set_deferred_checks(True)
    yield
    deferred._pending.checks.clear()
    deferred.set_deferred_checks(previous)


class FakeEvent:
    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def wait(self) -> None:
        self.waited += 1
        self.done = True


def pending(mask, event, context="input shape (2, 3)"):
    return deferred.PendingCheck(
        np.asarray(mask, np.uint8), lambda: event.done, event.wait, context
    )


# -- the queue ------------------------------------------------------------------------------
def test_poll_never_waits_and_reports_once_the_copy_is_done():
    event = FakeEvent()
    deferred.defer(pending([0, 1, 0], event))
    deferred.poll()  # not done yet: nothing raised, nothing waited for
    assert event.waited == 0 and len(deferred._pending.checks) == 1
    event.done = True
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 of an earlier call \(input"):
        deferred.poll()
    deferred.poll()  # reported once
    assert not deferred._pending.checks


def test_poll_reports_in_order_and_stops_at_the_first_unfinished_check():
    first, second, third = FakeEvent(), FakeEvent(), FakeEvent()
    deferred.defer(pending([0, 0], first))
    deferred.defer(pending([1, 1], second))
    deferred.defer(pending([0, 1], third))
    second.done = third.done = True
    deferred.poll()  # the oldest is unfinished: the later ones wait behind it
    assert len(deferred._pending.checks) == 3
    first.done = True
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 0, 1 "):
        deferred.poll()
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 "):
        deferred.poll()


def test_check_errors_waits_for_all_and_raises_the_first_failure():
    events = [FakeEvent() for _ in range(3)]
    for mask, event in zip(([0, 0], [0, 1], [1, 0]), events, strict=True):
        deferred.defer(pending(mask, event))
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 "):
        cbn.check_errors()
    assert [e.waited for e in events] == [1, 1, 1]
    assert not deferred._pending.checks
    cbn.check_errors()  # nothing left


def test_many_bad_channels_are_summarized():
    event = FakeEvent()
    event.done = True
    deferred.defer(pending(np.ones(25), event))
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 0, 1, .*, 9 and 15 more"):
        cbn.check_errors()


def test_checks_belong_to_the_thread_that_queued_them():
    event = FakeEvent()
    event.done = True
    deferred.defer(pending([1], event))
    seen = []
    worker = threading.Thread(target=lambda: seen.append(len(deferred._pending.checks)))
    worker.start()
    worker.join()
    assert seen == [0]
    with pytest.raises(FloatingPointError):
        deferred.poll()


def test_set_deferred_checks_returns_the_previous_setting_and_wants_a_bool():
    assert cbn.set_deferred_checks(False) is True
    assert deferred.deferred_checks_enabled() is False
    assert cbn.set_deferred_checks(True) is False
    with pytest.raises(TypeError, match="enabled must be a bool"):
        cbn.set_deferred_checks("no")
    assert deferred.deferred_checks_enabled() is True


def test_numpy_backend_raises_in_the_call_whatever_the_setting():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    x[0, 1] = np.nan
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1;"):
        cbn.batch_norm(x, None, None, rm, rv, channel_axis=-1)
    assert not deferred._pending.checks
    assert (rm == 0).all() and (rv == 1).all()


# -- the CUDA backend's side, in the simulator ----------------------------------------------
def deferring_sim(tuning=None) -> CudaBackend:
    return CudaBackend.for_simulator(tuning=tuning, defers_checks=True)


def bad_input(shape=(4, 3, 5), channel=2, value=np.inf, dtype=np.float32):
    x = np.random.default_rng(9).normal(size=shape).astype(dtype)
    x[(1, channel) + (0,) * (len(shape) - 2)] = value
    return x


@pytest.fixture
def no_read_back(monkeypatch):
    """Fail on the immediate check's read-back: the deferred forward must not use it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward read its statistics check back")

    monkeypatch.setattr(F, "check_finite_stats", forbidden)


@needs_sim
@pytest.mark.parametrize(
    "running_dtype,tuning",
    [(np.float32, None), (np.float32, SPLIT), (np.float64, None), (np.float16, None)],
    ids=["fused", "fused-split", "float64-buffers", "float16-buffers"],
)
@pytest.mark.usefixtures("no_read_back")
def test_forward_queues_the_check_and_leaves_running_statistics(running_dtype, tuning):
    """float32 buffers take the fused update in the stats launch, float64 the update kernel
    and float16 the array formula: each leaves every channel unchanged, decided on the device."""
    be = deferring_sim(tuning)
    rm, rv = np.linspace(-1, 1, 3).astype(running_dtype), np.full(3, 2.0, running_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, _ = cbn.batch_norm(bad_input(), None, None, rm, rv, backend=be)  # no error yet
    assert not np.isfinite(y[:, 2]).all() and np.isfinite(y[:, :2]).all()
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert len(deferred._pending.checks) == 1
    with pytest.raises(
        FloatingPointError,
        match=r"channel\(s\) 2 of an earlier call \(input shape \(4, 3, 5\), backend 'sim'\)",
    ):
        cbn.batch_norm(bad_input(value=0.0), None, None, rm, rv, backend=be)
    np.testing.assert_array_equal(rm, rm0)  # the call that reported it changed nothing either
    cbn.batch_norm(bad_input(value=0.0), None, None, rm, rv, backend=be)
    assert not np.array_equal(rm, rm0)  # finite statistics update the buffers again


@needs_sim
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_deferred_update_matches_the_immediate_one_on_finite_batches(channel_axis):
    x = np.random.default_rng(3).normal(2.0, 3.0, (6, 4, 4)).astype(np.float32)
    results = []
    for be in (CudaBackend.for_simulator(), deferring_sim()):
        rm, rv = np.zeros(4, np.float64), np.ones(4, np.float64)  # the update kernel's path
        y, saved = cbn.batch_norm(x, None, None, rm, rv, channel_axis=channel_axis, backend=be)
        results.append((y, rm, rv))
    cbn.check_errors()  # the queued checks pass
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_sim
def test_the_backward_and_check_errors_report_a_layer_forward():
    bn = cbn.BatchNorm2d(3, backend=deferring_sim())
    x = bad_input(shape=(4, 3, 2, 2), channel=1, value=np.nan)
    y = bn(x)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 of an earlier call"):
        bn.backward(np.ones_like(y))
    bn(x)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 "):
        cbn.check_errors()
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3, np.float32))


@needs_sim
def test_the_double_backward_reports_a_pending_failure():
    be = deferring_sim()
    x = np.random.default_rng(4).normal(size=(5, 2)).astype(np.float64)
    _, saved = cbn.batch_norm(x, channel_axis=-1, backend=be)
    cbn.batch_norm(bad_input(shape=(4, 3), channel=0), channel_axis=-1, backend=be)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 0 "):
        cbn.batch_norm_double_backward(np.ones_like(x), None, None, np.ones_like(x), saved)


@needs_sim
def test_immediate_setting_raises_in_the_call():
    cbn.set_deferred_checks(False)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2;"):
        cbn.batch_norm(bad_input(), None, None, rm, rv, backend=deferring_sim())
    assert not deferred._pending.checks
    assert (rm == 0).all() and (rv == 1).all()


@needs_sim
def test_sync_batch_norm_defers_on_every_process_and_reports_inside_the_collective():
    from fake_comm import run_group

    be = deferring_sim()

    def process(comm):
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        x = bad_input(channel=2) if comm.rank == 0 else bad_input(value=0.0)
        cbn.sync_batch_norm(x, None, None, rm, rv, comm=comm, backend=be)  # merged: both bad
        unchanged = bool((rm == 0).all() and (rv == 1).all())
        try:
            cbn.sync_batch_norm(bad_input(value=0.0), None, None, rm, rv, comm=comm, backend=be)
        except FloatingPointError as error:
            return unchanged, str(error)
        return unchanged, None

    results = run_group(2, process)
    for unchanged, error in results:
        assert unchanged
        assert error is not None and "channel(s) 2 of an earlier call" in error
