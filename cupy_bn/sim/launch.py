"""Launch parameters and the in-process launch (ctypes mirror of emu::Launch / emu::Region)."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

from .args import Packed
from .errors import SimulationError

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
MAX_DYNAMIC_SHARED = 227 * 1024  # opt-in maximum (sm_90); the default limit is 48 KiB
DEFAULT_DYNAMIC_SHARED = 48 * 1024
LOG_BYTES = 16384

# Signal handlers and the runtime's state are per process: one launch at a time.
launch_lock = threading.RLock()


class Region(ctypes.Structure):
    _fields_ = [
        ("host", ctypes.c_void_p),
        ("nbytes", ctypes.c_uint64),
        ("align", ctypes.c_uint64),
        ("writeable", ctypes.c_int32),
        ("written", ctypes.c_int32),
        ("sim", ctypes.c_void_p),
    ]


class Launch(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
        ("shared_mem", ctypes.c_uint64),
        ("max_dyn_smem", ctypes.c_uint64),
        ("schedule", ctypes.c_int32),
        ("seed", ctypes.c_uint32),
        ("stack_kb", ctypes.c_int32),
        ("guard", ctypes.c_int32),
        ("timeout_s", ctypes.c_double),
        ("nargs", ctypes.c_int32),
        ("nregions", ctypes.c_int32),
        ("args", ctypes.POINTER(ctypes.c_void_p)),
        ("arg_region", ctypes.POINTER(ctypes.c_int32)),
        ("arg_offset", ctypes.POINTER(ctypes.c_uint64)),
        ("regions", ctypes.POINTER(Region)),
        ("log", ctypes.c_char_p),
        ("log_cap", ctypes.c_uint64),
        ("switches", ctypes.c_uint64),
        ("fault_pc", ctypes.c_uint64),
        ("fault_region", ctypes.c_int32),
        ("fault_write", ctypes.c_int32),
        ("fault_offset", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class LaunchConfig:
    """A validated launch: dimensions, shared memory and the simulator's options."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    max_dyn_smem: int
    schedule: str
    seed: int
    stack_kb: int
    guard: bool
    timeout: float
    check_races: bool = False
    guard_start: bool = False  # array copies start at a guard page (else: end at one)
    poison: int = 0xFF  # byte that fills shared memory and the bytes around array copies

    @property
    def threads_per_block(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]


def dim3(value: object, what: str) -> tuple[int, int, int]:
    """CuPy's grid/block argument (an int or a tuple of 1 to 3 ints) as 3 ints."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(items) <= 3:
        raise SimulationError(f"invalid {what} {value!r}: give an int or 1 to 3 ints")
    dims = []
    for v in items:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise SimulationError(f"invalid {what} {value!r}: dimensions must be integers")
        dims.append(int(v))
    while len(dims) < 3:
        dims.append(1)
    return dims[0], dims[1], dims[2]


def make_config(
    grid,
    block,
    shared_mem,
    *,
    max_dyn_smem: int,
    max_threads: int,
    schedule: str,
    seed: int,
    stack_kb: int,
    guard: bool,
    timeout: float,
    kernel: str,
    check_races: bool = False,
) -> LaunchConfig:
    """Check a launch the way the CUDA driver would, before anything runs."""
    g, b = dim3(grid, "grid"), dim3(block, "block")
    if min(g) < 1 or g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
        raise SimulationError(
            f"{kernel}: invalid launch configuration: grid {g} (every dimension >= 1, "
            "x < 2**31, y and z <= 65535)"
        )
    n = b[0] * b[1] * b[2]
    if min(b) < 1 or b[0] > 1024 or b[1] > 1024 or b[2] > 64 or n > 1024:
        raise SimulationError(
            f"{kernel}: invalid launch configuration: block {b} (every dimension >= 1, x and y "
            "<= 1024, z <= 64, at most 1024 threads)"
        )
    if n > max_threads:
        raise SimulationError(
            f"{kernel}: invalid launch configuration: block of {n} threads exceeds the kernel's "
            f"__launch_bounds__({max_threads})"
        )
    if not hasattr(shared_mem, "__index__") or int(shared_mem) < 0:
        raise SimulationError(
            f"{kernel}: shared_mem must be a non-negative int, got {shared_mem!r}"
        )
    if int(shared_mem) > max_dyn_smem:
        raise SimulationError(
            f"{kernel}: invalid launch configuration: shared_mem={int(shared_mem)} bytes exceeds "
            f"the dynamic shared memory limit of {max_dyn_smem} bytes (set "
            "max_dynamic_shared_size_bytes to opt in to more)"
        )
    if schedule not in SCHEDULES:
        raise SimulationError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if not 1 <= int(stack_kb) <= 65536:
        raise SimulationError(f"stack_kb must be in [1, 65536], got {stack_kb!r}")
    if timeout is not None and timeout < 0:
        raise SimulationError(f"timeout must be >= 0 seconds (0: none), got {timeout!r}")
    return LaunchConfig(
        g,
        b,
        int(shared_mem),
        int(max_dyn_smem),
        schedule,
        int(seed) & 0xFFFFFFFF,
        int(stack_kb),
        bool(guard),
        float(timeout or 0),
        bool(check_races),
    )


@dataclass
class LaunchResult:
    rc: int
    log: str
    switches: int
    fault_pc: int
    fault_region: int
    fault_write: int
    fault_offset: int
    written_regions: list[int]


def run_in_process(fn, cfg: LaunchConfig, packed: Packed) -> LaunchResult:
    """Run a launcher function of a loaded module on the packed arguments."""
    nargs = len(packed.slots)
    base = ctypes.addressof(packed.storage)
    args = (ctypes.c_void_p * max(1, nargs))(*[base + s for s in packed.slots])
    arg_region = (ctypes.c_int32 * max(1, nargs))(*packed.arg_region)
    arg_offset = (ctypes.c_uint64 * max(1, nargs))(*packed.arg_offset)
    nreg = len(packed.regions)
    regions = (Region * max(1, nreg))()
    for r, spec in zip(regions, packed.regions, strict=False):
        r.host = spec.lo
        r.nbytes = spec.hi - spec.lo
        r.align = spec.align
        r.writeable = int(spec.writeable)
    log = ctypes.create_string_buffer(LOG_BYTES)
    launch = Launch(
        grid=(ctypes.c_uint32 * 3)(*cfg.grid),
        block=(ctypes.c_uint32 * 3)(*cfg.block),
        shared_mem=cfg.shared_mem,
        max_dyn_smem=cfg.max_dyn_smem,
        schedule=SCHEDULES[cfg.schedule],
        seed=cfg.seed,
        stack_kb=cfg.stack_kb,
        guard=(int(cfg.guard) | (2 if cfg.guard_start else 0) | (cfg.poison & 0xFF) << 8)
        if cfg.guard
        else 0,
        timeout_s=cfg.timeout,
        nargs=nargs,
        nregions=nreg,
        args=ctypes.cast(args, ctypes.POINTER(ctypes.c_void_p)),
        arg_region=ctypes.cast(arg_region, ctypes.POINTER(ctypes.c_int32)),
        arg_offset=ctypes.cast(arg_offset, ctypes.POINTER(ctypes.c_uint64)),
        regions=ctypes.cast(regions, ctypes.POINTER(Region)),
        log=ctypes.cast(log, ctypes.c_char_p),
        log_cap=LOG_BYTES,
    )
    with launch_lock:
        rc = fn(ctypes.byref(launch))
    return LaunchResult(
        rc=rc,
        log=log.value.decode(errors="replace"),
        switches=launch.switches,
        fault_pc=launch.fault_pc,
        fault_region=launch.fault_region,
        fault_write=launch.fault_write,
        fault_offset=launch.fault_offset,
        written_regions=[i for i in range(nreg) if regions[i].written],
    )
