"""The one kernel loader: compiles this package's CUDA sources for CuPy or for the simulator.

Both targets get the same source text and the same template name expressions:

- `CupyLoader`: `cupy.RawModule` / `cupy.ElementwiseKernel` on the current GPU.
- `SimLoader`: `cupy_bn.sim.RawModule` / `cupy_bn.sim.ElementwiseKernel`, which run the source
  on the CPU over NumPy arrays; launches take the loader's thread schedule, seed and race mode.
  It is the library's one way into the simulator, imported when a `SimLoader` is made.

The CUDA headers both targets compile against are found by `cupy_bn.kernels.toolchain`.

A module holds every template instantiation of one `.cu` file (storage types float16,
bfloat16, float32, float64) and compiles once per process and target; CuPy and the simulator
also cache compiled modules on disk.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from cupy_bn.kernels.elementwise import ElementwiseSpec
from cupy_bn.kernels.toolchain import cuda_include_dirs

KERNEL_DIR = Path(__file__).resolve().parent

#: C++ storage type for each dtype name, and the accumulation type used with it.
STORAGE_TYPES: dict[str, tuple[str, str]] = {
    "float16": ("__half", "float"),
    "bfloat16": ("__nv_bfloat16", "float"),
    "float32": ("float", "float"),
    "float64": ("double", "double"),
}


@dataclass(frozen=True)
class KernelFile:
    """A `.cu` file and its kernels, each templated `<T, Acc>` (storage, accumulator type)."""

    filename: str
    kernels: tuple[str, ...]

    def name_expression(self, kernel: str, dtype_name: str) -> str:
        if kernel not in self.kernels:
            raise KeyError(f"{self.filename} has no kernel {kernel!r}")
        storage, acc = STORAGE_TYPES[dtype_name]
        return f"{kernel}<{storage}, {acc}>"

    def name_expressions(self) -> tuple[str, ...]:
        """Every instantiation, in a fixed order."""
        return tuple(self.name_expression(k, t) for k in self.kernels for t in STORAGE_TYPES)

    def source(self) -> str:
        return read_source(self.filename)


KERNEL_FILES: dict[str, KernelFile] = {
    "ncs": KernelFile(
        "bn_ncs.cu", ("bn_ncs_stats", "bn_ncs_apply", "bn_ncs_reduce", "bn_ncs_backward")
    ),
    "mc": KernelFile("bn_mc.cu", ("bn_mc_stats", "bn_mc_apply", "bn_mc_reduce", "bn_mc_backward")),
    "double_backward": KernelFile(
        "bn_double_backward.cu",
        (
            "bn_ncs_double_backward_reduce",
            "bn_ncs_double_backward_apply",
            "bn_mc_double_backward_reduce",
            "bn_mc_double_backward_apply",
        ),
    ),
    "fused": KernelFile(
        "bn_fused.cu", ("bn_ncs_apply_fused", "bn_mc_apply_fused", "bn_relu_gradient")
    ),
}

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


@cache
def read_source(filename: str) -> str:
    """The text of a kernel file with its local `#include "..."` files inlined (each once).

    Inlining keeps one self-contained source string: CuPy's and the simulator's caches key on
    the source text, so an edited header always recompiles.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        seen.add(name)
        text = _PRAGMA_ONCE.sub("", (KERNEL_DIR / name).read_text())

        def include(match: re.Match) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            resume = text.count("\n", 0, match.end()) + 2  # the line after the include
            return f'#line 1 "{header}"\n{expand(header)}\n#line {resume} "{name}"'

        return _LOCAL_INCLUDE.sub(include, text)

    return expand(filename)


def dtype_name(dtype: Any) -> str:
    """ "float16", "bfloat16", "float32" or "float64" for a supported storage dtype."""
    name = np.dtype(dtype).name
    if name not in STORAGE_TYPES:
        raise TypeError(f"no kernels for dtype {name}; expected one of {', '.join(STORAGE_TYPES)}")
    return name


@dataclass(frozen=True)
class DeviceSpec:
    """What the launch heuristics need to know about a device."""

    name: str
    sm_count: int
    max_threads_per_sm: int


#: The simulator's pretend device: an H100-sized part (132 SMs).
SIMULATED_DEVICE = DeviceSpec("simulated device (132 SMs)", 132, 2048)


class KernelLoader(ABC):
    """Compiled kernels of one target; see the module docstring."""

    target = ""
    _modules: dict[tuple[str, str], Any] = {}
    _elementwise: dict[tuple[str, str], Any] = {}
    _functions: dict[tuple[str, ...], Any] = {}
    _lock = threading.Lock()

    @abstractmethod
    def _raw_module(self, code: str, name_expressions: tuple[str, ...]) -> Any:
        """A RawModule-like object with every expression compiled."""

    @abstractmethod
    def _elementwise_kernel(self, spec: ElementwiseSpec) -> Any:
        """An ElementwiseKernel-like object for `spec`."""

    @abstractmethod
    def device(self) -> DeviceSpec:
        """The device kernels launch on."""

    @abstractmethod
    def launch(
        self,
        kernel: Any,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple,
        shared_mem: int = 0,
    ) -> None:
        """Launch `kernel` (from `function`) with CuPy's calling convention."""

    @abstractmethod
    def to_host_async(
        self, array: Any
    ) -> tuple[np.ndarray, Callable[[], bool], Callable[[], None]]:
        """`(host, ready, wait)`: a host array that a copy of device `array`, queued on the
        current stream, fills; `ready()` says (without waiting) whether it has, `wait()` waits
        for it."""

    def resident_blocks_per_sm(self, kernel: Any, threads: int) -> int:
        """Blocks of `threads` threads an SM holds at once (thread limit unless known better)."""
        return max(1, self.device().max_threads_per_sm // threads)

    def module(self, key: str) -> Any:
        """The compiled module of `KERNEL_FILES[key]`, every instantiation included."""
        with self._lock:
            cache_key = (self.target, key)
            if cache_key not in self._modules:
                spec = KERNEL_FILES[key]
                self._modules[cache_key] = self._raw_module(spec.source(), spec.name_expressions())
            return self._modules[cache_key]

    def function(self, key: str, kernel: str, dtype: Any) -> Any:
        """Kernel `kernel` of file `key`, instantiated for storage dtype `dtype`."""
        cache_key = (self.target, key, kernel, np.dtype(dtype).name)
        found = self._functions.get(cache_key)
        if found is None:
            expression = KERNEL_FILES[key].name_expression(kernel, dtype_name(dtype))
            found = self._functions[cache_key] = self.module(key).get_function(expression)
        return found

    def elementwise(self, spec: ElementwiseSpec) -> Any:
        with self._lock:
            cache_key = (self.target, spec.name)
            if cache_key not in self._elementwise:
                self._elementwise[cache_key] = self._elementwise_kernel(spec)
            return self._elementwise[cache_key]


class CupyLoader(KernelLoader):
    """Kernels compiled by CuPy (NVRTC) for the current GPU."""

    target = "cupy"

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._occupancy: dict[tuple[int, int, int], int] = {}

    def _raw_module(self, code, name_expressions):
        options = ("--std=c++17", *(f"-I{d}" for d in cuda_include_dirs()))
        return self._cupy.RawModule(code=code, options=options, name_expressions=name_expressions)

    def _elementwise_kernel(self, spec):
        return self._cupy.ElementwiseKernel(
            spec.in_params, spec.out_params, spec.operation, spec.name, preamble=spec.preamble
        )

    def device(self) -> DeviceSpec:
        return _cupy_device(self._cupy.cuda.runtime.getDevice())

    def launch(self, kernel, grid, block, args, shared_mem=0):
        kernel(grid, block, args, shared_mem=shared_mem)

    def to_host_async(self, array):
        """Into pinned memory (an asynchronous copy), with an event recorded behind it."""
        import cupyx

        host = cupyx.empty_pinned(array.shape, array.dtype)
        array.get(out=host, blocking=False)
        event = self._cupy.cuda.Event(disable_timing=True)
        event.record()
        return host, lambda: event.done, event.synchronize

    def resident_blocks_per_sm(self, kernel, threads):
        key = (id(kernel), threads, self._cupy.cuda.runtime.getDevice())
        blocks = self._occupancy.get(key)
        if blocks is None:
            try:
                from cupy.cuda import driver

                blocks = max(
                    1,
                    int(
                        driver.occupancyMaxActiveBlocksPerMultiprocessor(
                            kernel.kernel.ptr, threads, 0
                        )
                    ),
                )
            except Exception:  # a CuPy without the occupancy API: the thread limit
                blocks = super().resident_blocks_per_sm(kernel, threads)
            self._occupancy[key] = blocks
        return blocks


@cache
def _cupy_device(device_id: int) -> DeviceSpec:
    from cupy.cuda import runtime

    props = runtime.getDeviceProperties(device_id)
    name = props["name"]
    return DeviceSpec(
        name.decode() if isinstance(name, bytes) else str(name),
        int(props["multiProcessorCount"]),
        int(props["maxThreadsPerMultiProcessor"]),
    )


class SimLoader(KernelLoader):
    """Kernels run by the CUDA simulator on NumPy arrays.

    `schedule` ("forward", "reverse", "random"), `seed`, `check_races` and `check_memory` (two
    runs with the guards and the poison swapped, the same bits required; not together with
    `check_races`) are passed to every raw kernel launch; loaders with different settings share
    the compiled modules.
    """

    target = "sim"

    def __init__(
        self,
        schedule: str = "forward",
        seed: int = 0,
        check_races: bool = False,
        check_memory: bool = False,
    ):
        from cupy_bn import sim  # the library's one way into the simulator (deferred)

        if check_races and check_memory:
            raise ValueError("check_races and check_memory cannot be combined")
        self._sim = sim
        self.schedule = schedule
        self.seed = seed
        self.check_races = check_races
        self.check_memory = check_memory

    @staticmethod
    def available() -> bool:
        """Whether the simulator can run here (g++ and the CUDA headers found)."""
        from cupy_bn import sim

        return sim.is_available()

    def _raw_module(self, code, name_expressions):
        return self._sim.RawModule(code=code, options=(), name_expressions=name_expressions)

    def _elementwise_kernel(self, spec):
        return self._sim.ElementwiseKernel(
            spec.in_params, spec.out_params, spec.operation, spec.name, preamble=spec.preamble
        )

    def device(self) -> DeviceSpec:
        return SIMULATED_DEVICE

    def to_host_async(self, array):
        """The simulator's arrays are host arrays, its launches done when they return."""
        return array, lambda: True, lambda: None

    def launch(self, kernel, grid, block, args, shared_mem=0):
        kernel(
            grid,
            block,
            args,
            shared_mem=shared_mem,
            schedule=self.schedule,
            seed=self.seed,
            check_races=self.check_races,
            check_memory=self.check_memory,
        )
