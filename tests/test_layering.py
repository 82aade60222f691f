"""What each layer of the package may import (docs/architecture.md), read from the source.

- The library (cupy_bn outside cupy_bn/sim, cupy_bn/cli and cupy_bn/__main__.py) never
  imports cupy_bn.cli.
- The library imports the simulator only as the package `cupy_bn.sim` (its public names, no
  submodule), only inside the functions of `SIM_ENTRY_POINTS` (the kernel loader's simulator
  target and the `info` report's probe), so that importing cupy_bn never loads it.
- cupy_bn.sim imports, of the rest of cupy_bn, only `cupy_bn.kernels.toolchain` (the CUDA
  headers and `ToolchainError`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cupy_bn"

#: Where the library may import cupy_bn.sim: source file -> enclosing class or function.
SIM_ENTRY_POINTS = {
    "cupy_bn/kernels/loader.py": "SimLoader",
    "cupy_bn/environment.py": "_simulator",
}
#: What cupy_bn.sim may import of the rest of cupy_bn.
SIM_MAY_IMPORT = "cupy_bn.kernels.toolchain"


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    scope: str  # the enclosing classes and functions, dotted ("" at module level)
    deferred: bool  # inside a function body: runs when called, not when imported


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    """Every module the source file `path` of the package imports (see `imports_in`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> list[Import]:
    """Every module `source` (a module of `package`) imports: import statements (relative ones
    resolved, `from a import b` counted as `a` and `a.b`) and `importlib.import_module("...")`
    calls with a literal name."""
    found: list[Import] = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)

    def visit(node: ast.AST, scope: str, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner_scope, inner_deferred = scope, deferred or isinstance(child, ast.Lambda)
            if isinstance(child, (*functions, ast.ClassDef)):
                inner_scope = f"{scope}.{child.name}" if scope else child.name
                inner_deferred = deferred or isinstance(child, functions)
            here = (child.lineno, scope, deferred) if hasattr(child, "lineno") else None
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, *here) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = parts[: len(parts) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.append(Import(base, *here))
                found.extend(Import(f"{base}.{a.name}", *here) for a in child.names)
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.append(Import(child.args[0].value, *here))
            visit(child, inner_scope, inner_deferred)

    visit(ast.parse(source), "", False)
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sources(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def library_sources() -> list[Path]:
    """The library: cupy_bn outside cupy_bn/sim, cupy_bn/cli and `python -m cupy_bn`."""
    return [
        p
        for p in sources(PACKAGE)
        if p != PACKAGE / "__main__.py"
        and not any(p.is_relative_to(PACKAGE / sub) for sub in ("sim", "cli"))
    ]


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def test_the_import_reader_sees_every_kind_of_import():
    source = (
        "import cupy_bn.cli\n"
        "from . import loader\n"
        "from ..sim.raw import RawModule\n"
        "class SimLoader:\n"
        "    def __init__(self):\n"
        "        from cupy_bn import sim\n"
        "def probe():\n"
        "    import importlib\n"
        "    importlib.import_module('cupy_bn.sim')\n"
    )
    found = {(i.module, i.scope, i.deferred) for i in imports_in(source, "cupy_bn.kernels")}
    assert found == {
        ("cupy_bn.cli", "", False),
        ("cupy_bn.kernels", "", False),
        ("cupy_bn.kernels.loader", "", False),
        ("cupy_bn.sim.raw", "", False),
        ("cupy_bn.sim.raw.RawModule", "", False),
        ("cupy_bn", "SimLoader.__init__", True),
        ("cupy_bn.sim", "SimLoader.__init__", True),
        ("importlib", "probe", True),
        ("cupy_bn.sim", "probe", True),
    }


@pytest.mark.parametrize("path", library_sources(), ids=rel)
def test_the_library_never_imports_the_cli(path):
    bad = [i for i in imports_of(path) if within(i.module, "cupy_bn.cli")]
    assert not bad, f"{rel(path)} imports the CLI: {bad}"


@pytest.mark.parametrize("path", library_sources(), ids=rel)
def test_the_library_reaches_the_simulator_only_through_its_entry_points(path):
    entry = SIM_ENTRY_POINTS.get(rel(path))
    bad = [
        i
        for i in imports_of(path)
        if within(i.module, "cupy_bn.sim")
        and not (
            entry is not None
            and i.deferred
            and within(i.scope, entry)
            and i.module == "cupy_bn.sim"  # the package's public names, no submodule
        )
    ]
    assert not bad, f"{rel(path)} imports the simulator where it may not: {bad}"


@pytest.mark.parametrize("path", sources(PACKAGE / "sim"), ids=rel)
def test_the_simulator_imports_only_the_kernels_toolchain(path):
    outside = {
        i.module
        for i in imports_of(path)
        if within(i.module, "cupy_bn") and not within(i.module, "cupy_bn.sim")
    }
    allowed = {"cupy_bn", "cupy_bn.kernels"}  # the parents `import a.b.c` implies
    bad = sorted(m for m in outside if m not in allowed and not within(m, SIM_MAY_IMPORT))
    assert not bad, f"{rel(path)} imports {bad}"


def test_importing_the_library_and_the_kernels_loads_neither_simulator_nor_cli():
    script = (
        "import sys, cupy_bn, cupy_bn.kernels.loader, cupy_bn.kernels.nvrtc\n"
        "cupy_bn.kernels.toolchain.cuda_include_dirs()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('cupy_bn.sim', 'cupy_bn.cli'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    assert out.stdout.strip() == "[]"
