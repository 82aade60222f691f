"""Race mode: the kernel runs under ThreadSanitizer in a child process.

ThreadSanitizer must be loaded before anything else in a process, so race mode compiles the
module a second time as an executable (``-fsanitize=thread -DEMU_TSAN``) and runs one launch
per process: the arrays travel through a memory-mapped file, the child's report comes back
on its standard streams. Each block runs on its own OS thread with no happens-before to the
others, each CUDA thread is a ThreadSanitizer fiber, ``__syncthreads``/``__syncwarp`` are
release/acquire pairs, atomics are atomics and ``__threadfence`` releases and acquires one
process-wide object. A data race (two threads, one writing, no ordering) becomes a
:class:`SimulationError` naming both accesses.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
import re
import struct
import subprocess
import tempfile
from pathlib import Path

from . import build
from .args import Packed, Param
from .launch import SCHEDULES, LaunchConfig, LaunchResult
from .toolchain import find_toolchain

_TSAN_OPTIONS = (
    "halt_on_error=0 exitcode=0 report_signal_unsafe=0 detect_deadlocks=0 history_size=4 "
    "handle_segv=0 handle_sigbus=0 handle_sigfpe=0 handle_sigill=0 handle_abort=0 "
    "allow_user_segv_handler=1 io_sync=0 atexit_sleep_ms=0"
)
_MAGIC, _VERSION = 0x454D5552, 1
_HEADER = struct.Struct("<IIiiiiIi3I3IQQQ")
_ASLR_TROUBLE = ("unexpected memory mapping", "unsupported VMA range")
MAX_REPORTED = 5


def _run_child(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS=_TSAN_OPTIONS)
    r = subprocess.run(cmd, capture_output=True, env=env, **kw)
    if r.returncode != 0 and any(s in r.stderr.decode(errors="replace") for s in _ASLR_TROUBLE):
        # ThreadSanitizer of older GCC cannot map its shadow under high ASLR entropy
        r = subprocess.run(
            ["setarch", platform.machine(), "-R", *cmd], capture_output=True, env=env, **kw
        )
    return r


@functools.lru_cache(maxsize=1)
def support() -> tuple[bool, str]:
    """Whether ThreadSanitizer programs build and run here, and why not."""
    try:
        tc = find_toolchain()
    except RuntimeError as e:
        return False, str(e)
    with tempfile.TemporaryDirectory(prefix="cupy-bn-tsan-") as tmp:
        src = Path(tmp, "t.cpp")
        src.write_text(
            "#include <pthread.h>\nstatic void* f(void*) { return nullptr; }\n"
            "int main() { pthread_t t; pthread_create(&t, nullptr, f, nullptr); "
            "return pthread_join(t, nullptr); }\n"
        )
        exe = Path(tmp, "t")
        r = subprocess.run(
            [tc.cxx, "-fsanitize=thread", "-pthread", str(src), "-o", str(exe)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            return False, (
                "g++ cannot build ThreadSanitizer programs (libtsan missing? on "
                "Debian/Ubuntu: apt-get install libtsan2): " + r.stderr.strip().splitlines()[-1:][0]
                if r.stderr.strip()
                else ""
            )
        r2 = _run_child([str(exe)], timeout=60)
        if r2.returncode != 0:
            return False, "ThreadSanitizer programs do not run here: " + r2.stderr.decode(
                errors="replace"
            ).strip()[:400]
    return True, ""


def _request(index: int, cfg: LaunchConfig, packed: Packed, file_offsets: list[int]) -> bytes:
    storage = bytes(packed.keepalive)
    head = _HEADER.pack(
        _MAGIC,
        _VERSION,
        index,
        len(packed.slots),
        len(packed.regions),
        SCHEDULES[cfg.schedule],
        cfg.seed,
        cfg.stack_kb,
        *cfg.grid,
        *cfg.block,
        cfg.shared_mem,
        cfg.max_dyn_smem,
        len(storage),
    )
    n = len(packed.slots)
    parts = [
        head,
        storage,
        struct.pack(f"<{n}Q", *packed.slots),
        struct.pack(f"<{n}i", *packed.arg_region),
        struct.pack(f"<{n}Q", *packed.arg_offset),
    ]
    for off, r in zip(file_offsets, packed.regions, strict=False):
        parts.append(struct.pack("<4Q", off, r.hi - r.lo, r.align, int(r.writeable)))
    return b"".join(parts)


def run(
    artifact: build.Artifact,
    index: int,
    cfg: LaunchConfig,
    packed: Packed,
    params: tuple[Param, ...],
) -> LaunchResult:
    """One launch in race mode; arrays receive what the kernel wrote."""
    offsets, cursor = [], 0
    for r in packed.regions:
        cursor = (cursor + 63) // 64 * 64 + r.lo % r.align
        offsets.append(cursor)
        cursor += r.hi - r.lo
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.NamedTemporaryFile(prefix="cupy-bn-sim-", dir=shm) as f:
        f.truncate(max(cursor, 1))
        with mmap.mmap(f.fileno(), max(cursor, 1)) as m:
            for off, r in zip(offsets, packed.regions, strict=False):
                m[off : off + r.hi - r.lo] = ctypes.string_at(r.lo, r.hi - r.lo)
            m.flush()
            try:
                proc = _run_child(
                    [str(artifact.path), f.name],
                    input=_request(index, cfg, packed, offsets),
                    timeout=cfg.timeout or None,
                )
            except subprocess.TimeoutExpired:
                return LaunchResult(
                    3,
                    f"ERROR: race mode: the kernel did not finish within {cfg.timeout:.0f} s\n",
                    0,
                    0,
                    -1,
                    -1,
                    0,
                    [],
                )
            for off, r in zip(offsets, packed.regions, strict=False):
                if r.writeable and r.hi > r.lo:
                    ctypes.memmove(r.lo, m[off : off + r.hi - r.lo], r.hi - r.lo)
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    m_rc = re.search(r"^EMU_RC (\d+)$", out, re.M)
    if m_rc is None:
        tail = "\n".join(err.strip().splitlines()[-15:])
        return LaunchResult(
            1,
            f"ERROR: race mode: the child process failed (exit status "
            f"{proc.returncode}):\n{tail}\n",
            0,
            0,
            -1,
            -1,
            0,
            [],
        )
    rc = int(m_rc.group(1))
    regions = {
        int(i): (int(a, 16), int(n))
        for i, a, n in re.findall(
            r"^EMU_REGION (\d+) (0x[0-9a-f]+|\(nil\)) (\d+)$", out.replace("(nil)", "0x0"), re.M
        )
    }
    dyn = [
        (int(a, 16), int(b, 16))
        for a, b in re.findall(r"^EMU_DYN (0x[0-9a-f]+) (0x[0-9a-f]+)$", out, re.M)
    ]
    written = [int(i) for i in re.findall(r"^EMU_WRITTEN (\d+)$", out, re.M)]
    fault = re.search(r"^EMU_FAULT (-?\d+) (-?\d+) (-?\d+) (\d+)$", out, re.M)
    region, offset, write, pc = (int(g) for g in fault.groups()) if fault else (-1, 0, -1, 0)
    log = "\n".join(
        ln
        for ln in out.splitlines()
        if not ln.startswith(("EMU_RC", "EMU_REGION", "EMU_DYN", "EMU_WRITTEN", "EMU_FAULT"))
    )
    races = parse_reports(err, regions, dyn, packed, params)
    if races:
        extra = len(races) - MAX_REPORTED
        lines = [f"ERROR: data race {r}" for r in races[:MAX_REPORTED]]
        if extra > 0:
            lines.append(f"ERROR: ... and {extra} more data race report(s)")
        log = "\n".join(lines) + "\n" + log
        rc = rc or 1
    return LaunchResult(rc, log, 0, pc, region, write, offset, written)


_REPORT = re.compile(r"WARNING: ThreadSanitizer: data race.*?(?=\n==================|\Z)", re.S)
_ACCESS = re.compile(
    r"^\s*(?P<prev>Previous )?(?P<kind>[Aa]tomic )?(?P<op>[Rr]ead|[Ww]rite) of size (?P<size>\d+) "
    r"at (?P<addr>0x[0-9a-f]+) by thread (?P<tid>T\d+)[^:]*:\n(?P<stack>(?:\s+#\d+ .*\n?)*)",
    re.M,
)
_THREAD = re.compile(r"^\s*Thread (?P<tid>T\d+) '(?P<name>[^']*)'", re.M)
_FRAME = re.compile(r"#\d+ (?P<func>\S+) (?P<loc>[^\s()]+):(?P<line>\d+)")


def _frame_location(stack: str) -> str:
    for fm in _FRAME.finditer(stack):
        loc = fm.group("loc")
        if "emu.h" in loc or loc.startswith("/usr/") or "<simulator" in loc:
            continue
        return f"{os.path.basename(loc)}:{fm.group('line')}"
    return "an unknown line"


def _memory(
    addr: int, regions: dict, dyn: list, packed: Packed, params: tuple[Param, ...], report: str
) -> str:
    for i, (lo, n) in regions.items():
        if lo <= addr < lo + max(n, 1):
            spec = packed.regions[i]
            host = spec.lo + (addr - lo)
            for a in sorted(spec.args, key=lambda j: -packed.arg_offset[j]):
                start = spec.lo + packed.arg_offset[a]
                if host >= start:
                    arr = packed.arrays[a]
                    return (
                        f"global memory (element {(host - start) // max(1, arr.itemsize)} "
                        f"of the array passed as {params[a].describe()})"
                    )
            return "global memory"
    for lo, hi in dyn:
        if lo <= addr < hi:
            return f"dynamic shared memory (byte {addr - lo})"
    if "TLS of" in report or "thread-local" in report:
        return "static shared memory"
    return f"memory at {addr:#x}"


def parse_reports(
    stderr: str, regions: dict, dyn: list, packed: Packed, params: tuple[Param, ...]
) -> list[str]:
    """ThreadSanitizer's data race reports as one line each (duplicates merged)."""
    out: list[str] = []
    for rep in _REPORT.finditer(stderr):
        text = rep.group(0)
        names = {m.group("tid"): m.group("name") for m in _THREAD.finditer(text)}
        accesses = list(_ACCESS.finditer(text))
        if len(accesses) < 2:
            continue
        parts = []
        for a in accesses[:2]:
            who = names.get(a.group("tid"), a.group("tid"))
            kind = (a.group("kind") or "").lower()
            parts.append(
                f"{kind}{a.group('op').lower()} of {a.group('size')} bytes by {who} at "
                f"{_frame_location(a.group('stack'))}"
            )
        where = _memory(int(accesses[0].group("addr"), 16), regions, dyn, packed, params, text)
        line = f"on {where}: {parts[0]}, conflicting with an earlier {parts[1]}"
        if line not in out:
            out.append(line)
    return out
