"""Where the NumPy backend's blocked, threaded path starts to beat its direct path.

    python benchmarks/crossover.py [--runs 3] [--threads 2]

Times `batch_norm` (training), `batch_norm_backward` and `batch_norm` (inference) at sizes
from 2^13 to 2^20 values, channels-first `(N, 16, 32, 32)`-like and channels-last `(M, 256)`,
float32, once with every tensor on the direct path (`numpy_direct`: whole-array calls on the
calling thread) and once with every tensor on the blocked path (`tiling`: cache-sized blocks on
a thread pool). Each path runs in its own process, `--runs` times; the figure is the median
per-call time in microseconds, best of the runs. `DIRECT_MAX_ELEMENTS` (forward) and
`DIRECT_BACKWARD_MAX_ELEMENTS` in `cupy_bn.backends.numpy_direct` should sit where the
blocked path starts to win.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
from cpu_vs_torch import child_env, median_us  # this folder's script

SIZES = [1 << k for k in range(13, 21)]
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
    from cupy_bn.backends import numpy_direct

    limit = 1 << 40 if path == "direct" else -1
    numpy_direct.DIRECT_MAX_ELEMENTS = numpy_direct.DIRECT_BACKWARD_MAX_ELEMENTS = limit
    shape = shape_for(layout, size)
    axis = 1 if layout == "NCS" else -1
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    c = shape[axis]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    def forward():
        return cbn.batch_norm(x, w, b, rm, rv, training=True, channel_axis=axis)

    _, saved = forward()
    phases = {
        "forward_train": forward,
        "backward": lambda: cbn.batch_norm_backward(dy, saved),
        "eval": lambda: cbn.batch_norm(x, w, b, rm, rv, training=False, channel_axis=axis),
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
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    header = ("layout", 6), ("values", 8), ("phase", 13), ("direct us", 10), ("blocked us", 11)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'faster':>8}")
    for layout in LAYOUTS:
        for size in SIZES:
            direct = measure("direct", layout, size, args.threads, args.runs)
            blocked = measure("blocked", layout, size, args.threads, args.runs)
            for phase in PHASES:
                d, b = direct[phase], blocked[phase]
                faster = "direct" if d <= b else "blocked"
                print(f"{layout:>6} {size:>8} {phase:>13} {d:>10.1f} {b:>11.1f} {faster:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
