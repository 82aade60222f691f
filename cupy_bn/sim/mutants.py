"""Mutation check: deliberate bugs in the project's kernels that the test suite must catch.

``python -m cupy_bn.sim.mutants`` copies the ``cupy_bn`` package into a temporary folder once
per mutant, applies one textual change to a kernel source (``cupy_bn/kernels/*.cu*``), and
runs the simulator's kernel tests (default ``tests/test_cuda_sim.py``, stopping at the first
failure) against that copy. A mutant is *killed* when the tests fail, *survives* when they
pass. The unmutated copy runs first and must pass. Exit status: 0 when every mutant is
killed, 1 otherwise (2 when the baseline fails or a mutant's text is not found exactly once).

Run it from a checkout (the tests folder is found next to the package). Options:
``--list``, ``--jobs N`` (mutants run in parallel, default 2), ``--tests PATH ...``, and
mutant names to run only those.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # cupy_bn/
REPO = PACKAGE.parent
DEFAULT_TESTS = ("tests/test_cuda_sim.py",)


@dataclass(frozen=True)
class Mutant:
    """`old` (found exactly once in cupy_bn/kernels/`file`) replaced by `new`."""

    name: str
    file: str
    old: str
    new: str
    what: str


MUTANTS = (
    Mutant(
        "drop-m2",
        "bn_common.cuh",
        "r.m2 = a.m2 + b.m2 + delta",
        "r.m2 = a.m2 + delta",
        "a Chan merge drops the second part's M2",
    ),
    Mutant(
        "swap-merge-order",
        "bn_finalize.cuh",
        "if (p + k * stride < end) acc = chan_merge(acc, v[k]);",
        "if (p + k * stride < end) acc = chan_merge(v[k], acc);",
        "the cross-block merge takes the partials in the other order",
    ),
    Mutant(
        "no-block-barrier",
        "bn_common.cuh",
        "    s_m2[warp] = w.m2;\n  }\n  __syncthreads();\n",
        "    s_m2[warp] = w.m2;\n  }\n",
        "warp 0 reads the other warps' triples without a barrier",
    ),
    Mutant(
        "no-release-fence",
        "bn_finalize.cuh",
        "  __threadfence();  // release this thread's partial writes\n",
        "",
        "writers take the ticket without releasing their partials",
    ),
    Mutant(
        "no-acquire-fence",
        "bn_finalize.cuh",
        "  if (last) __threadfence();  // acquire the other blocks' partials\n",
        "",
        "the last block reads the partials without acquiring them",
    ),
    Mutant(
        "tile-end-off-by-one",
        "bn_common.cuh",
        "    if (m + k * row_step < end) {",
        "    if (m + k * row_step <= end) {",
        "the MC gradient loads read one row past the end of a tile",
    ),
    Mutant(
        "partial-end-off-by-one",
        "bn_finalize.cuh",
        "if (p + k * stride < end) v[k] = load_partial(",
        "if (p + k * stride <= end) v[k] = load_partial(",
        "the cross-block merge loads one partial past the last",
    ),
    Mutant(
        "double-backward-uncentred",
        "bn_double_backward.cu",
        "      group[3] += h[k] * xmu;",
        "      group[3] += h[k] * v[k];",
        "the double backward sums ddx * x instead of ddx * (x - mean)",
    ),
    Mutant(
        "double-backward-no-block-barrier",
        "bn_double_backward.cu",
        "    for (int k = 0; k < K; ++k) s_v[k][warp] = v[k];\n  }\n  __syncthreads();\n",
        "    for (int k = 0; k < K; ++k) s_v[k][warp] = v[k];\n  }\n",
        "warp 0 reads the other warps' double-backward sums without a barrier",
    ),
    Mutant(
        "pack-walk-drops-tail",
        "bn_common.cuh",
        "    for (; i < t.count; i += step) {",
        "    for (; i + step < t.count; i += step) {",
        "an NCS pack walk skips the last pack after its whole groups",
    ),
    Mutant(
        "mc-pack-channel",
        "bn_common.cuh",
        "  s.channel = blockIdx.x * blockDim.x + col * size;",
        "  s.channel = blockIdx.x * blockDim.x + col;",
        "an MC pack's channels are counted in packs, not channels",
    ),
    Mutant(
        "relu-pack-tail",
        "bn_fused.cu",
        "    i = packs * P::size + first;",
        "    i = n;",
        "the ReLU's gradient on packs leaves the last n % size elements unwritten",
    ),
)


def _copy_package(dest: Path, mutant: Mutant | None) -> None:
    shutil.copytree(PACKAGE, dest / "cupy_bn", ignore=shutil.ignore_patterns("__pycache__"))
    if mutant is None:
        return
    path = dest / "cupy_bn" / "kernels" / mutant.file
    text = path.read_text()
    path.write_text(text.replace(mutant.old, mutant.new))


def check_texts(mutants: tuple[Mutant, ...]) -> list[str]:
    """Mutants whose `old` text is not found exactly once (the kernels changed)."""
    bad = []
    for m in mutants:
        count = (PACKAGE / "kernels" / m.file).read_text().count(m.old)
        if count != 1:
            bad.append(f"{m.name}: its text occurs {count} times in {m.file}")
    return bad


def run_tests(mutant: Mutant | None, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """(tests passed, seconds, last lines of pytest's output) against a mutated copy.

    pytest runs in the copy's folder (``python -m`` puts it first on sys.path), so the tests
    import the copy; the run checks that they do.
    """
    with tempfile.TemporaryDirectory(prefix="cupy-bn-mutant-") as tmp:
        _copy_package(Path(tmp), mutant)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = subprocess.run(
            [sys.executable, "-c", "import cupy_bn; print(cupy_bn.__file__)"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(Path(tmp).resolve())) and not where.startswith(tmp):
            raise RuntimeError(f"the tests would import {where!r}, not the copy in {tmp}")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(REPO),
            *(str(REPO / t) for t in tests),
        ]
        start = time.perf_counter()
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    lines = (r.stdout + r.stderr).strip().splitlines()
    failed = [ln for ln in lines if ln.startswith("FAILED ")]
    return r.returncode == 0, seconds, "\n".join(failed[:1] or lines[-3:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cupy_bn.sim.mutants", description=__doc__)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS))
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:24} {m.file:16} {m.what}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    chosen = tuple(by_name[n] for n in args.names) if args.names else MUTANTS
    bad = check_texts(chosen)
    if bad:
        print("\n".join(bad))
        return 2
    tests = tuple(args.tests)
    passed, seconds, tail = run_tests(None, tests)
    print(f"baseline                 {'passes' if passed else 'FAILS'} ({seconds:.0f} s)")
    if not passed:
        print(tail)
        return 2
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda m: (m, *run_tests(m, tests)), chosen))
    survivors = 0
    for m, passed, seconds, tail in results:
        verdict = "SURVIVED" if passed else "killed"
        survivors += passed
        print(f"{m.name:24} {verdict:8} ({seconds:.0f} s)  {m.what}")
        print("    " + tail.replace("\n", "\n    "))
    print(f"{len(results) - survivors} of {len(results)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
