"""Run by every rank under `mpirun -n N python -m mpi4py tests/mpi/worker_sync_bn.py`.

The same checks as the in-process fake group (`tests/sync_scenarios.py`), over MPI_COMM_WORLD
and over a sub-communicator from `Split`. Prints one `ok` line per rank; any failed check
raises, and `python -m mpi4py` turns an uncaught exception into MPI_Abort of the whole job.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import sync_scenarios  # noqa: E402
from fake_comm import Counting  # noqa: E402
from mpi4py import MPI  # noqa: E402

from cupy_bn.communicators import MPICommunicator, as_communicator  # noqa: E402

world = MPI.COMM_WORLD
comm = as_communicator(world)
assert isinstance(comm, MPICommunicator) and (comm.rank, comm.size) == (world.rank, world.size)
checks = sync_scenarios.run_all(Counting(comm))

# a sub-communicator: even and odd ranks normalize over their own group only
half = as_communicator(world.Split(color=world.rank % 2, key=world.rank))
checks += sync_scenarios.check_functional(
    Counting(half), sync_scenarios.batch_sizes(half.size, empty=False)
)
print(f"ok rank {world.rank} of {world.size}: {checks} checks", flush=True)
