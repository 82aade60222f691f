"""Where a CPU backend's threaded path starts to beat its single-threaded one.

    python benchmarks/crossover.py [--backend numpy|numba] [--runs 3] [--threads 2]

Times `batch_norm` (training), `batch_norm_backward` and `batch_norm` (inference) at sizes
from 2^13 to 2^22 values, channels-first `(N, 16, 64)` and channels-last `(M, 256)`, float32,
once with every tensor on each of the backend's two paths:

- `numpy`: the direct path (`numpy_direct`: whole-array calls on the calling thread) and the
  blocked path (`tiling`: blocks on a thread pool). `DIRECT_MAX_ELEMENTS` (forward) and
  `DIRECT_BACKWARD_MAX_ELEMENTS` in `cupy_bn.backends.numpy_direct` should sit where the
  blocked path starts to win.
- `numba`: one kernel call on the calling thread, and one range per core on the thread pool.
  `PARALLEL_MIN_ELEMENTS` in `cupy_bn.backends.numba_backend` should sit where the second
  starts to win.

Each path runs in its own process, `--runs` times; the figure is the median per-call time in
microseconds, best of the runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
from cpu_vs_torch import child_env, median_us  # this folder's script

SIZES = [1 << k for k in range(13, 23)]
#: Each backend's two paths: (name, what forces every tensor onto it).
PATHS = {"numpy": ("direct", "blocked"), "numba": ("single", "threaded")}
PHASES = ("forward_train", "backward", "eval")
LAYOUTS = {"NCS": (16, 64), "MC": (256,)}  # channels and spatial size; MC: channels only


def shape_for(layout: str, size: int) -> tuple[int, ...]:
    if layout == "NCS":
        channels, spatial = LAYOUTS["NCS"]
        return (max(2, size // (channels * spatial)), channels, spatial)
    (channels,) = LAYOUTS["MC"]
    return (max(2, size // channels), channels)


def child(path: str, layout: str, size: int) -> None:
    import cupy_bn as cbn
    from cupy_bn.backends import numba_backend, numpy_direct

    if path in PATHS["numpy"]:
        backend = "numpy"
        limit = 1 << 40 if path == "direct" else -1
        numpy_direct.DIRECT_MAX_ELEMENTS = numpy_direct.DIRECT_BACKWARD_MAX_ELEMENTS = limit
    else:
        backend = "numba"
        numba_backend.PARALLEL_MIN_ELEMENTS = 1 << 62 if path == "single" else 1
    shape = shape_for(layout, size)
    axis = 1 if layout == "NCS" else -1
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    c = shape[axis]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    def forward():
        return cbn.batch_norm(x, w, b, rm, rv, True, channel_axis=axis, backend=backend)

    _, saved = forward()
    phases = {
        "forward_train": forward,
        "backward": lambda: cbn.batch_norm_backward(dy, saved),
        "eval": lambda: cbn.batch_norm(x, w, b, rm, rv, False, channel_axis=axis, backend=backend),
    }
    print(json.dumps({p: median_us(phases[p], x.size) for p in PHASES}))


def measure(path: str, layout: str, size: int, threads: int, runs: int) -> dict:
    env = child_env(threads)
    command = [sys.executable, __file__, "--child", path, layout, str(size)]
    results = []
    for _ in range(runs):
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {p: min(r[p] for r in results) for p in PHASES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=tuple(PATHS), default="numpy")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    first, second = PATHS[args.backend]
    header = ("layout", 6), ("values", 8), ("phase", 13), (f"{first} us", 12), (f"{second} us", 12)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'faster':>9}")
    for layout in LAYOUTS:
        for size in SIZES:
            one = measure(first, layout, size, args.threads, args.runs)
            two = measure(second, layout, size, args.threads, args.runs)
            for phase in PHASES:
                a, b = one[phase], two[phase]
                faster = first if a <= b else second
                print(f"{layout:>6} {size:>8} {phase:>13} {a:>12.1f} {b:>12.1f} {faster:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
