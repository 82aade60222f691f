"""Static performance facts of the kernels, from NVRTC's PTX and ``ptxas -v``, without a GPU.

For every instantiation of every kernel file (`cupy_bn.kernels.loader.KERNEL_FILES`) and a
target architecture, `kernel_facts` reports:

- from the PTX: whether it declares local memory (``.local``: arrays the compiler could not
  keep in registers), and how many 128-bit (``.v4``) and 64-bit (``.v2``) global loads and
  stores each entry has;
- from ``ptxas -v`` where a ptxas that reads this NVRTC's PTX is found: registers per thread,
  spill stores and loads in bytes, the stack frame.

`TARGET_BLOCKS` holds each kernel's target of resident 256-thread blocks per SM and
`REGISTER_BUDGETS` the most registers per thread that still give it (`budget_for_blocks`);
`check_facts` lists every fact that breaks a budget, spills or uses local memory.

ptxas is looked up like the CUDA headers (`cupy_bn.kernels.toolchain`): ``$CUPY_BN_PTXAS``,
then the ``nvidia-cuda-nvcc`` pip wheel (``site-packages/nvidia/cu*/bin/ptxas``), then
``$CUDA_PATH/bin``, ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin`` and ``$PATH``. The first one
whose CUDA release is at least NVRTC's is used (an older ptxas rejects the newer PTX ISA).

    from cupy_bn.kernels import ptx_checks

    facts = ptx_checks.kernel_facts("ncs", "compute_90")
    problems = ptx_checks.check_facts(facts)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cupy_bn.kernels import nvrtc
from cupy_bn.kernels.loader import KERNEL_FILES

__all__ = [
    "REGISTERS_PER_SM",
    "REGISTER_BUDGETS",
    "TARGET_BLOCKS",
    "PACKED_KERNELS",
    "PACKED_LOAD_KERNELS",
    "PACKED_16BIT_ONLY",
    "KernelFacts",
    "Ptxas",
    "budget_for_blocks",
    "check_facts",
    "find_ptxas",
    "kernel_facts",
    "launch_bounds",
    "parse_ptxas_log",
    "ptx_entries",
    "ptx_facts",
    "ptxas_report",
    "summary_rows",
]

#: The register file of one SM (every architecture from sm_75 to sm_12x), 32-bit registers.
REGISTERS_PER_SM = 65536
#: Threads per block of every kernel (``__launch_bounds__(256)``).
BLOCK_THREADS = 256
#: ptxas allocates registers per warp in units of 256 (8 per thread).
_REGISTER_GRANULE = 8


def budget_for_blocks(blocks: int, threads: int = BLOCK_THREADS) -> int:
    """Most registers per thread with which `blocks` blocks of `threads` fit on one SM."""
    per_thread = REGISTERS_PER_SM // (blocks * threads)
    return min(255, per_thread // _REGISTER_GRANULE * _REGISTER_GRANULE)


#: Target resident 256-thread blocks per SM of each kernel; its register budget is
#: `budget_for_blocks` of it. The elementwise kernels (apply, backward) stream without state
#: between loads and target 5 blocks (1280 threads, 48 registers); the reductions carry a
#: Welford triple or two sums through a merge tree and target 3 (80 registers), except
#: `bn_mc_reduce`, which asks ptxas for 4 with `__launch_bounds__(256, 4)` (64 registers:
#: without the bound, ptxas 13.5 spills it on sm_80 for __half); the double backward's apply
#: writes two tensors from six coefficients and targets 4 (64), its reductions carry five sums
#: and target 3. The fused apply kernels read `x` and a residual and target 4 (64); the ReLU's
#: gradient, a flat pass, targets full occupancy, 8 (32). A reduction's grid is one wave
#: sized by the occupancy API, so a kernel over budget runs fewer blocks at once, not a
#: different result. No target changed with the 16-byte packs; `bn_mc_stats` (3) and
#: `bn_mc_double_backward_apply` (4) pass theirs to `__launch_bounds__`, because with their
#: pack paths ptxas 13.5 left to itself spills `bn_mc_stats` at 64 registers (sm_80 __half)
#: and gives `bn_mc_double_backward_apply` 73 on sm_100.
TARGET_BLOCKS: dict[str, int] = {
    "bn_ncs_stats": 3,
    "bn_ncs_apply": 5,
    "bn_ncs_reduce": 3,
    "bn_ncs_backward": 5,
    "bn_mc_stats": 3,
    "bn_mc_apply": 5,
    "bn_mc_reduce": 4,
    "bn_mc_backward": 5,
    "bn_ncs_double_backward_reduce": 3,
    "bn_ncs_double_backward_apply": 4,
    "bn_mc_double_backward_reduce": 3,
    "bn_mc_double_backward_apply": 4,
    "bn_ncs_apply_fused": 4,
    "bn_mc_apply_fused": 4,
    "bn_relu_gradient": 8,
}

#: Registers per thread each kernel may use (from `TARGET_BLOCKS`).
REGISTER_BUDGETS: dict[str, int] = {k: budget_for_blocks(b) for k, b in TARGET_BLOCKS.items()}

_BOUNDS = re.compile(r"__launch_bounds__\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)\s*(\w+)\s*\(")


def launch_bounds(source: str) -> dict[str, tuple[int, int | None]]:
    """Kernel name -> (max threads, min blocks or None) of each ``__launch_bounds__`` in a
    kernel source."""
    return {
        m.group(3): (int(m.group(1)), int(m.group(2)) if m.group(2) else None)
        for m in _BOUNDS.finditer(source)
    }


@dataclass(frozen=True)
class KernelFacts:
    """What the PTX and ptxas say about one instantiation on one architecture.

    Attributes:
        expression: the template instantiation, ``"bn_ncs_apply<float, float>"``.
        kernel: the kernel's name, ``"bn_ncs_apply"``.
        arch: the virtual architecture compiled for, ``"compute_90"``.
        local_memory: whether the PTX entry declares or touches ``.local`` memory.
        v4_loads, v2_loads: 128-bit and 64-bit global loads (``ld.global[.nc].v4`` / ``.v2``).
        v4_stores, v2_stores: the same for ``st.global``.
        wide_loads, wide_stores: the 128-bit ones among them (``.v4`` of 32-bit lanes,
            ``.v2`` of 64-bit lanes).
        registers, spill_stores, spill_loads, stack_frame: from ``ptxas -v`` (bytes for the
            last three); ``None`` without a ptxas.
    """

    expression: str
    kernel: str
    arch: str
    local_memory: bool
    v4_loads: int
    v2_loads: int
    v4_stores: int
    v2_stores: int
    wide_loads: int = 0
    wide_stores: int = 0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None


@dataclass(frozen=True)
class Ptxas:
    """A ptxas binary and its CUDA release, ``(13, 5)``."""

    path: str
    version: tuple[int, int]


_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def _ptxas_version(path: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _RELEASE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _wheel_bins() -> list[Path]:
    """``bin`` folders of NVIDIA's pip wheels, newest CUDA major version first."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    found: list[Path] = []
    for base in map(Path, spec.submodule_search_locations):
        found += sorted(base.glob("cu[0-9]*/bin"), reverse=True)
        found.append(base / "cuda_nvcc" / "bin")
    return found


def _ptxas_candidates() -> list[str]:
    cands: list[str] = []
    explicit = os.environ.get("CUPY_BN_PTXAS")
    if explicit:
        cands.append(explicit)
    cands += [str(d / "ptxas") for d in _wheel_bins()]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root:
            cands.append(str(Path(root) / "bin" / "ptxas"))
    cands.append("/usr/local/cuda/bin/ptxas")
    on_path = shutil.which("ptxas")
    if on_path:
        cands.append(on_path)
    return cands


@functools.lru_cache(maxsize=1)
def find_ptxas() -> Ptxas | None:
    """The first ptxas (see the module docstring) able to read this NVRTC's PTX, or None."""
    need = nvrtc.version() if nvrtc.is_available() else (0, 0)
    for path in _ptxas_candidates():
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        version = _ptxas_version(path)
        if version is not None and version >= need:
            return Ptxas(path, version)
    return None


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


def ptx_entries(ptx: str) -> dict[str, str]:
    """Each ``.entry`` of a PTX module, mangled name -> its text (up to the next entry)."""
    matches = list(_ENTRY.finditer(ptx))
    return {
        m.group(1): ptx[m.start() : matches[i + 1].start() if i + 1 < len(matches) else len(ptx)]
        for i, m in enumerate(matches)
    }


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


_LD = r"\bld\.global(?:\.nc)?(?:\.L\w+::\w+)*"
_ST = r"\bst\.global(?:\.L\w+::\w+)*"
#: 128 bits: four 32-bit or two 64-bit lanes.
_WIDE = r"\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b"


def ptx_facts(entry: str) -> dict[str, int | bool]:
    """Local memory and vector global accesses of one PTX entry's text."""
    return {
        "local_memory": bool(re.search(r"\.local\b", entry)),
        "v4_loads": _count(_LD + r"\.v4\.", entry),
        "v2_loads": _count(_LD + r"\.v2\.", entry),
        "v4_stores": _count(_ST + r"\.v4\.", entry),
        "v2_stores": _count(_ST + r"\.v2\.", entry),
        "wide_loads": _count(_LD + _WIDE, entry),
        "wide_stores": _count(_ST + _WIDE, entry),
    }


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(ptx: str, arch: str, ptxas: Ptxas | None = None) -> dict[str, dict[str, int]]:
    """``ptxas -v`` on `ptx` for the real architecture of `arch` (``compute_90`` -> ``sm_90``):
    mangled entry name -> registers, spill_stores, spill_loads, stack_frame.

    Raises:
        RuntimeError: no usable ptxas, or ptxas rejected the PTX (its message included).
    """
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise RuntimeError(
            "no ptxas reading this NVRTC's PTX: `pip install nvidia-cuda-nvcc` of NVRTC's "
            "CUDA release, or point CUPY_BN_PTXAS at one"
        )
    sm = "sm_" + arch.removeprefix("compute_")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernels.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [ptxas.path, "-v", f"-arch={sm}", "-o", str(Path(tmp) / "kernels.cubin"), str(src)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if done.returncode != 0:
        raise RuntimeError(f"ptxas {sm} failed:\n{done.stderr}")
    return parse_ptxas_log(done.stderr)


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """``ptxas -v``'s messages read: mangled entry name -> registers, spill_stores,
    spill_loads, stack_frame (those it reports)."""
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_FUNCTION.search(line)
        if m:
            current = report.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _PTXAS_STACK.search(line)
        if m:
            current["stack_frame"], current["spill_stores"], current["spill_loads"] = map(
                int, m.groups()
            )
        m = _PTXAS_REGISTERS.search(line)
        if m:
            current["registers"] = int(m.group(1))
    return report


def kernel_facts(key: str, arch: str, *, use_ptxas: bool = True) -> list[KernelFacts]:
    """Facts of every instantiation of `KERNEL_FILES[key]` on `arch`, in name-expression order.

    With `use_ptxas` and a ptxas found, the register and spill fields are filled.

    Raises:
        NvrtcError: NVRTC is missing or rejects the file or the architecture.
        RuntimeError: ptxas rejects the PTX.
    """
    spec = KERNEL_FILES[key]
    result = nvrtc.compile_program(
        spec.source(),
        arch=arch,
        options=("--std=c++17",),
        name_expressions=spec.name_expressions(),
        name=spec.filename,
    )
    entries = ptx_entries(result.ptx)
    ptxas = find_ptxas() if use_ptxas else None
    report = ptxas_report(result.ptx, arch, ptxas) if ptxas is not None else {}
    facts = []
    for expression, mangled in result.lowered_names.items():
        kernel = expression.partition("<")[0]
        regs = report.get(mangled, {})
        facts.append(
            KernelFacts(
                expression,
                kernel,
                arch,
                registers=regs.get("registers"),
                spill_stores=regs.get("spill_stores"),
                spill_loads=regs.get("spill_loads"),
                stack_frame=regs.get("stack_frame"),
                **ptx_facts(entries[mangled]),  # type: ignore[arg-type]
            )
        )
    return facts


#: Kernels that move 16-byte packs where alignment allows: their PTX must hold 128-bit global
#: loads and stores, in every instantiation.
PACKED_KERNELS = (
    "bn_ncs_apply",
    "bn_ncs_backward",
    "bn_mc_apply",
    "bn_mc_backward",
    "bn_ncs_double_backward_apply",
    "bn_mc_double_backward_apply",
    "bn_ncs_apply_fused",
    "bn_mc_apply_fused",
    "bn_relu_gradient",
)

#: Reductions that load 16-byte packs where alignment allows (they store no tensor): their PTX
#: must hold 128-bit global loads, in every instantiation but those of `PACKED_16BIT_ONLY` for
#: 4- and 8-byte types.
PACKED_LOAD_KERNELS = (
    "bn_ncs_stats",
    "bn_ncs_reduce",
    "bn_mc_stats",
    "bn_mc_reduce",
    "bn_ncs_double_backward_reduce",
)
#: The statistics fold packs of 16-bit types only (bn::StatsPacks in bn_common.cuh).
PACKED_16BIT_ONLY = ("bn_ncs_stats", "bn_mc_stats")
_16BIT = ("<__half,", "<__nv_bfloat16,")


def check_facts(facts: list[KernelFacts]) -> list[str]:
    """Every broken rule, one line each: local memory in the PTX, spills, registers above the
    kernel's `REGISTER_BUDGETS` entry, a `PACKED_KERNELS` instantiation without 128-bit loads
    or stores, a `PACKED_LOAD_KERNELS` one without 128-bit loads (for `PACKED_16BIT_ONLY`, of a
    16-bit type). Register facts absent (no ptxas) are not checked."""
    problems = []
    for f in facts:
        where = f"{f.expression} on {f.arch}"
        if f.kernel in PACKED_KERNELS and not (f.wide_loads and f.wide_stores):
            problems.append(
                f"{where}: no 128-bit global loads or stores ({f.wide_loads} loads, "
                f"{f.wide_stores} stores)"
            )
        sixteen = any(t in f.expression for t in _16BIT)
        packs = f.kernel not in PACKED_16BIT_ONLY or sixteen
        if f.kernel in PACKED_LOAD_KERNELS and packs and not f.wide_loads:
            problems.append(f"{where}: no 128-bit global loads")
        if f.local_memory:
            problems.append(f"{where}: the PTX uses local memory")
        if f.spill_stores or f.spill_loads:
            problems.append(
                f"{where}: ptxas spills ({f.spill_stores} bytes stored, {f.spill_loads} loaded)"
            )
        budget = REGISTER_BUDGETS.get(f.kernel)
        if f.registers is not None and budget is not None and f.registers > budget:
            problems.append(f"{where}: {f.registers} registers, budget {budget}")
    return problems


def summary_rows(facts: list[KernelFacts]) -> list[tuple[str, str, str, int, int, int]]:
    """One row per (kernel, arch) over its four dtypes: kernel, arch, registers (the dtypes'
    smallest-largest, "?" without ptxas), spill bytes (stores + loads, summed), and the
    128-bit and 64-bit global loads (summed), in the order of `facts`."""
    rows: dict[tuple[str, str], list[KernelFacts]] = {}
    for f in facts:
        rows.setdefault((f.kernel, f.arch), []).append(f)
    out = []
    for (kernel, arch), group in rows.items():
        regs = [f.registers for f in group if f.registers is not None]
        reg_text = (
            (f"{min(regs)}-{max(regs)}" if min(regs) != max(regs) else str(regs[0]))
            if regs
            else "?"
        )
        spills = sum((f.spill_stores or 0) + (f.spill_loads or 0) for f in group)
        out.append(
            (
                kernel,
                arch,
                reg_text,
                spills,
                sum(f.v4_loads for f in group),
                sum(f.v2_loads for f in group),
            )
        )
    return out
