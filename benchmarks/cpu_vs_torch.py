"""cupy_bn's CPU backends against PyTorch's CPU kernels and two plain-NumPy baselines, per phase.

    pip install torch==2.13.0 numba  # benchmark-only torch (the CPU build); numba: cupy-bn[cpu]
    python benchmarks/cpu_vs_torch.py [--shapes all|small|large] [--runs 3] [--threads 2]

Every implementation is timed at its own kernel level, float32, channels on axis 1:

- `numba` and `cupy_bn` (the NumPy backend): `batch_norm(training=True)` with running
  statistics, `batch_norm_backward(dy, saved)` of that forward, `batch_norm(training=False)`,
  with `backend="numba"` or `backend="numpy"` (the numba column is left out without numba);
- `torch`: `torch.native_batch_norm(training=True)`, `aten.native_batch_norm_backward` with
  the forward's saved mean and invstd, `F.batch_norm(training=False)` under `no_grad` (no
  autograd engine, whose overhead is not batch norm's);
- `numpy`: the textbook formulas on whole arrays (`x.mean`, `x.var`, `(x - mean) / sqrt(var +
  eps) * w + b`; `dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`);
- `einsum`: the same formulas with every per-channel sum an `np.einsum` (two-pass statistics,
  the sums of `dy` and `dy * (x - mean)` in the backward): the plain formulation that the NumPy
  backend's blocks and threads have to beat to earn their place.

Each (implementation, shape) runs in its own process with the same thread count, `--runs`
times; a phase's figure is the median per-call time in microseconds, the best of the runs (a
shared machine's neighbours slow whole processes, every implementation alike). The ratio is
to PyTorch; the bars are issue 13's: small shapes within 2.5x of PyTorch on every phase, large
shapes forward-train <= 1.5x, backward <= 2.0x, eval <= 2.5x. They apply to the backend that
`backend="auto"` picks: numba where it is installed, else the NumPy backend; the last column
is that backend's time over the textbook formula's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SMALL = [(64, 100), (128, 256), (32, 16, 8, 8)]
LARGE = [(32, 64, 56, 56), (256, 64, 14, 14), (64, 256, 28, 28), (4096, 1024)]
PHASES = ("forward_train", "backward", "eval")
LARGE_BARS = {"forward_train": 1.5, "backward": 2.0, "eval": 2.5}
SMALL_BAR = 2.5
IMPLEMENTATIONS = ("numba", "cupy_bn", "torch", "numpy", "einsum")
EPS = 1e-5


def median_us(fn, numel: int) -> float:
    """Median per-call time: enough calls for about 0.3 s, 20 to 3000 of them."""
    repeat = max(20, min(3000, int(3e7 / max(numel, 1))))
    for _ in range(min(repeat, 20)):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def _inputs(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    dy = rng.standard_normal(shape, np.float32)
    c = shape[1]
    w, b = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c, np.float32)
    return x, dy, w, b


def _run_backend(shape, backend):
    import cupy_bn as cbn

    x, dy, w, b = _inputs(shape)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    _, saved = cbn.batch_norm(x, w, b, rm, rv, training=True, backend=backend)
    return {
        "forward_train": lambda: cbn.batch_norm(x, w, b, rm, rv, training=True, backend=backend),
        "backward": lambda: cbn.batch_norm_backward(dy, saved),
        "eval": lambda: cbn.batch_norm(x, w, b, rm, rv, training=False, backend=backend),
    }


def run_cupy_bn(shape):
    return _run_backend(shape, "numpy")


def run_numba(shape):
    return _run_backend(shape, "numba")


def run_torch(shape):
    import torch
    import torch.nn.functional as F

    x, dy, w, b = (torch.from_numpy(a) for a in _inputs(shape))
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    _, mean, invstd = torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, EPS)
    mask = [True, True, True]

    def backward():
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, mean, invstd, True, EPS, mask
        )

    def evaluate():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)

    return {
        "forward_train": lambda: torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, EPS),
        "backward": backward,
        "eval": evaluate,
    }


def _per_channel(shape):
    """The reduced axes and the broadcast shape of a per-channel vector (channels on axis 1)."""
    axes = (0, *range(2, len(shape)))
    return axes, (1, shape[1], *(1,) * (len(shape) - 2))


def run_numpy(shape):
    x, dy, w, b = _inputs(shape)
    axes, vec = _per_channel(shape)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    wv, bv = w.reshape(vec), b.reshape(vec)

    def forward():
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        return (x - mean) / np.sqrt(var + EPS) * wv + bv

    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)

    def backward():
        xhat = (x - mean) * invstd
        dbias = dy.sum(axis=axes)
        dweight = (dy * xhat).sum(axis=axes)
        count = x.size / shape[1]
        dx = wv * invstd * (dy - dbias.reshape(vec) / count - xhat * dweight.reshape(vec) / count)
        return dx, dweight, dbias

    def evaluate():
        return (x - rm.reshape(vec)) / np.sqrt(rv.reshape(vec) + EPS) * wv + bv

    return {"forward_train": forward, "backward": backward, "eval": evaluate}


def run_einsum(shape):
    x, dy, w, b = _inputs(shape)
    n, c = shape[0], shape[1]
    x3, dy3 = x.reshape(n, c, -1), dy.reshape(n, c, -1)
    count = x3.shape[0] * x3.shape[2]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    def affine(a, scale, shift):
        return (a * scale[None, :, None] + shift[None, :, None]).reshape(shape)

    def forward():
        mean = np.einsum("ncs->c", x3) / count
        centred = x3 - mean[None, :, None]
        var = np.einsum("ncs,ncs->c", centred, centred) / count
        scale = w / np.sqrt(var + EPS)
        return affine(centred, scale, b)

    mean = np.einsum("ncs->c", x3) / count
    centred = x3 - mean[None, :, None]
    invstd = 1 / np.sqrt(np.einsum("ncs,ncs->c", centred, centred) / count + EPS)

    def backward():
        sum_dy = np.einsum("ncs->c", dy3)
        sum_dy_xmu = np.einsum("ncs,ncs->c", dy3, x3 - mean[None, :, None])
        k = w * invstd
        q = k * invstd * invstd * sum_dy_xmu / count
        dx = dy3 * k[None, :, None] - (x3 - mean[None, :, None]) * q[None, :, None]
        dx -= (k * sum_dy / count)[None, :, None]
        return dx.reshape(shape), sum_dy_xmu * invstd, sum_dy

    def evaluate():
        scale = w / np.sqrt(rv + EPS)
        return affine(x3, scale, b - rm * scale)

    return {"forward_train": forward, "backward": backward, "eval": evaluate}


RUNNERS = {
    "numba": run_numba,
    "cupy_bn": run_cupy_bn,
    "torch": run_torch,
    "numpy": run_numpy,
    "einsum": run_einsum,
}


def child(impl: str, shape: tuple[int, ...], threads: int) -> None:
    if impl == "torch":
        import torch

        torch.set_num_threads(threads)
    phases = RUNNERS[impl](shape)
    numel = int(np.prod(shape))
    print(json.dumps({phase: median_us(phases[phase], numel) for phase in PHASES}))


def child_env(threads: int) -> dict:
    """The environment of a timed child process: its thread counts, and this checkout first on
    the import path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )


def measure(impl: str, shape, threads: int) -> dict:
    env = child_env(threads)
    command = [sys.executable, __file__, "--child", impl, ",".join(map(str, shape)), str(threads)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(runs: int, impl: str, shape, threads: int) -> dict:
    """Per phase, the best median over `runs` fresh processes."""
    results = [measure(impl, shape, threads) for _ in range(runs)]
    return {phase: min(r[phase] for r in results) for phase in PHASES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("all", "small", "large"), default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, shape, threads = args.child
        child(impl, tuple(int(s) for s in shape.split(",")), int(threads))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is not installed: pip install torch==2.13.0 (CPU build)", file=sys.stderr)
        return 2
    from cupy_bn.backends import cpu_backend_name

    auto = cpu_backend_name()
    auto_column = "numba" if auto == "numba" else "cupy_bn"
    implementations = [i for i in IMPLEMENTATIONS if i != "numba" or auto == "numba"]
    shapes = {"small": SMALL, "large": LARGE, "all": SMALL + LARGE}[args.shapes]
    header = "".join(f"{name + ' us':>12}" for name in implementations)
    print(f"backend='auto' is {auto!r}: the ratio, bar and textbook columns are {auto_column}'s")
    print(f"{'shape':>18} {'phase':>13}{header} {'ratio':>6} {'bar':>5}  ok  vs numpy")
    failures = rows = 0
    for shape in shapes:
        times = {impl: best_of(args.runs, impl, shape, args.threads) for impl in implementations}
        for phase in PHASES:
            bar = SMALL_BAR if shape in SMALL else LARGE_BARS[phase]
            ratio = times[auto_column][phase] / times["torch"][phase]
            textbook = times[auto_column][phase] / times["numpy"][phase]
            ok = ratio <= bar
            failures += not ok
            rows += 1
            cells = "".join(f"{times[impl][phase]:12.1f}" for impl in implementations)
            print(
                f"{str(shape):>18} {phase:>13}{cells} {ratio:6.2f} {bar:5.1f}  "
                f"{'yes' if ok else 'NO ':3} {textbook:6.2f}x"
            )
    print(f"{failures} of {rows} rows over their bar (ratio = {auto_column} / torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
