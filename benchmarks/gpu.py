"""CUDA backend on a GPU: our kernels against a naive CuPy composition and PyTorch's batch norm.

    python benchmarks/gpu.py [--dtype float32] [--batch 32] [--repeat 50] [--json out.json]

Times forward-train, backward and eval on ResNet-50's batch-norm activation shapes, in both
layouts (NCHW and NHWC memory), with CUDA events (`cupyx.profiler.benchmark`, median GPU time).
Bandwidth figures divide the bytes of our traffic model (forward-train 3 tensor passes,
backward 5, eval 2; `cupy_bn.backends.cuda_backend.traffic_bytes`) by the time, for every
implementation, so they compare like for like; "% peak" relates that to the device's peak
DRAM bandwidth, 2 x memoryClockRate x memoryBusWidth / 8. Goal on H100-class GPUs: >= 85%
on these shapes.

Implementations:
- cupy-bn: `cupy_bn.batch_norm` / `batch_norm_backward` (what users call, per-channel work and
  the finiteness check included);
- kernels: the backend's primitive launches only (`train_statistics` + `apply`,
  `backward_reduce` + `backward_apply`, `apply`);
- naive: textbook CuPy array expressions (`x.mean`, `x.var`, broadcasting);
- torch: `torch.ops.aten.native_batch_norm(_backward)` on CUDA tensors, when torch has CUDA.

Exits with a one-line message (status 1) when no GPU is usable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:  # run from a checkout without installing: use the package next to this folder
    import cupy_bn  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: ResNet-50's batch-norm inputs (channels, spatial side) at 224x224 input.
RESNET50 = [
    (64, 112),
    (64, 56),
    (256, 56),
    (128, 28),
    (512, 28),
    (256, 14),
    (1024, 14),
    (512, 7),
    (2048, 7),
]
PHASES = ("forward_train", "backward", "eval")


def fail(message: str) -> None:
    print(f"benchmarks/gpu.py: {message}", file=sys.stderr)
    raise SystemExit(1)


def require_gpu():
    try:
        import cupy
    except ImportError:
        fail("CuPy is not installed (pip install cupy-cuda13x); nothing to benchmark")
    from cupy_bn.backends import cupy_usable

    if not cupy_usable():
        fail(
            "no usable CUDA GPU here (cupy.is_available() is False); run this on a machine "
            "with an NVIDIA GPU"
        )
    return cupy


def peak_bandwidth(cupy) -> tuple[str, float]:
    """Device name and peak DRAM bandwidth in bytes/s (double data rate)."""
    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device().id
    props = runtime.getDeviceProperties(device)
    clock_khz = props.get("memoryClockRate") or runtime.deviceGetAttribute(
        runtime.cudaDevAttrMemoryClockRate, device
    )
    bus_bits = props.get("memoryBusWidth") or runtime.deviceGetAttribute(
        runtime.cudaDevAttrGlobalMemoryBusWidth, device
    )
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name, 2.0 * clock_khz * 1e3 * bus_bits / 8


def median_seconds(fn, repeat: int) -> float:
    from cupyx.profiler import benchmark

    result = benchmark(fn, n_repeat=repeat, n_warmup=5)
    import numpy as np

    return float(np.median(result.gpu_times[0]))


def ours(cupy, x, dy, channel_axis):
    """cupy-bn through the functional API."""
    import cupy_bn as cbn

    c = x.shape[channel_axis]
    w, b = cupy.ones(c, cupy.float32), cupy.zeros(c, cupy.float32)
    rm, rv = cupy.zeros(c, cupy.float32), cupy.ones(c, cupy.float32)
    _, saved = cbn.batch_norm(x, w, b, rm, rv, channel_axis=channel_axis)
    return {
        "forward_train": lambda: cbn.batch_norm(x, w, b, rm, rv, channel_axis=channel_axis),
        "backward": lambda: cbn.batch_norm_backward(dy, saved),
        "eval": lambda: cbn.batch_norm(x, w, b, rm, rv, training=False, channel_axis=channel_axis),
    }


def kernels(cupy, x, dy, channel_axis):
    """The backend's primitives alone."""
    from cupy_bn.backends import get_backend
    from cupy_bn.layout import canonical

    be = get_backend("cuda", x)
    view = canonical(x, channel_axis)
    dview = view.match(dy, "dy")
    c = view.num_channels
    acc = cupy.float32 if x.dtype != cupy.float64 else cupy.float64
    w, b = cupy.ones(c, acc), cupy.zeros(c, acc)
    rm, rv = cupy.zeros(c, acc), cupy.ones(c, acc)
    mean, _, invstd, scale, shift = be.train_statistics(view, w, b, rm, rv, 0.1, 1e-5)

    def forward():
        stats = be.train_statistics(view, w, b, rm, rv, 0.1, 1e-5)
        return be.apply(view, stats[3], stats[4])

    def backward():
        sums = be.backward_reduce(dview, view, mean)
        return be.backward_apply(dview, view, mean, invstd, w, *sums, view.count)

    return {
        "forward_train": forward,
        "backward": backward,
        "eval": lambda: be.apply(view, scale, shift),
    }


def naive(cupy, x, dy, channel_axis):
    """Textbook CuPy expressions (Chainer's fallback style)."""
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    shape = [1] * x.ndim
    shape[channel_axis % x.ndim] = x.shape[channel_axis]
    w = cupy.ones(shape, x.dtype)
    b = cupy.zeros(shape, x.dtype)
    m = x.size // x.shape[channel_axis]

    def forward():
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        return (x - mean) / cupy.sqrt(var + 1e-5) * w + b

    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1 / cupy.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)

    def backward():
        xhat = (x - mean) * invstd
        gdy = dy * w
        return (
            invstd
            / m
            * (
                m * gdy
                - gdy.sum(axis=axes, keepdims=True)
                - xhat * (gdy * xhat).sum(axis=axes, keepdims=True)
            )
        )

    return {
        "forward_train": forward,
        "backward": backward,
        "eval": lambda: (x - mean) * invstd * w + b,
    }


def torch_impl(cupy, x, dy, channel_axis):
    """PyTorch's native batch norm on the same memory (channels_last for NHWC)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    tx, tdy = torch.as_tensor(x, device="cuda"), torch.as_tensor(dy, device="cuda")
    if channel_axis != 1:  # NHWC memory seen as NCHW in channels_last format
        tx, tdy = tx.permute(0, 3, 1, 2), tdy.permute(0, 3, 1, 2)
    c = tx.shape[1]
    w = torch.ones(c, device="cuda", dtype=torch.float32)
    b = torch.zeros(c, device="cuda", dtype=torch.float32)
    rm, rv = torch.zeros_like(w), torch.ones_like(w)
    ops = torch.ops.aten
    _, save_mean, save_invstd = ops.native_batch_norm(tx, w, b, rm, rv, True, 0.1, 1e-5)
    return {
        "forward_train": lambda: ops.native_batch_norm(tx, w, b, rm, rv, True, 0.1, 1e-5),
        "backward": lambda: ops.native_batch_norm_backward(
            tdy, tx, w, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]
        ),
        "eval": lambda: ops.native_batch_norm(tx, w, b, rm, rv, False, 0.1, 1e-5),
    }


IMPLEMENTATIONS = {"cupy-bn": ours, "kernels": kernels, "naive": naive, "torch": torch_impl}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    cupy = require_gpu()
    import numpy as np

    from cupy_bn.backends.cuda_backend import traffic_bytes

    device, peak = peak_bandwidth(cupy)
    itemsize = np.dtype(args.dtype).itemsize
    rows, records = [], []
    for channels, side in RESNET50:
        for layout, channel_axis in (("NCHW", 1), ("NHWC", -1)):
            shape = (
                (args.batch, channels, side, side)
                if channel_axis == 1
                else (args.batch, side, side, channels)
            )
            x = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(args.dtype)
            dy = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(args.dtype)
            for impl, make in IMPLEMENTATIONS.items():
                fns = make(cupy, x, dy, channel_axis)
                if fns is None:
                    continue
                for phase in PHASES:
                    seconds = median_seconds(fns[phase], args.repeat)
                    nbytes = traffic_bytes(phase, x.size, itemsize)
                    gbps = nbytes / seconds / 1e9
                    rows.append(
                        (
                            f"{channels}x{side}x{side}",
                            layout,
                            impl,
                            phase,
                            seconds * 1e6,
                            gbps,
                            100 * gbps * 1e9 / peak,
                        )
                    )
                    records.append(
                        {
                            "name": f"{impl}/{phase}/{layout}/{channels}x{side}",
                            "group": phase,
                            "params": {
                                "shape": list(shape),
                                "layout": layout,
                                "dtype": args.dtype,
                                "implementation": impl,
                            },
                            "stats": {"median": seconds, "rounds": args.repeat},
                            "extra_info": {
                                "model_bytes": nbytes,
                                "gb_per_s": gbps,
                                "percent_of_peak": 100 * gbps * 1e9 / peak,
                            },
                        }
                    )
            del x, dy
            cupy.get_default_memory_pool().free_all_blocks()
    report(device, peak, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine_info": {"device": device, "peak_bytes_per_s": peak},
                    "benchmarks": records,
                },
                f,
                indent=1,
            )
    return 0


def report(device: str, peak: float, rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{device}: peak {peak / 1e9:.0f} GB/s (traffic model bytes / time)")
    for col in ("shape", "layout", "impl", "phase", "us", "GB/s", "% peak"):
        table.add_column(col, justify="right" if col in ("us", "GB/s", "% peak") else "left")
    for shape, layout, impl, phase, us, gbps, pct in rows:
        table.add_row(shape, layout, impl, phase, f"{us:.1f}", f"{gbps:.0f}", f"{pct:.1f}")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
