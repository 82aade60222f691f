"""Compiling simulator modules with g++, cached on disk by a hash of what went in.

The cache folder is ``$CUPY_BN_SIM_CACHE``, else ``$XDG_CACHE_HOME/cupy-bn/sim``, else
``~/.cache/cupy-bn/sim``. An entry's key hashes the generated C++ source, ``emu.h``, the
compiler flags and the toolchain; headers the kernel includes from its own ``-I`` folders are
recorded with their hashes and checked on every load. Compilers write to a private temporary
name that is renamed into place, so concurrent processes (test workers) never see a partial
file and at worst compile the same entry twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import SimulationError
from .toolchain import Toolchain, find_toolchain

_FORMAT = "cupy-bn-sim-cache-2"  # change when the entries' layout or metadata change
HEADER = Path(__file__).with_name("emu.h")  # includes emu_device.h; emu_elementwise.h apart

# -ffp-contract=off: g++ never fuses a*b+c (nvcc does by default; see docs/simulator.md).
# -fstack-clash-protection: large stack frames touch every page, so overflows hit the guard.
# -fsanitize=signed-integer-overflow,bounds: int overflow and subscripts past arrays of known
# size call emu.h's own handlers, which stop the launch (g++ still links libubsan; its
# handlers are never called).
_COMMON_FLAGS = (
    "-std=c++17",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-fstack-clash-protection",
    "-fno-gnu-unique",
    "-fsanitize=signed-integer-overflow,bounds",
    "-fno-sanitize-recover=all",
    "-w",
)
# -g1 -gdwarf-4: line tables that binutils' addr2line reads with the #line file names.
SHARED_FLAGS = (
    *_COMMON_FLAGS,
    "-O2",
    "-g1",
    "-gdwarf-4",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
)
RACE_FLAGS = (
    *_COMMON_FLAGS,
    "-O1",
    "-g",
    "-gdwarf-4",
    "-fsanitize=thread",
    "-DEMU_TSAN",
    "-pthread",
)


def cache_dir() -> Path:
    """Folder of compiled modules (created on first use)."""
    env = os.environ.get("CUPY_BN_SIM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cupy-bn" / "sim"


def _own_headers() -> list[Path]:
    return sorted(HEADER.parent.glob("*.h"))


@functools.lru_cache(maxsize=1)
def header_digest() -> str:
    """Hash of the simulator's headers (part of every cache key)."""
    h = hashlib.sha256()
    for p in _own_headers():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def platform_flags() -> tuple[str, ...]:
    """The fast context switch is x86-64 assembly; elsewhere use ucontext."""
    return () if platform.machine() in ("x86_64", "AMD64") else ("-DEMU_UCONTEXT",)


@dataclass(frozen=True)
class Artifact:
    """A compiled module or executable and what the loader needs to know about it."""

    path: Path
    static_smem: tuple[tuple[int, int], ...]  # (offset, size) of template __shared__ statics
    c_functions: frozenset[str] | None  # functions with unmangled names (None: unknown)


_memory_lock = threading.Lock()
_built: dict[str, Artifact] = {}


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _deps_still_valid(meta: dict) -> bool:
    for path, digest in meta.get("deps", {}).items():
        try:
            if _file_digest(path) != digest:
                return False
        except OSError:
            return False
    return True


def _user_deps(depfile: Path, exclude: tuple[str, ...]) -> dict[str, str]:
    """Headers named in g++'s -MMD output, minus the generated source and our headers."""
    try:
        text = depfile.read_text()
    except OSError:
        return {}
    text = text.replace("\\\n", " ")
    _, _, rest = text.partition(":")
    deps = {}
    for item in shlex.split(rest):
        p = os.path.realpath(item)
        if p in exclude or not os.path.isfile(p):
            continue
        deps[p] = _file_digest(p)
    return deps


# nm's local statics of template functions (`_ZZ...`); the emulator's and the C++ library's
# own statics are excluded.
_OWN_PREFIXES = ("_ZZN3emu", "_ZZNK3emu", "_ZZNSt", "_ZZSt", "_ZZNKSt", "_ZZN9__gnu", "_ZZN6__")


def _symbols(path: Path) -> tuple[tuple[tuple[int, int], ...], frozenset[str] | None]:
    """From the symbol table: template-function statics, and unmangled function names.

    Static shared memory in template functions lands in per-instantiation sections, outside
    the `emu_smem` section; the runtime poisons these ranges before every block too. The
    unmangled (extern "C") function names are what CuPy's get_function can find without a
    name expression.
    """
    try:
        r = subprocess.run(
            ["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return (), None
    if r.returncode != 0:
        return (), None
    statics, functions = [], set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "bBdD":
            value, size, _, name = parts
            if name.startswith("_ZZ") and not name.startswith(_OWN_PREFIXES):
                statics.append((int(value, 16), int(size, 16)))
        elif len(parts) >= 3 and parts[-2] in "tT" and not parts[-1].startswith("_Z"):
            functions.add(parts[-1])
    return tuple(statics), frozenset(functions)


def build(
    source: str,
    *,
    flags: tuple[str, ...],
    executable: bool = False,
    toolchain: Toolchain | None = None,
) -> Artifact:
    """Compile ``source`` (C++ that includes emu.h) into a cached module or executable.

    Raises:
        SimulationError: with g++'s messages when the source does not compile.
    """
    tc = toolchain or find_toolchain()
    all_flags = (
        *(SHARED_FLAGS if not executable else RACE_FLAGS),
        *platform_flags(),
        *flags,
        f"-I{HEADER.parent}",
        *(f"-isystem{d}" for d in tc.include_dirs),
    )
    h = hashlib.sha256()
    for part in (source, header_digest(), "\0".join(all_flags), tc.fingerprint, _FORMAT):
        h.update(part.encode())
        h.update(b"\0")
    key = h.hexdigest()[:32]
    with _memory_lock:
        art = _built.get(key)
    if art is not None:
        return art

    folder = cache_dir()
    suffix = ".exe" if executable else ".so"
    meta_path = folder / f"{key}.json"
    art = _load_entry(folder, meta_path)
    if art is None:
        art = _compile(source, all_flags, folder, key, suffix, tc)
    with _memory_lock:
        _built[key] = art
    return art


def _load_entry(folder: Path, meta_path: Path) -> Artifact | None:
    try:
        meta = json.loads(meta_path.read_text())
        target = folder / meta["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not target.exists() or not _deps_still_valid(meta):
        return None
    functions = meta.get("c_functions")
    return Artifact(
        target,
        tuple(tuple(x) for x in meta.get("static_smem", ())),
        frozenset(functions) if functions is not None else None,
    )


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _compile(
    source: str, flags: tuple[str, ...], folder: Path, key: str, suffix: str, tc: Toolchain
) -> Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        src = Path(tmp) / "module.cpp"
        src.write_text(source)
        out = Path(tmp) / f"module{suffix}"
        dep = Path(tmp) / "module.d"
        cmd = [tc.cxx, *flags, "-MMD", "-MF", str(dep), "-o", str(out), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            raise SimulationError(_compile_error(r.stderr))
        own = (os.path.realpath(src), *(os.path.realpath(p) for p in _own_headers()))
        deps = _user_deps(dep, own)
        static, functions = ((), None) if suffix == ".exe" else _symbols(out)
        # The file name also hashes the included headers: a rebuilt module gets a new name,
        # since a process cannot load a second library under a name it has loaded.
        dep_digest = hashlib.sha256(json.dumps(sorted(deps.items())).encode()).hexdigest()[:8]
        target = folder / f"{key}-{dep_digest}{suffix}"
        os.replace(out, target)
    meta = {
        "file": target.name,
        "deps": deps,
        "static_smem": static,
        "c_functions": sorted(functions) if functions is not None else None,
    }
    _atomic_write(folder / f"{key}.json", json.dumps(meta))
    return Artifact(target, static, functions)


def _compile_error(stderr: str) -> str:
    """g++'s error lines, kernel source first (the generated parts are named <...>)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b", ln)]
    shown = "\n".join((errors or lines)[:20])
    return f"the kernel source does not compile for the simulator (g++):\n{shown}"


def source_location(path: Path, offset: int) -> str | None:
    """``file:line`` (kernel source, not emu.h) of an instruction offset, via addr2line."""
    if not offset:
        return None
    try:
        out = subprocess.run(
            ["addr2line", "-C", "-i", "-e", str(path), hex(offset)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        loc = line.strip()
        if loc and not loc.startswith("??") and "emu.h" not in loc and "/include/" not in loc:
            loc = re.sub(r" \(discriminator \d+\)$", "", loc)
            return re.sub(r"^.*/\.build-[^/]+/", "", loc)  # names relative to the build folder
    return None
