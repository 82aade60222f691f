"""What `cupy-bn info` reports: versions, GPUs, the kernel toolchain and the usable backends.

Every probe is guarded: a missing optional package (CuPy, the NVRTC library, the simulator
package, PyTorch) is reported as such, never raised.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
from typing import Any

import numpy as np

from cupy_bn import __version__
from cupy_bn.backends import available_backends, cupy_usable


def _cupy() -> dict[str, Any]:
    try:
        import cupy
    except ImportError:
        return {"installed": False, "version": None, "usable": False, "state": "not installed"}
    usable = cupy_usable()
    state = f"{cupy.__version__} ({'usable' if usable else 'no usable GPU'})"
    return {"installed": True, "version": cupy.__version__, "usable": usable, "state": state}


def _gpus() -> list[dict[str, Any]]:
    if not cupy_usable():
        return []
    from cupy_bn.machine import gpu_devices

    try:
        return gpu_devices()
    except Exception as e:  # a driver that answers is_available() but fails later
        return [
            {
                "id": 0,
                "name": f"error: {e}",
                "compute_capability": "?",
                "memory_bytes": 0,
                "peak_bandwidth": None,
            }
        ]


def _nvrtc() -> dict[str, Any]:
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:
        return {"found": False, "version": None, "detail": "CuPy is not installed"}
    try:
        major, minor = nvrtc.getVersion()
    except Exception as e:  # the shared library is missing or unloadable
        return {"found": False, "version": None, "detail": " ".join(str(e).split())[:200]}
    return {"found": True, "version": f"{major}.{minor}", "detail": "cupy_backends.cuda.libs"}


def _plain(value: Any) -> dict[str, str | None]:
    """A toolchain description as a flat {name: text} dict, whatever shape it came in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "_asdict"):
        value = value._asdict()
    elif not isinstance(value, dict) and hasattr(value, "__dict__"):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): None if v is None else str(v) for k, v in value.items()}
    return {"toolchain": None if value is None else str(value)}


def _simulator() -> dict[str, Any]:
    try:
        sim = importlib.import_module("cupy_bn.sim")
    except ImportError:
        return {"available": False, "detail": "not part of this install", "toolchain": {}}
    result: dict[str, Any] = {"available": None, "detail": "", "toolchain": {}}
    try:
        if hasattr(sim, "find_toolchain"):
            result["toolchain"] = _plain(sim.find_toolchain())
        if hasattr(sim, "is_available"):
            result["available"] = bool(sim.is_available())
    except Exception as e:  # report why the toolchain is unusable instead of failing
        result["available"] = False
        result["detail"] = f"toolchain not usable: {' '.join(str(e).split())[:200]}"
        return result
    if result["available"] is None:
        result["detail"] = "installed"
    else:
        result["detail"] = "usable" if result["available"] else "toolchain not found"
    return result


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    """All facts `cupy-bn info` shows, as JSON-ready values."""
    return {
        "cupy_bn": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": _cupy(),
        "gpus": _gpus(),
        "nvrtc": _nvrtc(),
        "simulator": _simulator(),
        "torch": _version("torch"),
        "backends": available_backends(),
    }
