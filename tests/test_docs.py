"""Every code block of README.md, docs/*.md and examples/README.md runs as written.

A document's blocks run as a reader pasting them into one session would:

- ```python blocks run in order in one namespace, in a fresh interpreter whose working
  directory is a fresh temporary folder;
- ```bash blocks run in that folder with `bash -e -o pipefail`, `cupy-bn` and `python` being
  this checkout's (`python -m cupy_bn`), so they find the files that earlier blocks wrote;
- the block right after `<!-- not run: REASON -->` is not run (installs, mpirun, GPUs, runs of
  minutes): it is reported as a skipped test that gives REASON;
- the block right after `<!-- needs: NAME, ... -->` runs where every NAME is available, an
  importable module (`torch`, `mpi4py`) or one of `CAPABILITIES`; elsewhere it is reported as a
  skipped test naming what is missing. Later blocks must not depend on it;
- README.md's first block, the set-up and test commands of a fresh machine, is not run here:
  `.ci/run` runs the same two commands on a fresh machine (reported as a skipped test);
- ```json, ```text and unlabelled fences show output and formats and are not run. A fence in any
  other language fails the test, so that no code escapes it by its label.

`python tests/test_docs.py DOCUMENT` runs one document's blocks that way (each test below runs
one document in such a child process, from a temporary folder).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = (
    "README.md",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
    "examples/README.md",
)
#: Folders a document's Python blocks import from by module name: examples/README.md shows
#: code that runs next to the example modules (`from nn import ...`).
IMPORT_FOLDERS = {"examples/README.md": "examples"}

RUN_LANGUAGES = ("python", "bash")
SHOWN_LANGUAGES = ("", "json", "text")

FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[\w+-]*)\s*$")
FENCE_END = re.compile(r"^ *```\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<kind>not run|needs)\s*:\s*(?P<value>.*?)\s*-->\s*$")


def _simulator() -> bool:
    from cupy_bn import sim

    return sim.is_available()


def _race_mode() -> bool:
    from cupy_bn import sim

    return sim.is_available() and sim.race_mode_support()[0]


def _nvrtc() -> bool:
    from cupy_bn.kernels import nvrtc

    return nvrtc.is_available()


#: What `<!-- needs: ... -->` may name besides modules: a name, its check, and what it means.
CAPABILITIES: dict[str, tuple[Callable[[], bool], str]] = {
    "cuda-simulator": (_simulator, "the CUDA simulator's g++ and CUDA headers"),
    "race-mode": (_race_mode, "the simulator's race mode (ThreadSanitizer's runtime)"),
    "nvrtc": (_nvrtc, "NVRTC through CuPy (cupy-cuda13x and nvidia-cuda-nvrtc)"),
}


class DocumentFormatError(ValueError):
    """A document breaks the block rules of this module's docstring."""


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language, its code and how it is marked."""

    document: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str  # dedented to the fence's indentation
    not_run: str | None = None  # the reason of `<!-- not run: ... -->`
    needs: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def parse_blocks(document: str) -> list[Block]:
    """The fenced blocks of `document` (relative to the repository), checked against the rules."""
    lines = (REPO / document).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    directive: tuple[str, str, int] | None = None  # (kind, value, line) awaiting its block
    index = 0
    while index < len(lines):
        line, number = lines[index], index + 1
        if match := DIRECTIVE.match(line):
            if directive is not None:
                raise DocumentFormatError(f"{document}:{number}: two directives for one block")
            if not match["value"]:
                raise DocumentFormatError(f"{document}:{number}: {match['kind']}: says nothing")
            directive = (match["kind"], match["value"], number)
        elif match := FENCE.match(line):
            indent, language = len(match["indent"]), match["language"]
            end = index + 1
            while end < len(lines) and not FENCE_END.match(lines[end]):
                end += 1
            if end == len(lines):
                raise DocumentFormatError(f"{document}:{number}: the block is never closed")
            if language not in RUN_LANGUAGES + SHOWN_LANGUAGES:
                raise DocumentFormatError(
                    f"{document}:{number}: a ```{language} block: label it one of "
                    f"{', '.join(RUN_LANGUAGES)} (run) or json, text or nothing (shown)"
                )
            if directive is not None and language not in RUN_LANGUAGES:
                raise DocumentFormatError(
                    f"{document}:{directive[2]}: a directive before a block that is never run"
                )
            body = [
                text[indent:] if text.startswith(" " * indent) else text.lstrip()
                for text in lines[index + 1 : end]
            ]
            kind, value = directive[:2] if directive else (None, "")
            blocks.append(
                Block(
                    document,
                    number,
                    language,
                    textwrap.dedent("\n".join(body)) + "\n",
                    not_run=value if kind == "not run" else None,
                    needs=tuple(n.strip() for n in value.split(",")) if kind == "needs" else (),
                )
            )
            directive = None
            index = end
        elif line.strip() and directive is not None:
            raise DocumentFormatError(
                f"{document}:{directive[2]}: a directive must come right before its block"
            )
        index += 1
    if directive is not None:
        raise DocumentFormatError(f"{document}:{directive[2]}: a directive without a block")
    if document == "README.md" and blocks and blocks[0].not_run is None:
        reason = "the set-up and test commands of a fresh machine: .ci/run runs them"
        blocks[0] = dataclasses.replace(blocks[0], not_run=reason)
    return blocks


def missing(needs: tuple[str, ...]) -> list[str]:
    """The entries of a `needs` directive that are not available here, each with what it is."""
    absent = []
    for name in needs:
        if name in CAPABILITIES:
            check, meaning = CAPABILITIES[name]
            if not check():
                absent.append(f"{name} ({meaning})")
        elif importlib.util.find_spec(name) is None:
            absent.append(f"{name} (not installed)")
    return absent


def skip_reason(block: Block) -> str | None:
    """Why `block` is not run here, or None when it runs."""
    if block.language not in RUN_LANGUAGES:
        return None
    if block.not_run is not None:
        return f"not run: {block.not_run}"
    if absent := missing(block.needs):
        return f"needs {', '.join(absent)}"
    return None


def _commands_folder(folder: Path) -> dict[str, str]:
    """`cupy-bn` and `python` of this checkout in `folder`; the environment for bash blocks."""
    folder.mkdir(exist_ok=True)
    for name, command in (("cupy-bn", "-m cupy_bn"), ("python", "")):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {command} "$@"\n')
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_document(document: str) -> int:
    """Run `document`'s blocks in the working directory; the exit status for `__main__`."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    env = _commands_folder(Path.cwd() / ".doc-commands")
    if document in IMPORT_FOLDERS:
        sys.path.insert(0, str(REPO / IMPORT_FOLDERS[document]))
    for block in parse_blocks(document):
        if block.language not in RUN_LANGUAGES:
            continue
        if (reason := skip_reason(block)) is not None:
            print(f"{block.where}: skipped, {reason}", flush=True)
            continue
        print(f"{block.where}: {block.language}", flush=True)
        if block.language == "python":
            # Blank lines in front so that tracebacks give the document's line numbers.
            exec(compile("\n" * block.line + block.code, block.document, "exec"), namespace)
        else:
            status = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], env=env)
            if status.returncode != 0:
                print(f"{block.where}: exit status {status.returncode}", flush=True)
                return 1
    return 0


def _runnable(document: str) -> bool:
    return any(b.language in RUN_LANGUAGES for b in parse_blocks(document))


def _not_run_here() -> list[pytest.param]:
    params = []
    for document in DOCUMENTS:
        for block in parse_blocks(document):
            if (reason := skip_reason(block)) is not None:
                params.append(pytest.param(f"{block.where}: {reason}", id=block.where))
    return params


def test_documents_follow_the_block_rules():
    for document in DOCUMENTS:
        for block in parse_blocks(document):
            assert block.code.strip(), f"{block.where}: an empty block"
            for name in block.needs:
                is_module = re.fullmatch(r"[A-Za-z_][\w.]*", name) and "-" not in name
                assert name in CAPABILITIES or is_module, f"{block.where}: needs {name!r}?"


def test_parser_reads_directives_fences_and_indentation(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
        "- item:\n\n  ```python\n  x = 1\n  if x:\n      y = 2\n  ```\n\n"
        "<!-- needs: torch, cuda-simulator -->\n```python\nimport torch\n```\n```json\n{}\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    blocks = parse_blocks("page.md")
    assert [(b.line, b.language, b.not_run, b.needs) for b in blocks] == [
        (4, "bash", "needs a GPU", ()),
        (10, "python", None, ()),
        (17, "python", None, ("torch", "cuda-simulator")),
        (20, "json", None, ()),
    ]
    assert blocks[1].code == "x = 1\nif x:\n    y = 2\n"
    assert skip_reason(blocks[0]) == "not run: needs a GPU"
    assert skip_reason(blocks[3]) is None
    for text, message in [
        ("<!-- not run: x -->\nText\n```bash\nls\n```\n", "right before its block"),
        ("<!-- not run: x -->\n```json\n{}\n```\n", "never run"),
        ("```sh\nls\n```\n", "a ```sh block"),
        ("```python\nx = 1\n", "never closed"),
        ("<!-- needs:  -->\n```python\nx = 1\n```\n", "says nothing"),
        ("text\n<!-- needs: torch -->\n", "without a block"),
    ]:
        page.write_text(text)
        with pytest.raises(DocumentFormatError, match=re.escape(message)):
            parse_blocks("page.md")


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if _runnable(d)])
def test_document_blocks_run(document, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, __file__, document],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    ran = [b for b in parse_blocks(document) if b.language in RUN_LANGUAGES and not skip_reason(b)]
    for block in ran:
        assert f"{block.where}: {block.language}" in result.stdout, f"{block.where} did not run"


@pytest.mark.parametrize("reason", _not_run_here())
def test_block_not_run_here(reason):
    pytest.skip(reason)


# The import rules of docs/architecture.md, checked against the code.

PACKAGE = REPO / "cupy_bn"
ARCHITECTURE = REPO / "docs" / "architecture.md"
#: Packages every module may import at module level; the others load on use.
BASE_PACKAGES = {"numpy"}
CLI_PACKAGES = {"click", "rich"}
#: Each framework integration imports its framework at module level (importing it is using
#: it), with the framework's own serialization library for Thinc.
INTEGRATION_PACKAGES = {
    "cupy_bn.integrations.autograd": {"autograd"},
    "cupy_bn.integrations.mygrad": {"mygrad"},
    "cupy_bn.integrations.thinc": {"thinc", "srsly"},
    "cupy_bn.integrations.torch": {"torch"},
}
FRAMEWORKS = {"autograd", "mygrad", "thinc", "torch"}
#: The numba backend's kernels are numba functions: importing the module is using numba.
KERNEL_PACKAGES = {"cupy_bn.backends.numba_kernels": {"numba"}}


@dataclass(frozen=True)
class Import:
    """One `cupy_bn` or third-party import of a module, and whether it runs on import."""

    target: str  # dotted module name
    line: int
    module_level: bool
    guarded: bool  # inside a try (an optional package)


def part_of(module: str) -> str:
    """The part of the package map a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cupy_bn"


def module_name(path: Path) -> str:
    dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return dotted.removesuffix(".__init__")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path) -> list[Import]:
    """Every import of `path`, with `from cupy_bn import x` read as the submodule `x` if any."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
            return [name if _exists(name) else base for name in names]
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            return [node.args[0].value]
        return []

    def visit(node: ast.AST, module_level: bool, guarded: bool) -> None:
        for target in targets(node):
            found.append(Import(target, node.lineno, module_level, guarded))
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False, guarded)
            elif isinstance(node, ast.If) and _is_type_checking(node) and child in node.body:
                visit(child, False, guarded)
            else:
                visit(child, module_level, guarded or isinstance(node, ast.Try))

    visit(ast.parse(path.read_text(encoding="utf-8")), True, False)
    return found


def _exists(dotted: str) -> bool:
    """Whether `dotted` (under cupy_bn) names a module or package file."""
    if not dotted.startswith("cupy_bn."):
        return False
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_table() -> dict[str, tuple[set[str] | None, set[str]]]:
    """docs/architecture.md's table: part -> (parts importable anywhere, only in functions).

    `None` stands for "everything".
    """
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## What each part may import", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[set[str] | None, set[str]]] = {}
    for row in re.findall(r"^\| `([\w.]+)` \| (.+?) \|$", section, re.MULTILINE):
        part, allowed = row
        anywhere, _, lazily = allowed.partition("inside functions:")
        names = set(re.findall(r"`(\w+)`", anywhere))
        lazy_names = set(re.findall(r"`(\w+)`", lazily))
        table[part] = (None if anywhere.strip() == "everything" else names, lazy_names)
    return table


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_table_names_every_part():
    table = import_table()
    parts = {part_of(module_name(path)) for path in package_modules()}
    assert parts - table.keys() == set(), "parts missing from docs/architecture.md's table"
    assert table.keys() - parts == set(), "docs/architecture.md's table names no such part"
    for part, (anywhere, lazily) in table.items():
        assert (anywhere or set()) | lazily <= parts, f"{part}: may import an unknown part"


def test_every_import_follows_the_table():
    table = import_table()
    broken = []
    for path in package_modules():
        part = part_of(module_name(path))
        assert part in table, f"{path.relative_to(REPO)}: {part!r} is not in the import table"
        anywhere, lazily = table[part]
        for imp in imports_of(path):
            if not imp.target.startswith("cupy_bn"):
                continue
            if imp.target == "cupy_bn" or anywhere is None:
                continue  # `from cupy_bn import __version__`, or the CLI
            target = part_of(imp.target)
            if target == part or target in anywhere:
                continue
            if target in lazily and not imp.module_level:
                continue
            where = " at module level" if target in lazily else ""
            broken.append(f"{path.relative_to(REPO)}:{imp.line}: {part} imports {target}{where}")
    assert not broken, "imports that docs/architecture.md's table does not allow:\n" + "\n".join(
        broken
    )


def test_root_imports_only_version_from_the_package_itself():
    for path in package_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "cupy_bn" and not node.level:
                names = {alias.name for alias in node.names}
                submodules = {n for n in names if _exists(f"cupy_bn.{n}")}
                assert names - submodules <= {"__version__"}, (
                    f"{path.relative_to(REPO)}:{node.lineno}: imports {names - submodules} from "
                    "the package root, which loads the whole library"
                )


def test_optional_packages_load_on_use():
    stdlib = set(sys.stdlib_module_names)
    for path in package_modules():
        module = module_name(path)
        allowed = BASE_PACKAGES | (CLI_PACKAGES if part_of(module) == "cli" else set())
        allowed |= INTEGRATION_PACKAGES.get(module, set()) | KERNEL_PACKAGES.get(module, set())
        for imp in imports_of(path):
            top = imp.target.split(".")[0]
            if top in stdlib or top == "cupy_bn" or top in allowed or imp.guarded:
                continue
            assert not imp.module_level, (
                f"{path.relative_to(REPO)}:{imp.line}: {imp.target} at module level; optional "
                "packages are imported inside functions (docs/architecture.md)"
            )


def test_click_and_rich_only_in_the_cli():
    for path in package_modules():
        if part_of(module_name(path)) == "cli":
            continue
        for imp in imports_of(path):
            assert imp.target.split(".")[0] not in CLI_PACKAGES, f"{path}:{imp.line}"


def test_importing_the_library_loads_neither_simulator_nor_cli():
    code = "import sys, cupy_bn; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        ).stdout.split()
    )
    assert {"cupy_bn.layers", "cupy_bn.functional", "numpy"} <= loaded  # the probe sees them
    unwanted = {"cupy_bn.sim", "cupy_bn.cli", "cupy", "onnx", "mpi4py", "matplotlib"}
    assert not (unwanted | FRAMEWORKS) & loaded


def test_integrations_name_their_frameworks_and_load_none_on_their_own():
    modules = {
        module_name(path)
        for path in (PACKAGE / "integrations").glob("*.py")
        if path.name != "__init__.py"
    }
    assert modules == set(INTEGRATION_PACKAGES)
    code = "import sys, cupy_bn.integrations; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        ).stdout.split()
    )
    assert "cupy_bn.integrations" in loaded
    assert not FRAMEWORKS & loaded
    assert not {m for m in loaded if m.startswith("cupy_bn.integrations.")}


if __name__ == "__main__":
    sys.path[0] = ""  # the working directory, as in an interactive session
    sys.exit(run_document(sys.argv[1]))
