"""The machine a benchmark runs on: memory bandwidth, CUDA devices, versions, commit.

`measure_copy_bandwidth` is the CPU's practical limit (a large `numpy.copyto`, read + write
counted); `device_peak_bandwidth` is a GPU's theoretical DRAM bandwidth. `machine_info` and
`commit_info` are pytest-benchmark's blocks of the same names.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cupy_bn import __version__
from cupy_bn.backends import cupy_usable


def cpu_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measure_copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Best bytes/s of `numpy.copyto` between two `nbytes` buffers (read + write counted).

    Measured with one thread and with one thread per CPU (each copying a slice; copyto
    releases the GIL); multi-threaded implementations can reach the larger figure.
    """
    n = max(nbytes // 8, 1)
    src = np.ones(n)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    threads = cpu_threads()
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    best = math.inf
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(max(repeat, 1)):
            start = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - start)
            if threads > 1:
                start = time.perf_counter()
                list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
                best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def gpu_devices() -> list[dict[str, Any]]:
    """Name, memory and peak bandwidth (bytes/s, None if unknown) of each usable CUDA device."""
    if not cupy_usable():
        return []
    import cupy

    runtime = cupy.cuda.runtime
    devices = []
    for device_id in range(runtime.getDeviceCount()):
        props = runtime.getDeviceProperties(device_id)
        name = props.get("name", b"")
        devices.append(
            {
                "id": device_id,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}",
                "memory_bytes": int(props.get("totalGlobalMem", 0)),
                "peak_bandwidth": device_peak_bandwidth(device_id),
            }
        )
    return devices


def device_peak_bandwidth(device_id: int = 0) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s: 2 (DDR) * memory clock * bus width / 8."""
    import cupy

    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(device_id)
    clock_khz, bus_bits = props.get("memoryClockRate"), props.get("memoryBusWidth")
    if not clock_khz or not bus_bits:
        try:  # CUDA 13 dropped these fields from cudaDeviceProp; the attributes remain
            clock_khz = runtime.deviceGetAttribute(36, device_id)  # cudaDevAttrMemoryClockRate
            bus_bits = runtime.deviceGetAttribute(37, device_id)  # cudaDevAttrGlobalMemoryBusWidth
        except Exception:
            return None
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def machine_info(copy_bandwidth: float | None, gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """pytest-benchmark's `machine_info`, plus what this report measured."""
    uname = platform.uname()
    cpu = {"count": os.cpu_count(), "usable": cpu_threads(), "arch": uname.machine}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu["brand_raw"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "node": uname.node,
        "processor": uname.processor,
        "machine": uname.machine,
        "python_compiler": platform.python_compiler(),
        "python_implementation": platform.python_implementation(),
        "python_implementation_version": platform.python_version(),
        "python_version": platform.python_version(),
        "python_build": list(platform.python_build()),
        "release": uname.release,
        "system": uname.system,
        "cpu": cpu,
        "cupy_bn": __version__,
        "numpy": np.__version__,
        "cpu_copy_bandwidth": copy_bandwidth,
        "gpus": gpus,
    }


def commit_info() -> dict[str, Any]:
    """pytest-benchmark's `commit_info` for the checkout this package runs from, if any."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"id": None, "project": "cupy-bn", "error": "not a git checkout"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "id": sha,
        "time": git("log", "-1", "--format=%cI"),
        "author_time": git("log", "-1", "--format=%aI"),
        "dirty": bool(status),
        "project": "cupy-bn",
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
    }
