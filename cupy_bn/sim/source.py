"""Reading CUDA C source: kernels it defines, and the one rewrite the simulator needs.

Everything here works on a copy of the source whose comments and string literals are blanked
(same length, newlines kept), so positions map one to one onto the original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def blank_comments_and_strings(src: str) -> str:
    """The source with comments and the contents of string/char literals replaced by spaces.

    Newlines are kept (line numbers stay valid); the literal ``"C"`` of ``extern "C"`` is kept.
    """
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c == "/" and i + 1 < n and src[i + 1] == "/":
            j = src.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif c == "/" and i + 1 < n and src[i + 1] == "*":
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            if src[i : j + 1] != '"C"':
                for k in range(i + 1, min(j, n)):
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def blank_preprocessor_lines(code: str) -> str:
    """Blank directive lines (and their backslash continuations): macros define no kernel
    the scan could see."""
    lines = code.split("\n")
    in_directive = False
    for i, line in enumerate(lines):
        if in_directive or line.lstrip().startswith("#"):
            in_directive = line.rstrip().endswith("\\")
            lines[i] = " " * len(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class KernelDecl:
    """A ``__global__`` function found in the source."""

    name: str
    extern_c: bool
    template: bool
    launch_bounds: int | None  # maxThreadsPerBlock of __launch_bounds__, when a literal


_GLOBAL = re.compile(r"\b__global__\b")
_AFTER_GLOBAL = re.compile(
    r"\s*(?:(?:__launch_bounds__\s*\((?P<lb1>[^()]*)\)|static|inline|__noinline__|"
    r"__forceinline__)\s*)*void\s*"
    r"(?:__launch_bounds__\s*\((?P<lb2>[^()]*)\)\s*)?(?P<name>[A-Za-z_]\w*)\s*\("
)
_EXTERN_C_BLOCK = re.compile(r'\bextern\s+"C"\s*\{')


_SCOPE_OPENER = re.compile(r'(?:\bnamespace(?:\s+[\w:]+)?|\bextern\s+"C")\s*$')


def _in_function(code: str) -> list[bool]:
    """For every position of blanked source: inside a function body (or a class), i.e. inside
    a brace that does not open a namespace or an ``extern "C"`` block."""
    stack: list[bool] = []  # per open brace: does it open code (not a namespace)?
    depth_code = 0
    out = []
    for i, ch in enumerate(code):
        if ch == "{":
            opens_code = not _SCOPE_OPENER.search(code, max(0, i - 200), i)
            stack.append(opens_code)
            depth_code += opens_code
        out.append(depth_code > 0)
        if ch == "}" and stack:
            depth_code -= stack.pop()
    return out


def _extern_c_spans(code: str) -> list[tuple[int, int]]:
    spans = []
    for m in _EXTERN_C_BLOCK.finditer(code):
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        spans.append((m.end(), i))
    return spans


def _literal_int(expr: str | None) -> int | None:
    if not expr:
        return None
    first = expr.split(",")[0].strip()
    return int(first, 0) if re.fullmatch(r"\d+|0[xX][0-9a-fA-F]+", first) else None


def _is_definition(code: str, paren: int) -> bool:
    """Whether the parameter list opening at ``paren`` is followed by a function body."""
    depth, i = 0, paren
    while i < len(code):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        i += 1
        if depth == 0:
            break
    return code[i:].lstrip().startswith("{")


def find_kernels(src: str) -> list[KernelDecl]:
    """The ``__global__`` functions defined in ``src`` (outside macros)."""
    code = blank_preprocessor_lines(blank_comments_and_strings(src))
    spans = _extern_c_spans(code)
    kernels: dict[str, KernelDecl] = {}
    for m in _GLOBAL.finditer(code):
        after = _AFTER_GLOBAL.match(code, m.end())
        if not after or not _is_definition(code, after.end() - 1):
            continue
        # the declaration starts after the previous `;`, `{` or `}`
        start = max(code.rfind(c, 0, m.start()) for c in ";{}") + 1
        head = code[start : m.start()]
        name = after.group("name")
        extern_c = bool(re.search(r'\bextern\s+"C"', head)) or any(
            a <= m.start() < b for a, b in spans
        )
        template = bool(re.search(r"\btemplate\s*<", head))
        bounds = _literal_int(after.group("lb1") or after.group("lb2"))
        prev = kernels.get(name)
        if prev is None or (bounds is not None and prev.launch_bounds is None):
            kernels[name] = KernelDecl(name, extern_c, template, bounds)
    return list(kernels.values())


def base_name(name_expression: str) -> str:
    """``"ns::bn_stats<float, 4>"`` -> ``"bn_stats"``."""
    head = name_expression.split("<", 1)[0].strip()
    return head.rsplit("::", 1)[-1]


_ALIGN = r"(?:__align__\s*\((?:[^()]|\([^()]*\))*\)\s*|alignas\s*\((?:[^()]|\([^()]*\))*\)\s*)?"
_EXTERN_SHARED = re.compile(
    r"\bextern\s+"
    + _ALIGN
    + r"__shared__\s+"
    + _ALIGN
    + r"(?P<type>[A-Za-z_][\w:<>,\s\*]*?)\s*"
    + _ALIGN
    + r"\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;"
)


def rewrite_dynamic_shared(src: str) -> str:
    """Point ``extern __shared__ T name[];`` at the launch's dynamic shared memory.

    Inside a function the declaration becomes ``T* const name = ...;`` on the same line; at
    namespace scope it becomes a macro (followed by a ``#line`` so line numbers stay right).
    Comments and strings are left alone.
    """
    code = blank_comments_and_strings(src)
    matches = list(_EXTERN_SHARED.finditer(code))
    if not matches:
        return src
    in_function = _in_function(code)
    out, pos = [], 0
    for m in matches:
        typ, name = " ".join(m.group("type").split()), m.group("name")
        pointer = f"reinterpret_cast<{typ}*>(::emu::g_dyn_smem)"
        out.append(src[pos : m.start()])
        if in_function[m.start()]:
            out.append(f"{typ}* const {name} = {pointer};")
        else:
            line = src.count("\n", 0, m.end()) + 1
            out.append(f"\n#define {name} ({pointer})\n#line {line}\n")
        pos = m.end()
    out.append(src[pos:])
    return "".join(out)
