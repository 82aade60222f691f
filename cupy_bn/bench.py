"""Timing reports: cupy-bn's backends against peer implementations of batch norm.

Phases (`cupy_bn.traffic.PHASES`): `forward_train` (batch statistics, running-stat update,
apply), `backward` (through batch statistics) and `eval` (running statistics). Each row reports
median and min time and two bandwidths, both from `cupy_bn.traffic`'s one model:

- GB/s: the phase's **minimal** traffic (forward-train and eval R1 W1, backward R2 W1) over the
  median, for every implementation alike, and that as a percentage of the machine's bandwidth
  (CPU: a large `numpy.copyto` measured at startup, counting read + write; GPU: the device's
  peak from its memory clock and bus width, `cupy_bn.machine`);
- moved GB/s (cupy-bn's own implementations only): the traffic our backends actually make
  (R2 W1, R4 W1, R1 W1) over the median, and its percentage of the bandwidth: how close the
  code comes to the memory's limit;

and the ratio of the median to the fastest peer's median on the same device (below 1: faster
than every peer).

Case sets (`SUITES`): "default" (ResNet-50-like NCHW and NHWC activations and a dense input,
every implementation that runs here but the simulator) and "gpu" (ResNet-50's nine batch-norm
inputs at batch 256 in both layouts, float16/bfloat16/float32, the L2 cache flushed before
every timed call; the CUDA backend through the functional API and as bare primitive launches,
against a naive CuPy composition, PyTorch's native CUDA kernels and cuDNN; needs a GPU).

CPU timings use `time.perf_counter` around each call; GPU timings use CUDA events
(`cupyx.profiler.benchmark`, or `time_gpu`'s own loop around each call after an L2 flush).
Implementations that cannot run here (no GPU, torch not installed, a dtype a peer does not
support) are skipped with a note unless named explicitly (`select_implementations`).
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupy_bn import __version__, functional, traffic
from cupy_bn.backends import available_backends, cupy_usable, get_backend, has_fused_statistics
from cupy_bn.jsonable import finite_or_none
from cupy_bn.layout import canonical
from cupy_bn.machine import (
    commit_info,
    cpu_threads,
    gpu_devices,
    machine_info,
    measure_copy_bandwidth,
)
from cupy_bn.validation import normalize_axis

__all__ = [
    "DEFAULT_IMPLEMENTATIONS",
    "IMPLEMENTATIONS",
    "PHASES",
    "SUITES",
    "BenchCase",
    "BenchReport",
    "BenchRow",
    "Implementation",
    "Suite",
    "UnavailableError",
    "default_cases",
    "gpu_cases",
    "plot_report",
    "run_bench",
    "select_implementations",
    "timing_stats",
]

PHASES: tuple[str, ...] = traffic.PHASES
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class BenchCase:
    """One input configuration: a named shape, its channel axis and dtype."""

    name: str
    shape: tuple[int, ...]
    channel_axis: int
    dtype: str

    def __post_init__(self) -> None:
        if not 2 <= len(self.shape) <= 5 or min(self.shape) < 1:
            raise ValueError(f"shape must have rank 2 to 5 and positive sizes, got {self.shape}")
        if normalize_axis(self.channel_axis, len(self.shape)) == 0:
            raise ValueError(
                f"channel_axis {self.channel_axis} is not a channel axis of shape {self.shape} "
                "(axis 0 is the batch)"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]


#: ResNet-50-like activations (first stage, NCHW and NHWC) and a dense (N, C) input.
DEFAULT_SHAPES: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("resnet50-nchw", (32, 64, 56, 56), 1),
    ("resnet50-nhwc", (32, 56, 56, 64), -1),
    ("dense", (4096, 1024), -1),
)


def default_cases(dtype: str = "float32") -> list[BenchCase]:
    return [BenchCase(name, shape, axis, dtype) for name, shape, axis in DEFAULT_SHAPES]


#: ResNet-50's batch-norm inputs at 224x224 input: (channels, spatial side).
RESNET50_BN_INPUTS: tuple[tuple[int, int], ...] = (
    (64, 112),
    (64, 56),
    (256, 56),
    (128, 28),
    (512, 28),
    (256, 14),
    (1024, 14),
    (512, 7),
    (2048, 7),
)


#: Batch of the GPU case set: large enough that no input fits in an H100/H200's 50-60 MB L2.
GPU_BATCH = 256


def gpu_cases(dtype: str = "float32", batch: int = GPU_BATCH) -> list[BenchCase]:
    """ResNet-50's batch-norm inputs at `batch`, each in NCHW and in NHWC memory."""
    cases = []
    for channels, side in RESNET50_BN_INPUTS:
        name = f"{channels}x{side}x{side}"
        cases.append(BenchCase(f"{name}-nchw", (batch, channels, side, side), 1, dtype))
        cases.append(BenchCase(f"{name}-nhwc", (batch, side, side, channels), -1, dtype))
    return cases


# ---------------------------------------------------------------------------------------------
# Implementations

Runner = Callable[[], Any]


@dataclass(frozen=True)
class Implementation:
    """A batch-norm implementation to time. `setup(case, rng)` returns one callable per phase."""

    name: str
    ours: bool
    device: str  # "cpu" or "gpu"
    available: Callable[[], str | None]  # None when it can run here, else the reason
    setup: Callable[[BenchCase, np.random.Generator], dict[str, Runner]]


_HOST_INPUTS: dict[tuple[BenchCase, str], dict[str, np.ndarray]] = {}


def _host_inputs(case: BenchCase, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A case's inputs in host memory. Every implementation of a case gets a generator in the
    same state, so the tensors of the last case are kept and shared (read-only by convention;
    drawing them dominates a large GPU case's setup), the per-channel vectors copied."""
    key = (case, repr(rng.bit_generator.state))
    tensors = _HOST_INPUTS.get(key)
    if tensors is None:
        _HOST_INPUTS.clear()
        tensors = _HOST_INPUTS[key] = {
            "x": (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1).astype(case.dtype),
            "dy": rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype),
        }
    param = np.float32 if case.itemsize < 4 else np.dtype(case.dtype)
    c = case.channels
    vectors = np.random.default_rng([c, case.itemsize])
    return {
        **tensors,
        "weight": vectors.uniform(0.5, 1.5, c).astype(param),
        "bias": vectors.standard_normal(c).astype(param),
        "running_mean": np.zeros(c, param),
        "running_var": np.ones(c, param),
    }


def _cupy_bn_setup(backend: str, to_device: Callable[[np.ndarray], Any]):
    def setup(case: BenchCase, rng: np.random.Generator) -> dict[str, Runner]:
        a = {k: to_device(v) for k, v in _host_inputs(case, rng).items()}

        def forward(training: bool):
            return functional.batch_norm(
                a["x"],
                a["weight"],
                a["bias"],
                a["running_mean"],
                a["running_var"],
                training=training,
                momentum=MOMENTUM,
                eps=EPS,
                channel_axis=case.channel_axis,
                backend=backend,
            )

        _, saved = forward(True)
        return {
            "forward_train": lambda: forward(True),
            "backward": lambda: functional.batch_norm_backward(a["dy"], saved),
            "eval": lambda: forward(False),
        }

    return setup


def _kernels_setup(backend: str, to_device: Callable[[np.ndarray], Any]):
    """The backend's primitive launches alone, without the functional layer's checks.

    forward_train: `train_statistics` + `apply`; backward: `backward_reduce` +
    `backward_apply` with the statistics of the setup's training forward; eval: `apply` with
    the scale and shift of the running statistics as the setup leaves them (one update).
    """

    def setup(case: BenchCase, rng: np.random.Generator) -> dict[str, Runner]:
        a = {k: to_device(v) for k, v in _host_inputs(case, rng).items()}
        be = get_backend(backend, a["x"])
        if not has_fused_statistics(be):
            raise TypeError(f"backend {backend!r} has no fused train_statistics")
        x = canonical(a["x"], case.channel_axis)
        dy = x.match(a["dy"], "dy")
        weight, bias = a["weight"], a["bias"]
        running = (a["running_mean"], a["running_var"])

        def fused_statistics():
            return be.train_statistics(x, weight, bias, *running, MOMENTUM, EPS)

        mean, _, invstd, _, _ = fused_statistics()
        xp = be.xp
        eval_scale = weight / xp.sqrt(a["running_var"] + EPS)
        eval_shift = bias - a["running_mean"] * eval_scale

        def forward_train():
            *_, scale, shift = fused_statistics()
            return x.restore(be.apply(x, scale, shift))

        def backward():
            sum_dy, sum_dy_xmu = be.backward_reduce(dy, x, mean, invstd)
            dx = be.backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, x.count)
            return x.restore(dx), sum_dy_xmu * invstd, sum_dy

        return {
            "forward_train": forward_train,
            "backward": backward,
            "eval": lambda: x.restore(be.apply(x, eval_scale, eval_shift)),
        }

    return setup


def _textbook_setup(xp_name: str):
    """The formulas as tutorials write them: mean, var, x_hat, then the cached backward."""

    def setup(case: BenchCase, rng: np.random.Generator) -> dict[str, Runner]:
        if xp_name == "cupy":
            import cupy as xp
        else:
            xp = np
        a = {k: xp.asarray(v) for k, v in _host_inputs(case, rng).items()}
        axis = case.channel_axis % len(case.shape)
        axes = tuple(i for i in range(len(case.shape)) if i != axis)
        shape = [1] * len(case.shape)
        shape[axis] = case.channels
        gamma, beta = a["weight"].reshape(shape), a["bias"].reshape(shape)
        m = case.numel // case.channels
        cache: dict[str, Any] = {}

        def forward_train():
            x = a["x"]
            mu = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            x_hat = (x - mu) / xp.sqrt(var + EPS)
            y = gamma * x_hat + beta
            a["running_mean"] *= 1 - MOMENTUM
            a["running_mean"] += MOMENTUM * mu.reshape(-1)
            a["running_var"] *= 1 - MOMENTUM
            a["running_var"] += MOMENTUM * var.reshape(-1) * (m / (m - 1))
            cache.update(x_hat=x_hat, invstd=1 / xp.sqrt(var + EPS))
            return y.astype(x.dtype)

        def backward():
            dy, x_hat, invstd = a["dy"], cache["x_hat"], cache["invstd"]
            dgamma = (dy * x_hat).sum(axis=axes)
            dbeta = dy.sum(axis=axes)
            dx_hat = dy * gamma
            dx = (
                invstd
                / m
                * (
                    m * dx_hat
                    - dx_hat.sum(axis=axes, keepdims=True)
                    - x_hat * (dx_hat * x_hat).sum(axis=axes, keepdims=True)
                )
            )
            return dx.astype(dy.dtype), dgamma, dbeta

        def evaluate():
            x = a["x"]
            mean = a["running_mean"].reshape(shape)
            var = a["running_var"].reshape(shape)
            return ((x - mean) / xp.sqrt(var + EPS) * gamma + beta).astype(x.dtype)

        forward_train()
        return {"forward_train": forward_train, "backward": backward, "eval": evaluate}

    return setup


def _einsum_setup(case: BenchCase, rng: np.random.Generator) -> dict[str, Runner]:
    """The textbook formulas with every per-channel sum an `np.einsum`: two-pass statistics,
    the backward's two sums over `dy` and `x - mean`, float32 accumulation for narrower data.
    The plain formulation the NumPy backend's blocks, threads and direct path have to beat."""
    a = _host_inputs(case, rng)
    ndim = len(case.shape)
    axis = case.channel_axis % ndim
    axes = "abcdefgh"[:ndim]
    sums, dots = f"{axes}->{axes[axis]}", f"{axes},{axes}->{axes[axis]}"
    shape = [1] * ndim
    shape[axis] = case.channels
    acc = np.float64 if np.dtype(case.dtype) == np.float64 else np.float32
    m = case.numel // case.channels
    w, b = a["weight"].astype(acc), a["bias"].astype(acc)
    saved: dict[str, np.ndarray] = {}

    def forward_train():
        x = a["x"].astype(acc, copy=False)
        mean = np.einsum(sums, x) / m
        centred = x - mean.reshape(shape)
        var = np.einsum(dots, centred, centred) / m
        invstd = 1 / np.sqrt(var + EPS)
        a["running_mean"] *= 1 - MOMENTUM
        a["running_mean"] += MOMENTUM * mean
        a["running_var"] *= 1 - MOMENTUM
        a["running_var"] += MOMENTUM * var * (m / (m - 1))
        saved.update(mean=mean, invstd=invstd)
        y = centred * (w * invstd).reshape(shape) + b.reshape(shape)
        return y.astype(case.dtype, copy=False)

    def backward():
        x, dy = a["x"].astype(acc, copy=False), a["dy"].astype(acc, copy=False)
        mean, invstd = saved["mean"], saved["invstd"]
        centred = x - mean.reshape(shape)
        sum_dy, sum_dy_xmu = np.einsum(sums, dy), np.einsum(dots, dy, centred)
        k = w * invstd
        q = k * invstd * invstd * sum_dy_xmu / m
        dx = dy * k.reshape(shape) - centred * q.reshape(shape) - (k * sum_dy / m).reshape(shape)
        return dx.astype(case.dtype, copy=False), sum_dy_xmu * invstd, sum_dy

    def evaluate():
        scale = w / np.sqrt(a["running_var"] + EPS)
        shift = b - a["running_mean"] * scale
        y = a["x"] * scale.reshape(shape) + shift.reshape(shape)
        return y.astype(case.dtype, copy=False)

    forward_train()
    return {"forward_train": forward_train, "backward": backward, "eval": evaluate}


def _torch_inputs(case: BenchCase, rng: np.random.Generator, device: str) -> dict[str, Any]:
    """The case's inputs as PyTorch tensors on `device`. `x` and `dy` are NCHW views: a
    channels-last input stays in its memory order (a permuted, strided view)."""
    import torch

    axis = case.channel_axis % len(case.shape)
    if axis == 0:
        raise ValueError("channel axis 0 has no PyTorch equivalent")
    order = [0, axis, *[i for i in range(1, len(case.shape)) if i != axis]]
    tensors = {k: torch.from_numpy(v).to(device) for k, v in _host_inputs(case, rng).items()}
    for k in ("x", "dy"):
        tensors[k] = tensors[k].permute(*order)
    return tensors


def _without_autograd(fn: Runner) -> Runner:
    """`fn` run under `torch.no_grad()`: the kernels alone, no autograd graph."""
    import torch

    def call():
        with torch.no_grad():
            return fn()

    return call


def _torch_setup(device: str):
    def setup(case: BenchCase, rng: np.random.Generator) -> dict[str, Runner]:
        import torch

        t = _torch_inputs(case, rng, device)
        x, dy, w, b = t["x"], t["dy"], t["weight"], t["bias"]
        rm, rv = t["running_mean"], t["running_var"]
        ops = torch.ops.aten
        with torch.no_grad():
            _, save_mean, save_invstd = ops.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)
        return {
            "forward_train": _without_autograd(
                lambda: ops.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)
            ),
            "backward": _without_autograd(
                lambda: ops.native_batch_norm_backward(
                    dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, [True, True, True]
                )
            ),
            "eval": _without_autograd(
                lambda: ops.native_batch_norm(x, w, b, rm, rv, False, MOMENTUM, EPS)
            ),
        }

    return setup


def _cudnn_setup(case: BenchCase, rng: np.random.Generator) -> dict[str, Runner]:
    """PyTorch's cuDNN batch norm (what `F.batch_norm` runs on CUDA for float16, bfloat16 and
    float32, persistent kernels for channels_last), as its two aten ops alone."""
    import torch

    t = _torch_inputs(case, rng, "cuda")
    x, dy, w, b = t["x"], t["dy"], t["weight"], t["bias"]
    rm, rv = t["running_mean"], t["running_var"]
    ops = torch.ops.aten
    with torch.no_grad():
        _, save_mean, save_var, reserve = ops.cudnn_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)
    return {
        "forward_train": _without_autograd(
            lambda: ops.cudnn_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)
        ),
        "backward": _without_autograd(
            lambda: ops.cudnn_batch_norm_backward(
                x, dy, w, rm, rv, save_mean, save_var, EPS, reserve
            )
        ),
        "eval": _without_autograd(
            lambda: ops.cudnn_batch_norm(x, w, b, rm, rv, False, MOMENTUM, EPS)
        ),
    }


def _torch_available(device: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed"
        if device == "cuda" and not torch.cuda.is_available():
            return "no usable GPU for PyTorch"
        return None

    return check


def _backend_available(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if name == "cuda" and not cupy_usable():
            return "no usable GPU (cupy.is_available() is False)"
        if name not in available_backends():
            return f"backend {name!r} is not available here"
        return None

    return check


def _gpu_available() -> str | None:
    return None if cupy_usable() else "no usable GPU (cupy.is_available() is False)"


def _always() -> str | None:
    return None


def _to_cupy(v: np.ndarray) -> Any:
    import cupy

    return cupy.asarray(v)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "cupy_bn.numba",
            True,
            "cpu",
            _backend_available("numba"),
            _cupy_bn_setup("numba", np.asarray),
        ),
        Implementation(
            "cupy_bn.numpy",
            True,
            "cpu",
            _backend_available("numpy"),
            _cupy_bn_setup("numpy", np.asarray),
        ),
        Implementation(
            "cupy_bn.sim", True, "cpu", _backend_available("sim"), _cupy_bn_setup("sim", np.asarray)
        ),
        Implementation(
            "cupy_bn.cuda",
            True,
            "gpu",
            _backend_available("cuda"),
            _cupy_bn_setup("cuda", _to_cupy),
        ),
        Implementation(
            "cupy_bn.cuda.kernels",
            True,
            "gpu",
            _backend_available("cuda"),
            _kernels_setup("cuda", _to_cupy),
        ),
        Implementation("numpy.textbook", False, "cpu", _always, _textbook_setup("numpy")),
        Implementation("numpy.einsum", False, "cpu", _always, _einsum_setup),
        Implementation("torch.cpu", False, "cpu", _torch_available("cpu"), _torch_setup("cpu")),
        Implementation("torch.cuda", False, "gpu", _torch_available("cuda"), _torch_setup("cuda")),
        Implementation("torch.cuda.cudnn", False, "gpu", _torch_available("cuda"), _cudnn_setup),
        Implementation("cupy.naive", False, "gpu", _gpu_available, _textbook_setup("cupy")),
    )
}

#: Everything but the simulator, which runs kernels on the CPU thread by thread (far too slow
#: for real shapes; name it explicitly to time tiny ones), and the bare kernel launches (the
#: "gpu" case set's).
DEFAULT_IMPLEMENTATIONS: tuple[str, ...] = tuple(
    n for n in IMPLEMENTATIONS if n not in ("cupy_bn.sim", "cupy_bn.cuda.kernels")
)


@dataclass(frozen=True)
class Suite:
    """A case set: the cases and implementations `cupy-bn bench --suite NAME` times."""

    name: str
    cases: Callable[[str], list[BenchCase]]  # dtype -> cases
    implementations: tuple[str, ...]
    needs_gpu: bool
    dtypes: tuple[str, ...] = ("float32",)  # timed when no dtype is asked for
    flush_l2: bool = False  # evict the GPU's L2 cache before every timed call


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("default", default_cases, DEFAULT_IMPLEMENTATIONS, needs_gpu=False),
        Suite(
            "gpu",
            gpu_cases,
            (
                "cupy_bn.cuda",
                "cupy_bn.cuda.kernels",
                "cupy.naive",
                "torch.cuda",
                "torch.cuda.cudnn",
            ),
            needs_gpu=True,
            dtypes=("float16", "bfloat16", "float32"),
            flush_l2=True,
        ),
    )
}


class UnavailableError(RuntimeError):
    """An implementation or case set that was asked for cannot run on this machine."""


def select_implementations(requested: Iterable[str] = (), suite: str = "default") -> list[str]:
    """The implementations to time: `requested` (in order, once each) or the suite's.

    Raises ValueError for an unknown suite or implementation, and UnavailableError when the
    suite needs a GPU and none is usable, when a requested implementation of cupy-bn's own
    cannot run here, or when none of the requested ones can. Unavailable peers among those
    requested, and any among the suite's, are left to `run_bench`, which notes them.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {suite!r}")
    chosen = SUITES[suite]
    if chosen.needs_gpu and (reason := _gpu_available()) is not None:
        raise UnavailableError(f"case set {suite!r} needs a GPU: {reason}")
    names = list(dict.fromkeys(requested))
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementations: unknown {name!r} (known: {', '.join(IMPLEMENTATIONS)})"
            )
    if not names:
        return list(chosen.implementations)
    reasons = {name: IMPLEMENTATIONS[name].available() for name in names}
    for name, reason in reasons.items():
        if reason is not None and IMPLEMENTATIONS[name].ours:
            raise UnavailableError(f"{name} cannot run here: {reason}")
    if all(reason is not None for reason in reasons.values()):
        listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        raise UnavailableError(f"none of the requested implementations can run here ({listed})")
    return names


# ---------------------------------------------------------------------------------------------
# Timing and statistics


def time_cpu(fn: Runner, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_gpu(fn: Runner, repeat: int, warmup: int, flush: Runner | None = None) -> list[float]:
    """Device seconds per call, from CUDA events on the current stream (PyTorch's default
    stream and CuPy's are the same legacy stream). `flush` runs before every call, untimed."""
    if flush is None:
        from cupyx.profiler import benchmark

        result = benchmark(fn, n_repeat=repeat, n_warmup=warmup)
        return [float(t) for t in np.asarray(result.gpu_times).reshape(-1)]
    import cupy

    for _ in range(warmup):
        flush()
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        flush()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return times


def l2_flush(xp: Any, l2_bytes: int) -> Runner:
    """A call that writes a buffer twice the size of the L2 cache, evicting what a timed call
    left there (the next call then reads its inputs from memory, as in a network)."""
    buffer = xp.empty(2 * max(l2_bytes, 1), np.uint8)

    def flush() -> None:
        buffer.fill(1)

    return flush


def _device_l2_bytes() -> int:
    import cupy

    runtime = cupy.cuda.runtime
    return int(runtime.deviceGetAttribute(runtime.cudaDevAttrL2CacheSize, cupy.cuda.Device().id))


def timing_stats(times: Sequence[float]) -> dict[str, Any]:
    """pytest-benchmark's `stats` block for a list of per-call times in seconds.

    Plain JSON types: Python floats and ints, `ops` None when the mean time is zero.
    """
    data = sorted(float(t) for t in times)
    n = len(data)
    mean = statistics.fmean(data)
    stddev = statistics.stdev(data) if n > 1 else 0.0
    if n > 1:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    inside = [t for t in data if low <= t <= high]
    iqr_outliers = n - len(inside)
    stddev_outliers = sum(1 for t in data if abs(t - mean) > stddev)
    return {
        "min": data[0],
        "max": data[-1],
        "mean": mean,
        "stddev": stddev,
        "rounds": n,
        "median": statistics.median(data),
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": iqr_outliers,
        "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": min(inside) if inside else data[0],
        "hd15iqr": max(inside) if inside else data[-1],
        "ops": 1.0 / mean if mean > 0 else None,
        "total": sum(data),
        "iterations": 1,
        "data": [float(t) for t in times],
    }


def _per_second(nbytes: int | None, seconds: float) -> float | None:
    """Bytes per second, None without bytes or a positive time."""
    return nbytes / seconds if nbytes is not None and seconds > 0 else None


@dataclass
class BenchRow:
    """Timings of one implementation on one case and phase.

    Bytes and bandwidths come from `cupy_bn.traffic`: `minimal_bytes` for every row,
    `moved_bytes` (what cupy-bn's backends move) for cupy-bn's own implementations only.
    """

    impl: str
    ours: bool
    device: str
    case: BenchCase
    phase: str
    stats: dict[str, Any]
    bandwidth_limit: float | None = None
    ratio_to_fastest_peer: float | None = None

    @property
    def median(self) -> float:
        return self.stats["median"]

    @property
    def minimal_bytes(self) -> int:
        return traffic.minimal_bytes(self.phase, self.case.numel, self.case.itemsize)

    @property
    def moved_bytes(self) -> int | None:
        if not self.ours:
            return None
        return traffic.moved_bytes(self.phase, self.case.numel, self.case.itemsize)

    @property
    def gbps(self) -> float | None:
        """Minimal bytes over the median, in GB/s; None for a zero median."""
        rate = _per_second(self.minimal_bytes, self.median)
        return None if rate is None else rate / 1e9

    @property
    def moved_gbps(self) -> float | None:
        """Bytes our backends move over the median, in GB/s; None for peers."""
        rate = _per_second(self.moved_bytes, self.median)
        return None if rate is None else rate / 1e9

    @property
    def percent_of_bandwidth(self) -> float | None:
        """`gbps` as a percentage of the machine's bandwidth, None when that is unknown."""
        return self._percent(self.minimal_bytes)

    @property
    def moved_percent_of_bandwidth(self) -> float | None:
        """`moved_gbps` as a percentage of the machine's bandwidth."""
        return self._percent(self.moved_bytes)

    def _percent(self, nbytes: int | None) -> float | None:
        rate = _per_second(nbytes, self.median)
        if rate is None or not self.bandwidth_limit:
            return None
        return 100.0 * rate / self.bandwidth_limit

    def to_json(self, warmup: int) -> dict[str, Any]:
        """The row as one entry of pytest-benchmark's `benchmarks` list, in plain JSON types."""
        case = self.case
        name = f"{self.phase}[{case.name}-{case.dtype}-{self.impl}]"
        return {
            "group": f"{case.name} {case.dtype} {self.phase}",
            "name": name,
            "fullname": f"cupy-bn bench::{name}",
            "params": {
                "shape": list(case.shape),
                "channel_axis": case.channel_axis,
                "dtype": case.dtype,
                "phase": self.phase,
                "implementation": self.impl,
            },
            "param": f"{case.name}-{case.dtype}-{self.impl}",
            "extra_info": {
                "ours": self.ours,
                "device": self.device,
                "minimal_bytes": self.minimal_bytes,
                "gbps": finite_or_none(self.gbps),
                "percent_of_bandwidth": finite_or_none(self.percent_of_bandwidth),
                "moved_bytes": self.moved_bytes,
                "moved_gbps": finite_or_none(self.moved_gbps),
                "moved_percent_of_bandwidth": finite_or_none(self.moved_percent_of_bandwidth),
                "bandwidth_limit": finite_or_none(self.bandwidth_limit),
                "ratio_to_fastest_peer": finite_or_none(self.ratio_to_fastest_peer),
            },
            "options": {
                "timer": "cupyx.profiler.benchmark" if self.device == "gpu" else "perf_counter",
                "warmup": warmup,
                "rounds": self.stats["rounds"],
            },
            "stats": {
                k: finite_or_none(v) if isinstance(v, float) else v for k, v in self.stats.items()
            },
        }


@dataclass
class BenchReport:
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Failures of our own implementations (peer failures are notes)."""
    cpu_bandwidth: float | None = None
    cpu_threads: int = 1
    gpus: list[dict[str, Any]] = field(default_factory=list)
    repeat: int = 0
    warmup: int = 0

    def to_json(self) -> dict[str, Any]:
        """pytest-benchmark's JSON shape (`machine_info`, `commit_info`, `benchmarks[].stats`),
        plus `notes` and `errors`, in plain JSON types (non-finite figures are None)."""
        return {
            "machine_info": machine_info(finite_or_none(self.cpu_bandwidth), self.gpus),
            "commit_info": commit_info(),
            "benchmarks": [row.to_json(self.warmup) for row in self.rows],
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": __version__,
            "notes": list(self.notes),
            "errors": list(self.errors),
        }


def run_bench(
    cases: Iterable[BenchCase],
    implementations: Iterable[str] = DEFAULT_IMPLEMENTATIONS,
    phases: Iterable[str] = PHASES,
    *,
    repeat: int = 10,
    warmup: int = 2,
    seed: int = 0,
    copy_bytes: int = 256 << 20,
    progress: Callable[[str], None] | None = None,
    flush_l2: bool = False,
) -> BenchReport:
    """Time every (case, phase, implementation); see the module docstring for the figures.

    Implementations that cannot run here are skipped with a note (`select_implementations`
    refuses those that must run). `progress(label)` is called once per (case, implementation,
    phase), after timing it. `flush_l2`: GPU calls are timed one at a time, each after writing
    twice the device's L2 size (`l2_flush`).
    """
    cases, phases = list(cases), list(phases)
    names = list(implementations)
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementations: unknown {name!r} (known: {', '.join(IMPLEMENTATIONS)})"
            )
    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"phases: unknown {phase!r} (known: {', '.join(PHASES)})")
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}")
    report = BenchReport(repeat=repeat, warmup=warmup)
    runnable = []
    for name in names:
        impl = IMPLEMENTATIONS[name]
        reason = impl.available()
        if reason is None:
            runnable.append(impl)
        else:
            report.notes.append(f"{name} skipped: {reason}")
    on_gpu = any(i.device == "gpu" for i in runnable)
    report.cpu_bandwidth = measure_copy_bandwidth(copy_bytes)
    report.cpu_threads = cpu_threads()
    report.gpus = gpu_devices() if on_gpu else []
    gpu_peak = report.gpus[0]["peak_bandwidth"] if report.gpus else None
    flush = None
    if on_gpu and flush_l2:
        import cupy

        flush = l2_flush(cupy, _device_l2_bytes())

    for case_index, case in enumerate(cases):
        for impl in runnable:
            rng = np.random.default_rng([seed, case_index])
            try:
                runners = impl.setup(case, rng)
                for phase in phases:
                    if impl.device == "gpu":
                        times = time_gpu(runners[phase], repeat, warmup, flush)
                    else:
                        times = time_cpu(runners[phase], repeat, warmup)
                    report.rows.append(
                        BenchRow(
                            impl=impl.name,
                            ours=impl.ours,
                            device=impl.device,
                            case=case,
                            phase=phase,
                            stats=timing_stats(times),
                            bandwidth_limit=gpu_peak
                            if impl.device == "gpu"
                            else report.cpu_bandwidth,
                        )
                    )
                    if progress is not None:
                        progress(f"{case.name} {impl.name} {phase}")
            except Exception as e:  # a peer failing on a case is a note, ours an error
                message = f"{impl.name} on {case.name}: {type(e).__name__}: {e}"
                (report.errors if impl.ours else report.notes).append(
                    message if impl.ours else message + " (skipped)"
                )
                if progress is not None:
                    done = sum(1 for r in report.rows if r.impl == impl.name and r.case == case)
                    for _ in range(len(phases) - done):
                        progress(f"{case.name} {impl.name} failed")
            finally:
                runners = None  # the case's arrays go before the next implementation's come
        if on_gpu:
            _release_gpu_memory()
    _fill_ratios(report.rows)
    return report


def _release_gpu_memory() -> None:
    """Hand the cached blocks of the finished case back, so large cases fit one after another."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()


def _fill_ratios(rows: list[BenchRow]) -> None:
    fastest: dict[tuple, float] = {}
    for row in rows:
        if not row.ours:
            key = (row.case, row.phase, row.device)
            fastest[key] = min(fastest.get(key, math.inf), row.median)
    for row in rows:
        best = fastest.get((row.case, row.phase, row.device))
        if best is not None and best > 0:
            row.ratio_to_fastest_peer = row.median / best


# ---------------------------------------------------------------------------------------------
# Output


def plot_report(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """Bar chart of achieved GB/s per implementation, one group per (case, phase); PNG.

    Needs matplotlib (`pip install 'cupy-bn[plot]'`); raises ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cupy_bn.modelfile import atomic_output

    groups = list(dict.fromkeys((r.case.name, r.case.dtype, r.phase) for r in report.rows))
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    by_key = {(r.case.name, r.case.dtype, r.phase, r.impl): r for r in report.rows}
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    for k, impl in enumerate(impls):
        values = [(by_key[(*g, impl)].gbps or 0.0) if (*g, impl) in by_key else 0.0 for g in groups]
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{d}\n{p}" for c, d, p in groups], fontsize=8)
    ax.set_ylabel("GB/s (minimal-traffic model)")
    if report.cpu_bandwidth:
        ax.axhline(
            report.cpu_bandwidth / 1e9,
            color="gray",
            linestyle="--",
            linewidth=1,
            label="CPU copy bandwidth",
        )
    ax.set_title("cupy-bn bench")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
