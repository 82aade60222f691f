"""RawModule and RawKernel: CuPy's classes, running the same CUDA source on the CPU."""

from __future__ import annotations

import ctypes
import dataclasses
import re
import threading
import warnings
from collections.abc import Sequence

from . import build, launch, races
from .args import Packed, Param, pack_arguments, parse_signature
from .errors import ArgumentTypeWarning, SimulationError, SimulationWarning
from .source import base_name, find_kernels, rewrite_dynamic_shared

DEFAULT_SOURCE_NAME = "kernel.cu"


def translate_options(options: Sequence[str]) -> tuple[str, ...]:
    """The NVRTC options that mean something to g++: include paths, macros, C++ standard.

    Architecture, fast-math, debug and other code generation options are dropped (the
    simulator computes in IEEE arithmetic on the CPU whatever NVRTC would do).
    """
    long_forms = {"--include-path=": "-I", "--define-macro=": "-D", "--undefine-macro=": "-U"}
    out = []
    it = iter(options)
    for opt in it:
        opt = str(opt)
        prefix = next((p for p in long_forms if opt.startswith(p)), None)
        if prefix is not None:
            out.append(long_forms[prefix] + opt[len(prefix) :])
        elif opt.startswith("--pre-include="):
            out += ["-include", opt[len("--pre-include=") :]]
        elif opt in ("-I", "-D", "-U", "-include"):
            nxt = next(it, None)
            if nxt is not None:
                out += [opt + nxt] if opt != "-include" else [opt, nxt]
        elif opt.startswith(("-I", "-D", "-U")):
            out.append(opt)
        elif m := re.fullmatch(r"--?std=c\+\+(\d+)", opt):
            if int(m.group(1)) in (20, 23):
                out.append(f"-std=c++{m.group(1)}")
    return tuple(out)


def _module_source(code: str, names: Sequence[str], source_name: str, race_mode: bool) -> str:
    lines = [
        '#include "emu.h"',
        f'#line 1 "{source_name}"',
        rewrite_dynamic_shared(code),
        '#line 1 "<simulator launchers>"',
    ]
    for i, n in enumerate(names):
        lines += [
            f"static int emu_launcher_{i}(emu::Launch* l) {{ return emu::launch(&{n}, l); }}",
            f"EMU_EXPORT int emu_launch_{i}(emu::Launch* l) {{ return emu_launcher_{i}(l); }}",
            f"EMU_EXPORT int emu_sig_{i}(char* b, uint64_t c) "
            f"{{ return emu::signature(&{n}, b, c); }}",
        ]
    lines.append("EMU_EXPORT int emu_abi_version() { return EMU_ABI_VERSION; }")
    lines.append(
        "EMU_EXPORT void emu_set_static_smem(const uint64_t* p, uint64_t n) "
        "{ emu::set_static_smem(p, n); }"
    )
    if race_mode:
        table = ", ".join(f"emu_launcher_{i}" for i in range(len(names))) or "nullptr"
        lines.append(f"static int (*const emu_launchers[])(emu::Launch*) = {{{table}}};")
        lines.append(
            "int main(int argc, char** argv) "
            f"{{ return emu::race_main(argc, argv, emu_launchers, {len(names)}); }}"
        )
    return "\n".join(lines) + "\n"


class _Compiled:
    """A loaded module: one launcher per kernel name."""

    def __init__(self, code: str, names: tuple[str, ...], flags: tuple[str, ...], source_name: str):
        self.code, self.names, self.flags, self.source_name = code, names, flags, source_name
        self.artifact = build.build(_module_source(code, names, source_name, False), flags=flags)
        self.lib = ctypes.CDLL(str(self.artifact.path), mode=ctypes.RTLD_LOCAL)
        self.lib.emu_abi_version.restype = ctypes.c_int
        if self.lib.emu_abi_version() != 1:
            raise SimulationError(f"{self.artifact.path} was built for another simulator version")
        smem = [v for pair in self.artifact.static_smem for v in pair]
        self._smem = (ctypes.c_uint64 * max(1, len(smem)))(*smem)  # read by the module
        self.lib.emu_set_static_smem.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        self.lib.emu_set_static_smem(ctypes.addressof(self._smem), len(smem) // 2)
        self._race_exe: build.Artifact | None = None
        self._race_lock = threading.Lock()

    def launcher(self, index: int):
        fn = getattr(self.lib, f"emu_launch_{index}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p]
        return fn

    def signature(self, index: int) -> tuple[Param, ...]:
        fn = getattr(self.lib, f"emu_sig_{index}")
        fn.restype = ctypes.c_int
        buf = ctypes.create_string_buffer(8192)
        fn(buf, len(buf))
        return parse_signature(buf.value.decode())

    def race_executable(self) -> build.Artifact:
        with self._race_lock:
            if self._race_exe is None:
                src = _module_source(self.code, self.names, self.source_name, True)
                self._race_exe = build.build(src, flags=self.flags, executable=True)
            return self._race_exe


_compiled_lock = threading.Lock()
_compiled: dict[tuple, _Compiled] = {}


def _compile_module(
    code: str, names: tuple[str, ...], flags: tuple[str, ...], source_name: str
) -> _Compiled:
    key = (code, names, flags, source_name)
    with _compiled_lock:
        mod = _compiled.get(key)
    if mod is None:
        mod = _Compiled(code, names, flags, source_name)
        with _compiled_lock:
            mod = _compiled.setdefault(key, mod)
    return mod


class RawModule:
    """CPU stand-in for ``cupy.RawModule``: the CUDA source runs in the simulator.

    Args:
        code: CUDA C/C++ source, as for CuPy. Start it with ``#line 1 "name.cu"`` to have
            that name in messages (default ``kernel.cu``).
        options: NVRTC options; ``-I``, ``-D``, ``-U`` and ``-std=c++20`` are honoured, the
            others ignored.
        name_expressions: template instantiations to make available, e.g.
            ``("bn_stats<float,float>",)``; ``extern "C"`` kernels are always available.
        path, backend, translate_cucomplex, enable_cooperative_groups, jitify: CuPy's
            arguments; a precompiled ``path``, cuComplex translation and cooperative groups
            cannot be simulated and raise.
    """

    def __init__(
        self,
        code: str | None = None,
        *,
        path: str | None = None,
        options: Sequence[str] = (),
        backend: str = "nvrtc",
        translate_cucomplex: bool = False,
        enable_cooperative_groups: bool = False,
        name_expressions: Sequence[str] | None = None,
        jitify: bool = False,
    ):
        if path is not None or code is None:
            raise SimulationError(
                "the simulator runs CUDA source: pass code= (a precompiled cubin/PTX path= "
                "cannot be simulated)"
            )
        if not isinstance(code, str):
            raise SimulationError(f"code must be a str of CUDA source, got {type(code).__name__}")
        if translate_cucomplex:
            raise SimulationError("translate_cucomplex=True is not supported by the simulator")
        if enable_cooperative_groups:
            raise SimulationError(
                "cooperative groups (grid-wide sync) cannot be simulated: blocks run one after "
                "another"
            )
        self.code = code
        self.options = tuple(options)
        self.backend = backend
        self.name_expressions = tuple(name_expressions or ())
        m = re.match(r'\s*#line\s+\d+\s+"([^"]+)"', code)
        self._source_name = m.group(1) if m else DEFAULT_SOURCE_NAME
        kernels = find_kernels(code)
        self._bounds = {k.name: k.launch_bounds for k in kernels if k.launch_bounds}
        names = list(self.name_expressions)
        names += [k.name for k in kernels if k.extern_c and not k.template and k.name not in names]
        self._names = tuple(names)
        self._flags = translate_options(self.options)
        self._module: _Compiled | None = None
        self._lock = threading.Lock()

    def _compiled(self) -> _Compiled:
        with self._lock:
            if self._module is None:
                self._module = _compile_module(
                    self.code, self._names, self._flags, self._source_name
                )
            return self._module

    def get_function(self, name: str) -> RawKernel:
        """The kernel ``name``: an ``extern "C"`` kernel or one of the name expressions.

        As with CuPy, a template or C++ (mangled) kernel is found only through
        ``name_expressions``.
        """
        if name not in self.name_expressions:
            functions = self._compiled().artifact.c_functions
            if functions is not None and name not in functions:
                raise SimulationError(
                    f'no kernel `{name}` in this module: CuPy finds extern "C" kernels by '
                    "name and templates or C++ kernels through name_expressions"
                )
            if name not in self._names:  # e.g. an extern "C" kernel defined by a macro
                with self._lock:
                    self._names = (*self._names, name)
                    self._module = None
        mod = self._compiled()
        return RawKernel._from_module(
            self, mod, self._names.index(name), name, self._bounds.get(base_name(name))
        )


class RawKernel:
    """CPU stand-in for ``cupy.RawKernel`` (and for the functions of a :class:`RawModule`).

    Call it like CuPy's: ``kernel(grid, block, args, shared_mem=0)``, with ``grid`` and
    ``block`` ints or tuples of up to 3 ints and ``args`` a tuple of NumPy arrays (passed as
    pointers to their data), ``None`` (null pointers) and scalars (packed as CuPy packs them,
    see :mod:`cupy_bn.sim.args`). Arrays receive what the kernel wrote.
    """

    def __init__(
        self,
        code: str,
        name: str,
        options: Sequence[str] = (),
        backend: str = "nvrtc",
        *,
        translate_cucomplex: bool = False,
        enable_cooperative_groups: bool = False,
        jitify: bool = False,
    ):
        self.code = code
        self.name = name
        self.options = tuple(options)
        self._module_obj = RawModule(
            code=code,
            options=options,
            backend=backend,
            translate_cucomplex=translate_cucomplex,
            enable_cooperative_groups=enable_cooperative_groups,
            jitify=jitify,
        )
        self._mod: _Compiled | None = None
        self._index = -1
        self._params: tuple[Param, ...] | None = None
        self._fn = None
        self.max_dynamic_shared_size_bytes = launch.DEFAULT_DYNAMIC_SHARED
        self._max_threads = self._module_obj._bounds.get(base_name(name)) or 1024
        self.last_switches = 0

    @classmethod
    def _from_module(
        cls, owner: RawModule, mod: _Compiled, index: int, name: str, bounds: int | None
    ) -> RawKernel:
        k = cls.__new__(cls)
        k.code, k.name, k.options = owner.code, name, owner.options
        k._module_obj = owner
        k._mod, k._index = mod, index
        k._params = mod.signature(index)
        k._fn = mod.launcher(index)
        k.max_dynamic_shared_size_bytes = launch.DEFAULT_DYNAMIC_SHARED
        k._max_threads = bounds or 1024
        k.last_switches = 0
        return k

    def _ensure_loaded(self) -> None:
        if self._fn is None:
            k = self._module_obj.get_function(self.name)
            self._mod, self._index, self._params, self._fn = k._mod, k._index, k._params, k._fn

    @property
    def params(self) -> tuple[Param, ...]:
        """The kernel's parameters as the compiler sees them."""
        self._ensure_loaded()
        assert self._params is not None
        return self._params

    @property
    def max_threads_per_block(self) -> int:
        """1024, or the kernel's ``__launch_bounds__``."""
        return self._max_threads

    def __call__(
        self,
        grid,
        block,
        args,
        shared_mem: int = 0,
        stream=None,
        *,
        schedule: str = "forward",
        seed: int = 0,
        check_races: bool = False,
        guard: bool = True,
        check_memory: bool = False,
        stack_kb: int = 64,
        timeout: float = 60.0,
    ) -> None:
        """Launch the kernel.

        Args:
            grid, block: as for CuPy (an int or up to 3 ints).
            args: tuple of arrays, ``None`` and scalars (see :mod:`cupy_bn.sim.args`).
            shared_mem: bytes of dynamic shared memory (``extern __shared__``).
            stream: accepted for compatibility, ignored.
            schedule: order in which threads run between synchronization points:
                ``"forward"`` (lowest thread first), ``"reverse"`` or ``"random"`` (seeded by
                ``seed``); blocks run in the same order. Run every test under several.
            seed: seed of the random schedule.
            check_races: run under ThreadSanitizer and raise on data races (slow; use small
                grids).
            guard: copy arrays next to guard pages so out-of-bounds accesses fault (default);
                ``False`` passes NumPy's memory as is.
            check_memory: run the launch twice on the same inputs, first with every array
                copy starting at a guard page and shared memory filled with 0xFF bytes, then
                with copies ending at a guard page and 0x7F bytes; the outputs must match
                bit for bit (else the kernel read uninitialized memory). Not with
                ``check_races``.
            stack_kb: stack of every simulated thread.
            timeout: seconds before a launch that does not finish is stopped (0: never).

        Raises:
            SimulationError: the kernel failed; the message names block, thread and line.
        """
        self._ensure_loaded()
        max_dyn = int(self.max_dynamic_shared_size_bytes)
        if not 0 <= max_dyn <= launch.MAX_DYNAMIC_SHARED:
            raise SimulationError(
                f"{self.name}: max_dynamic_shared_size_bytes must be in [0, "
                f"{launch.MAX_DYNAMIC_SHARED}], got {max_dyn}"
            )
        cfg = launch.make_config(
            grid,
            block,
            shared_mem,
            max_dyn_smem=max_dyn,
            max_threads=self._max_threads,
            schedule=schedule,
            seed=seed,
            stack_kb=stack_kb,
            guard=guard,
            timeout=timeout,
            kernel=self.name,
            check_races=check_races,
        )
        packed = pack_arguments(self.params, args, self.name)
        for msg in packed.warnings:
            warnings.warn(msg, ArgumentTypeWarning, stacklevel=2)
        assert self._mod is not None
        if check_memory:
            if check_races or not guard:
                raise SimulationError(
                    f"{self.name}: check_memory needs guard=True and check_races=False"
                )
            self._run_twice(cfg, packed)
            return
        if check_races:
            result = races.run(self._mod.race_executable(), self._index, cfg, packed, self.params)
        else:
            result = launch.run_in_process(self._fn, cfg, packed)
        self.last_switches = result.switches
        self._report(result, packed, cfg)

    def _run_twice(self, cfg: launch.LaunchConfig, packed: Packed) -> None:
        """check_memory: two launches with the guards and the poison swapped, same outputs."""
        spans = [(r.lo, r.hi - r.lo) for r in packed.regions if r.writeable]
        inputs = [ctypes.string_at(lo, n) for lo, n in spans]
        first_cfg = dataclasses.replace(cfg, guard_start=True, poison=0xFF)
        result = launch.run_in_process(self._fn, first_cfg, packed)
        self._report(result, packed, first_cfg)
        first = [ctypes.string_at(lo, n) for lo, n in spans]
        for (lo, n), data in zip(spans, inputs, strict=True):
            ctypes.memmove(lo, data, n)
        second_cfg = dataclasses.replace(cfg, guard_start=False, poison=0x7F)
        result = launch.run_in_process(self._fn, second_cfg, packed)
        self.last_switches = result.switches
        self._report(result, packed, second_cfg)
        regions = [i for i, r in enumerate(packed.regions) if r.writeable]
        for k, ((lo, n), a) in enumerate(zip(spans, first, strict=True)):
            b = ctypes.string_at(lo, n)
            if a == b:
                continue
            byte = next(j for j in range(n) if a[j] != b[j])
            spec = packed.regions[regions[k]]
            i = min(
                (j for j in spec.args if packed.arg_offset[j] <= byte),
                key=lambda j: byte - packed.arg_offset[j],
                default=min(spec.args),
            )
            arr = packed.arrays[i]
            element = (byte - packed.arg_offset[i]) // max(1, arr.itemsize)
            raise SimulationError(
                f"{self.name} (grid {cfg.grid}, block {cfg.block}, schedule {cfg.schedule!r}): "
                f"check_memory: the array passed as {self.params[i].describe()} differs between "
                f"a run with shared memory and the bytes around arrays filled with 0xFF and a "
                f"run with 0x7F (first at element {element}): the kernel reads uninitialized "
                "shared memory or memory next to an array"
            )

    def _report(
        self, result: launch.LaunchResult, packed: Packed, cfg: launch.LaunchConfig
    ) -> None:
        notes = [ln[6:] for ln in result.log.splitlines() if ln.startswith("NOTE: ")]
        for n in notes:
            warnings.warn(f"{self.name}: {n}", SimulationWarning, stacklevel=3)
        problems = [ln for ln in result.log.splitlines() if ln.startswith("ERROR: ")]
        for r in result.written_regions:
            problems.append(
                "ERROR: the kernel wrote into read-only memory of "
                + _region_args(packed, r, self.params)
            )
        if result.rc == 0 and not problems:
            return
        lines = [p[7:] if p.startswith("ERROR: ") else p for p in problems] or [result.log]
        if result.fault_region >= 0:
            lines[0] = _describe_oob(result, packed, self.params, lines[0])
        if result.fault_pc and self._mod is not None:
            binary = self._mod.race_executable() if cfg.check_races else self._mod.artifact
            where = build.source_location(binary.path, result.fault_pc)
            if where:
                lines[0] += f" at {where}"
        raise SimulationError(
            f"{self.name} (grid {cfg.grid}, block {cfg.block}, schedule {cfg.schedule!r}): "
            + "\n".join(lines)
        )


def _region_args(packed: Packed, region: int, params: tuple[Param, ...]) -> str:
    args = packed.regions[region].args
    return ", ".join(params[i].describe() for i in args)


def _describe_oob(
    result: launch.LaunchResult, packed: Packed, params: tuple[Param, ...], line: str
) -> str:
    """Name the array argument whose guard page was hit, and the element."""
    spec = packed.regions[result.fault_region]
    addr = spec.lo + result.fault_offset
    access = {1: "write", 0: "read"}.get(result.fault_write, "access")
    tail = line[line.find(" [") :] if " [" in line else ""
    candidates = sorted(spec.args, key=lambda i: packed.arg_offset[i])
    if result.fault_offset < 0:
        i = candidates[0]
    else:  # the array that ends last (its end touches the guard page)
        i = max(candidates, key=lambda j: packed.arg_offset[j] + packed.arrays[j].nbytes)
    arr = packed.arrays[i]
    offset = addr - (spec.lo + packed.arg_offset[i])
    where = "past the end" if offset >= 0 else "before the start"
    item = max(1, arr.itemsize)
    return (
        f"out-of-bounds {access} {where} of the array passed as {params[i].describe()} "
        f"({arr.size} elements of {arr.dtype}): element {offset // item} "
        f"(byte offset {offset}){tail}"
    )
