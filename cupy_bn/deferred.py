"""Non-finite batch statistics found on a GPU, reported without stalling the host.

The NumPy backend raises `FloatingPointError` in the training call that met NaN or Inf. On a
GPU that would mean reading a flag back: the host waits for every kernel queued before it
(15-40 us per layer) and cannot queue ahead. A backend that `defers_checks` (the CUDA backend)
instead leaves the running statistics unchanged on the device (all channels or none, as the
immediate check does) and copies a per-channel mask to pinned host memory asynchronously,
behind an event. The error then surfaces, naming the channels and the call:

- in the first later `batch_norm`, `batch_norm_backward` or `batch_norm_double_backward` call
  (layers included) on the same host thread after the device has finished that forward: it
  polls the events and never waits for one;
- in `check_errors()`, which waits for every pending check of the thread: call it where a
  training loop synchronizes anyway (end of a step or epoch, before saving a checkpoint).

`set_deferred_checks(False)` makes such backends check in the call itself, synchronizing.
The output of a failing call holds NaN or Inf in the channels named, as it would with the
immediate check's output discarded.

    import cupy_bn as cbn
    cbn.check_errors()                       # nothing pending on the CPU: returns at once
    previous = cbn.set_deferred_checks(False)
    cbn.set_deferred_checks(previous)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PendingCheck",
    "check_errors",
    "defer",
    "deferred_checks_enabled",
    "describe_channels",
    "nonfinite_error",
    "poll",
    "set_deferred_checks",
]


@dataclass(frozen=True)
class PendingCheck:
    """One forward's statistics check, in flight on a device.

    `mask` is a host array, filled once `ready()` is true, with a nonzero entry per channel
    whose statistics are not finite; `wait()` blocks until it is filled; `context` names the
    call in the error (the input's shape and the backend). `keep` holds device memory the
    copy reads from until the check is done.
    """

    mask: np.ndarray
    ready: Callable[[], bool]
    wait: Callable[[], None]
    context: str
    keep: Any = None


class _PendingChecks(threading.local):
    """The checks launched by this host thread, oldest first."""

    def __init__(self) -> None:
        self.checks: deque[PendingCheck] = deque()


_pending = _PendingChecks()
_enabled = True


def set_deferred_checks(enabled: bool) -> bool:
    """Whether backends that can check statistics on their device without waiting do so
    (default True; process-wide). Returns the previous setting. With False, every training
    call reads its check back and raises at once, as on the NumPy backend."""
    global _enabled
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _enabled = _enabled, bool(enabled)
    return previous


def deferred_checks_enabled() -> bool:
    """The setting of `set_deferred_checks`."""
    return _enabled


def defer(check: PendingCheck) -> None:
    """Queue `check` on this thread; `poll` or `check_errors` reports it."""
    _pending.checks.append(check)


def describe_channels(bad: Any) -> str:
    """Channel indices as text: the first ten, then how many more."""
    shown = ", ".join(str(int(c)) for c in bad[:10])
    return shown + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")


def nonfinite_error(bad: Any, context: str = "") -> FloatingPointError:
    """The error for channels `bad` whose batch statistics are NaN or Inf."""
    where = f" of an earlier call ({context})" if context else ""
    return FloatingPointError(
        f"batch statistics are not finite in channel(s) {describe_channels(bad)}{where}; "
        "the input holds NaN or Inf (running statistics left unchanged)"
    )


def _raise_if_bad(check: PendingCheck) -> None:
    bad = np.flatnonzero(check.mask)
    if bad.size:
        raise nonfinite_error(bad, check.context)


def poll() -> None:
    """Report the finished checks of this thread, oldest first, without waiting: raises the
    first failure (the checks before it are dropped; later ones stay queued)."""
    checks = _pending.checks
    while checks and checks[0].ready():
        _raise_if_bad(checks.popleft())


def check_errors() -> None:
    """Wait for every pending statistics check of this thread and raise the first failure as
    `FloatingPointError` (all of them are dropped: each is reported once)."""
    checks = _pending.checks
    failure = None
    while checks:
        check = checks.popleft()
        check.wait()
        if failure is None and np.flatnonzero(check.mask).size:
            failure = check
    if failure is not None:
        _raise_if_bad(failure)
