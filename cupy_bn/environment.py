"""What `cupy-bn info` reports: versions, GPUs, the kernel toolchain and the usable backends.

Every probe is guarded: a missing optional package (CuPy, the NVRTC library, the simulator
package, PyTorch) is reported as such, never raised.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np

from cupy_bn import __version__
from cupy_bn.backends import available_backends, cpu_backend_name, cupy_usable
from cupy_bn.jsonable import jsonable


@dataclass(frozen=True)
class CupyFacts:
    installed: bool
    version: str | None
    usable: bool
    """CuPy imports and sees a GPU."""
    state: str
    """One line for people: `14.2.0 (usable)`, `14.2.0 (no usable GPU)`, `not installed`."""


@dataclass(frozen=True)
class GpuFacts:
    id: int
    name: str
    compute_capability: str | None
    """`"major.minor"` (`"9.0"`), None when the device could not be asked."""
    memory_bytes: int | None
    peak_bandwidth: float | None
    """Theoretical DRAM bandwidth in bytes/s, None when unknown."""


@dataclass(frozen=True)
class NvrtcFacts:
    found: bool
    version: str | None
    """`"major.minor"`, None when NVRTC was not found."""
    detail: str
    """Where it was loaded from, or why it was not found."""


@dataclass(frozen=True)
class SimulatorFacts:
    available: bool | None
    """Whether kernels can be simulated here; None when the package does not say."""
    detail: str
    toolchain: dict[str, Any]
    """What `cupy_bn.sim.find_toolchain()` found, as JSON values (paths as text, lists of
    folders as lists, the CUDA version as an int); None for what is missing."""


@dataclass(frozen=True)
class Environment:
    """Everything `cupy-bn info` shows."""

    cupy_bn: str
    python: str
    numpy: str
    cupy: CupyFacts
    gpus: list[GpuFacts]
    nvrtc: NvrtcFacts
    simulator: SimulatorFacts
    torch: str | None
    """PyTorch's version, None when it is not installed."""
    numba: str | None
    """numba's version, None when it is not installed."""
    backends: list[str]
    """`cupy_bn.backends.available_backends()`."""
    cpu_backend: str
    """The backend `backend="auto"` picks for NumPy arrays (`cpu_backend_name()`)."""

    def to_json(self) -> dict[str, Any]:
        """The fields as plain JSON values, nested objects as objects, under the same names."""
        return jsonable(self)


def _cupy() -> CupyFacts:
    try:
        import cupy
    except ImportError:
        return CupyFacts(installed=False, version=None, usable=False, state="not installed")
    usable = cupy_usable()
    state = f"{cupy.__version__} ({'usable' if usable else 'no usable GPU'})"
    return CupyFacts(installed=True, version=cupy.__version__, usable=usable, state=state)


def _gpus() -> list[GpuFacts]:
    if not cupy_usable():
        return []
    from cupy_bn.machine import gpu_devices

    try:
        return [GpuFacts(**device) for device in gpu_devices()]
    except Exception as e:  # a driver that answers is_available() but fails later
        return [GpuFacts(0, f"error: {' '.join(str(e).split())[:200]}", None, None, None)]


def _nvrtc() -> NvrtcFacts:
    from cupy_bn.kernels import nvrtc

    try:
        major, minor = nvrtc.version()
    except Exception as e:  # CuPy missing, or the shared library missing or unloadable
        return NvrtcFacts(found=False, version=None, detail=" ".join(str(e).split())[:200])
    return NvrtcFacts(found=True, version=f"{major}.{minor}", detail="cupy_backends.cuda.libs")


def _plain(value: Any) -> dict[str, Any]:
    """A toolchain description as a flat {name: JSON value} dict, whatever shape it came in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif hasattr(value, "_asdict"):
        value = value._asdict()
    elif not isinstance(value, dict) and hasattr(value, "__dict__"):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _json_or_text(v) for k, v in value.items()}
    return {"toolchain": _json_or_text(value)}


def _json_or_text(value: Any) -> Any:
    try:
        return jsonable(value)
    except TypeError:  # an object the probe did not expect: its text, not a crash
        return str(value)


def _simulator() -> SimulatorFacts:
    try:
        sim = importlib.import_module("cupy_bn.sim")
    except ImportError:
        return SimulatorFacts(available=False, detail="not part of this install", toolchain={})
    available: bool | None = None
    toolchain: dict[str, Any] = {}
    try:
        if hasattr(sim, "find_toolchain"):
            toolchain = _plain(sim.find_toolchain())
        if hasattr(sim, "is_available"):
            available = bool(sim.is_available())
    except Exception as e:  # report why the toolchain is unusable instead of failing
        reason = " ".join(str(e).split())[:200]
        return SimulatorFacts(
            available=False, detail=f"toolchain not usable: {reason}", toolchain=toolchain
        )
    if available is None:
        detail = "installed"
    else:
        detail = "usable" if available else "toolchain not found"
    return SimulatorFacts(available=available, detail=detail, toolchain=toolchain)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> Environment:
    """All facts `cupy-bn info` shows (`Environment.to_json()` for JSON)."""
    return Environment(
        cupy_bn=__version__,
        python=platform.python_version(),
        numpy=np.__version__,
        cupy=_cupy(),
        gpus=_gpus(),
        nvrtc=_nvrtc(),
        simulator=_simulator(),
        torch=_version("torch"),
        numba=_version("numba"),
        backends=available_backends(),
        cpu_backend=cpu_backend_name(),
    )
