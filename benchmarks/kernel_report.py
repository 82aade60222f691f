"""Static figures of the hot kernels, without a GPU: registers, spills, 128-bit accesses, PTX
instructions and bytes per element of the hot loop, and an estimate of the fraction of H200's
HBM bandwidth each could reach.

    python benchmarks/kernel_report.py                       # this checkout's kernels
    python benchmarks/kernel_report.py --source-root ../old  # another checkout's kernels
    python benchmarks/kernel_report.py --baseline ../old     # both, "before -> after"

Each kernel file is compiled by NVRTC for one architecture (``--arch``, default compute_90)
and its PTX read with `cupy_bn.kernels.ptx_checks`; registers and spill bytes come from
``ptxas -v`` (``?`` without a ptxas that reads this NVRTC's PTX: ``pip install
nvidia-cuda-nvcc`` of NVRTC's release). A source root is a checkout: its
``cupy_bn/kernels/*.cu`` are read with their local ``#include "..."`` files inlined, as the
loader does; kernels or files it lacks are reported as absent.

Method, per instantiation, from the PTX text of its entry:

- **Loops**: the PTX's basic blocks (a label starts one, a branch ends one) and their
  natural loops: a branch back to a block that dominates it, with every block that reaches
  the branch without passing that head; the innermost loops are those that hold no other
  loop's head. The **hot loop** is, among the innermost loops that store to global memory
  (that load and store nothing, for a reduction), one with 128-bit accesses
  where there is one (the packed loop: the path aligned tensors take), the element-by-element
  loop otherwise, and among those the one moving the most global bytes per iteration (the
  sum over its ``ld.global`` / ``st.global`` of lanes x lane width; the ``ld.global.cg``
  loads of cross-block partials not counted): for kernels with an optional operand (the
  residual, ``ddx``) the variant that reads it, where the compiler made two.
- **Elements per iteration**: the bytes stored per iteration / (sizeof(T) x the tensors the
  kernel writes), or for a reduction the bytes loaded / (sizeof(T) x the tensors it reads).
- **One iteration**: the path through the loop's blocks from its head back to it that moves
  the most global bytes (the fewest instructions among equals): where the loop branches on an
  optional operand or a lane test, the side that moves it.
- **Instructions per element**: the PTX instructions on that path (every line ending in
  ``;``, declarations excluded) / elements per iteration.
  PTX is not SASS: ptxas expands some instructions (divisions, conversions) and folds others,
  so the figure ranks loops rather than counting issued instructions.
- **Bytes per element**: the loop's global bytes per iteration / elements per iteration (the
  kernel's tensor passes x sizeof(T) when every access is in the loop).
- **Global accesses per element**: the loop's ``ld.global`` / ``st.global`` instructions /
  elements per iteration (1 / pack size with 16-byte packs).
- **Estimated % of HBM peak** on an H200 (4.8 TB/s, 132 SMs at about 1.98 GHz, 128 thread
  instructions issued per clock per SM): time per element = max(bytes / bandwidth,
  instructions / issue rate), and the estimate is the bandwidth term over that time. It is
  an estimate that ignores latency, occupancy, the cost of memory instructions beyond their
  issue slot, and everything outside the hot loop; 100 % means only that the loop's PTX
  issues faster than HBM delivers its bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cupy_bn.kernels import nvrtc, ptx_checks
from cupy_bn.kernels.loader import KERNEL_FILES, STORAGE_TYPES

HBM_BYTES_PER_S = 4.8e12
SMS = 132
CLOCK_HZ = 1.98e9
ISSUE_PER_CLOCK_PER_SM = 128
ISSUE_PER_S = SMS * CLOCK_HZ * ISSUE_PER_CLOCK_PER_SM

#: Tensors each kernel writes and reads per element (the variant with every optional operand).
TENSORS: dict[str, tuple[int, int]] = {
    "bn_ncs_stats": (0, 1),
    "bn_ncs_apply": (1, 1),
    "bn_ncs_reduce": (0, 2),
    "bn_ncs_backward": (1, 2),
    "bn_mc_stats": (0, 1),
    "bn_mc_apply": (1, 1),
    "bn_mc_reduce": (0, 2),
    "bn_mc_backward": (1, 2),
    "bn_ncs_double_backward_reduce": (0, 3),
    "bn_ncs_double_backward_apply": (2, 3),
    "bn_mc_double_backward_reduce": (0, 3),
    "bn_mc_double_backward_apply": (2, 3),
    "bn_ncs_apply_fused": (1, 2),
    "bn_mc_apply_fused": (1, 2),
    "bn_relu_gradient": (1, 2),
}

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)
_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_GLOBAL = re.compile(r"\b((ld|st)\.global[\w.:]*?(?:\.v(\d))?\.([bfsu])(\d+))\b")


def read_source(kernel_dir: Path, filename: str) -> str:
    """A kernel file of `kernel_dir` with its local includes inlined, each once."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        seen.add(name)
        text = _PRAGMA_ONCE.sub("", (kernel_dir / name).read_text())

        def include(match: re.Match) -> str:
            header = match.group(1)
            return "" if header in seen else expand(header)

        return _LOCAL_INCLUDE.sub(include, text)

    return expand(filename)


@dataclass
class Loop:
    instructions: int
    loads: int
    stores: int
    load_bytes: int
    store_bytes: int
    wide: int  # 128-bit accesses


def _is_instruction(line: str) -> bool:
    text = line.split("//", 1)[0].strip()
    return text.endswith(";") and not text.startswith(".")


def _blocks(entry: str) -> tuple[list[list[str]], list[list[int]]]:
    """The basic blocks of a PTX entry (lines) and each block's successors."""
    blocks: list[list[str]] = [[]]
    for line in entry.splitlines():
        if _LABEL.match(line) and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
        code = line.split("//", 1)[0]
        if _BRANCH.search(code) or re.search(r"\b(ret|exit)\s*;", code):
            blocks.append([])
    blocks = [b for b in blocks if b]
    index = {}
    for i, block in enumerate(blocks):
        m = _LABEL.match(block[0])
        if m:
            index[m.group(1)] = i
    succ: list[list[int]] = []
    for i, block in enumerate(blocks):
        last = block[-1].split("//", 1)[0].strip()
        m = _BRANCH.search(last)
        out = []
        if m and m.group(1) in index:
            out.append(index[m.group(1)])
        conditional = last.startswith("@")
        ends = re.search(r"\b(ret|exit)\s*;", last) or (m and not conditional)
        if not ends and i + 1 < len(blocks):
            out.append(i + 1)
        succ.append(out)
    return blocks, succ


def _dominators(succ: list[list[int]]) -> list[set[int]]:
    n = len(succ)
    reachable, stack = {0}, [0]
    while stack:
        for v in succ[stack.pop()]:
            if v not in reachable:
                reachable.add(v)
                stack.append(v)
    pred: list[list[int]] = [[] for _ in range(n)]
    for u, vs in enumerate(succ):
        if u in reachable:
            for v in vs:
                pred[v].append(u)
    every = set(range(n))
    dom = [every.copy() for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in range(1, n):
            new = set.intersection(*(dom[u] for u in pred[v])) if pred[v] else set()
            new = new | {v}
            if new != dom[v]:
                dom[v], changed = new, True
    return dom


def _block_loop(lines: list[str]) -> Loop:
    loop = Loop(sum(map(_is_instruction, lines)), 0, 0, 0, 0, 0)
    for line in lines:
        for op, kind, lanes, _, bits in _GLOBAL.findall(line.split("//", 1)[0]):
            if ".cg" in op:  # the cross-block partials (__ldcg), not the tensors
                continue
            size = int(lanes or 1) * int(bits) // 8
            loop.wide += size == 16
            if kind == "ld":
                loop.loads += 1
                loop.load_bytes += size
            else:
                loop.stores += 1
                loop.store_bytes += size
    return loop


def _add(a: Loop, b: Loop) -> Loop:
    return Loop(*(x + y for x, y in zip(vars(a).values(), vars(b).values(), strict=True)))


def loops(entry: str) -> list[Loop]:
    """One iteration of each innermost natural loop of a PTX entry (a branch back to a block
    that dominates it, with every block that reaches that branch without passing the loop's
    head): the instructions and global accesses along the path from the head back to it that
    moves the most global bytes (fewest instructions among equals)."""
    blocks, succ = _blocks(entry)
    dom = _dominators(succ)
    pred: list[list[int]] = [[] for _ in blocks]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    bodies: dict[int, set[int]] = {}
    for u, vs in enumerate(succ):
        for head in vs:
            if head in dom[u]:  # back edge u -> head
                body, stack = {head, u}, [u] if u != head else []
                while stack:
                    for w in pred[stack.pop()]:
                        if w not in body:
                            body.add(w)
                            stack.append(w)
                bodies.setdefault(head, set()).update(body)
    out = []
    for head, body in bodies.items():
        if any(other != head and other in body for other in bodies):
            continue  # not innermost
        cost = {i: _block_loop(blocks[i]) for i in body}
        out.append(_heaviest_iteration(head, body, succ, cost))
    return out


def _heaviest_iteration(
    head: int, body: set[int], succ: list[list[int]], cost: dict[int, Loop]
) -> Loop:
    """The path from `head` back to it through `body` moving the most global bytes."""
    best: dict[int, Loop] = {}

    def key(lp: Loop) -> tuple[int, int]:
        return (lp.load_bytes + lp.store_bytes, -lp.instructions)

    def heaviest(i: int) -> Loop:
        if i not in best:
            tails = [heaviest(v) for v in succ[i] if v in body and v != head]
            back = head in succ[i]
            options = tails + ([Loop(0, 0, 0, 0, 0, 0)] if back or not tails else [])
            best[i] = _add(cost[i], max(options, key=key))
        return best[i]

    return heaviest(head)


@dataclass
class Row:
    kernel: str
    dtype: str
    registers: int | None = None
    spills: int | None = None
    wide_loads: int = 0
    wide_stores: int = 0
    per_element: float | None = None
    bytes_per_element: float | None = None
    accesses_per_element: float | None = None

    @property
    def hbm_fraction(self) -> float | None:
        if not self.per_element or not self.bytes_per_element:
            return None
        memory = self.bytes_per_element / HBM_BYTES_PER_S
        issue = self.per_element / ISSUE_PER_S
        return memory / max(memory, issue)


def hot_loop_figures(kernel: str, dtype: str, entry: str) -> tuple[float, float, float] | None:
    """(instructions, bytes, global accesses) per element of the hot loop, or None."""
    writes, reads = TENSORS[kernel]
    candidates = [
        lp
        for lp in loops(entry)
        if (lp.store_bytes if writes else lp.load_bytes and not lp.store_bytes)
    ]
    if not candidates:
        return None
    hot = max(
        candidates,
        key=lambda lp: (lp.wide > 0, lp.load_bytes + lp.store_bytes, -lp.instructions),
    )
    itemsize = ITEMSIZE[dtype]
    elements = (
        hot.store_bytes / (itemsize * writes) if writes else hot.load_bytes / (itemsize * reads)
    )
    if elements <= 0:
        return None
    return (
        hot.instructions / elements,
        (hot.load_bytes + hot.store_bytes) / elements,
        (hot.loads + hot.stores) / elements,
    )


def report(source_root: Path, arch: str) -> dict[tuple[str, str], Row]:
    """Rows of every kernel x dtype that the source root's kernel files define."""
    kernel_dir = source_root / "cupy_bn" / "kernels"
    ptxas = ptx_checks.find_ptxas()
    rows: dict[tuple[str, str], Row] = {}
    for spec in KERNEL_FILES.values():
        path = kernel_dir / spec.filename
        if not path.exists():
            continue
        source = read_source(kernel_dir, spec.filename)
        present = [k for k in spec.kernels if re.search(rf"\b{k}\s*\(", source)]
        names = [spec.name_expression(k, t) for k in present for t in STORAGE_TYPES]
        if not names:
            continue
        result = nvrtc.compile_program(
            source,
            arch=arch,
            options=("--std=c++17",),
            name_expressions=names,
            name=spec.filename,
        )
        entries = ptx_checks.ptx_entries(result.ptx)
        regs = ptx_checks.ptxas_report(result.ptx, arch, ptxas) if ptxas else {}
        for kernel in present:
            for dtype in STORAGE_TYPES:
                mangled = result.lowered_names[spec.name_expression(kernel, dtype)]
                facts = ptx_checks.ptx_facts(entries[mangled])
                r = regs.get(mangled, {})
                row = Row(
                    kernel,
                    dtype,
                    registers=r.get("registers"),
                    spills=(r["spill_stores"] + r["spill_loads"]) if "spill_stores" in r else None,
                    wide_loads=int(facts["wide_loads"]),
                    wide_stores=int(facts["wide_stores"]),
                )
                figures = hot_loop_figures(kernel, dtype, entries[mangled])
                if figures:
                    row.per_element, row.bytes_per_element, row.accesses_per_element = figures
                rows[kernel, dtype] = row
    return rows


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "?"
    return format(v, spec)


def _pct(row: Row | None) -> str:
    if row is None or row.hbm_fraction is None:
        return "?"
    return f"{100 * row.hbm_fraction:.0f}"


COLUMNS = (
    ("registers", lambda r: _fmt(r.registers)),
    ("spill bytes", lambda r: _fmt(r.spills)),
    ("128-bit ld / st", lambda r: f"{r.wide_loads} / {r.wide_stores}"),
    ("PTX instr. / element", lambda r: _fmt(r.per_element, ".2f")),
    ("bytes / element", lambda r: _fmt(r.bytes_per_element, ".0f")),
    ("global ld+st / element", lambda r: _fmt(r.accesses_per_element, ".3g")),
    ("est. % HBM peak", _pct),
)


def table(after: dict, before: dict | None) -> str:
    head = ["kernel", "dtype"] + [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kernel in TENSORS:
        for dtype in STORAGE_TYPES:
            row = after.get((kernel, dtype))
            if row is None:
                continue
            cells = [f"`{kernel}`", dtype]
            for _, cell in COLUMNS:
                now = cell(row)
                if before is not None:
                    old = before.get((kernel, dtype))
                    cells.append(f"{cell(old) if old else 'absent'} → {now}")
                else:
                    cells.append(now)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--source-root", type=Path, default=here, help="checkout to report on")
    parser.add_argument("--baseline", type=Path, help="checkout to compare with (before)")
    parser.add_argument("--arch", default="compute_90")
    args = parser.parse_args(argv)
    if not nvrtc.is_available() or not nvrtc.arch_supported(args.arch):
        print(f"NVRTC for {args.arch} is not available here", file=sys.stderr)
        return 2
    if ptx_checks.find_ptxas() is None:
        print("no ptxas reading this NVRTC's PTX: registers and spills show as ?", file=sys.stderr)
    after = report(args.source_root, args.arch)
    before = report(args.baseline, args.arch) if args.baseline else None
    print(
        f"{args.arch}; H200 model: {HBM_BYTES_PER_S / 1e12:.1f} TB/s, {SMS} SMs x "
        f"{CLOCK_HZ / 1e9:.2f} GHz x {ISSUE_PER_CLOCK_PER_SM} instructions / clock "
        "(an estimate that ignores latency)"
    )
    print(table(after, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
