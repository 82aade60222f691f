"""NumPy backend against PyTorch's CPU batch norm: forward-train, backward and eval.

    pip install torch==2.13.0        # benchmark-only dependency (the CPU build)
    python benchmarks/cpu_vs_torch.py [--repeat 30] [--runs 3] [--threads 2]

Each (implementation, shape) runs in its own process with the same thread count, `--runs`
times; a phase's time is the median of `--repeat` calls in milliseconds, the best of the runs
(a shared machine's neighbours slow whole processes down, both implementations alike). The
bars are forward-train <= 1.5x PyTorch, backward <= 2.0x, eval <= 2.5x. The backward is timed
alone: `bn.backward(dy)`, and for PyTorch `autograd.grad` of one retained forward graph.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SHAPES = [(32, 64, 56, 56), (256, 64, 14, 14), (64, 256, 28, 28), (4096, 1024)]
BARS = {"forward_train": 1.5, "backward": 2.0, "eval": 2.5}


def median_ms(fn, repeat: int) -> float:
    from cupy_bn.bench import time_cpu

    return 1e3 * float(np.median(time_cpu(fn, repeat, warmup=2)))


def run_ours(shape, repeat):
    import cupy_bn as cbn

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    dy = rng.standard_normal(shape, np.float32)
    bn = (cbn.BatchNorm1d if len(shape) == 2 else cbn.BatchNorm2d)(shape[1], backend="numpy")
    fwd = median_ms(lambda: bn(x), repeat)
    bwd = median_ms(lambda: bn.backward(dy), repeat)
    bn.eval()
    ev = median_ms(lambda: bn(x), repeat)
    return {"forward_train": fwd, "backward": bwd, "eval": ev}


def run_torch(shape, repeat, threads):
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    dy = torch.randn(shape, generator=gen)
    bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1])
    fwd = median_ms(lambda: bn(x), repeat)
    y = bn(x)
    inputs = (x, bn.weight, bn.bias)
    bwd = median_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), repeat)
    bn.eval()
    with torch.no_grad():
        ev = median_ms(lambda: bn(x), repeat)
    return {"forward_train": fwd, "backward": bwd, "eval": ev}


def child(impl, shape, repeat, threads):
    result = run_ours(shape, repeat) if impl == "cupy_bn" else run_torch(shape, repeat, threads)
    print(json.dumps(result))


def best_of(runs: int, impl, shape, repeat, threads) -> dict:
    """Per phase, the best median over `runs` fresh processes."""
    results = [measure(impl, shape, repeat, threads) for _ in range(runs)]
    return {phase: min(r[phase] for r in results) for phase in results[0]}


def measure(impl, shape, repeat, threads) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    )
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            impl,
            ",".join(map(str, shape)),
            str(repeat),
            str(threads),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, shape, repeat, threads = args.child
        child(impl, tuple(int(s) for s in shape.split(",")), int(repeat), int(threads))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is not installed: pip install torch==2.13.0 (CPU build)", file=sys.stderr)
        return 2
    print(
        f"{'shape':>18} {'phase':>13} {'cupy_bn ms':>11} {'torch ms':>9} {'ratio':>6} "
        f"{'bar':>5}  ok"
    )
    failures = 0
    for shape in SHAPES:
        ours = best_of(args.runs, "cupy_bn", shape, args.repeat, args.threads)
        theirs = best_of(args.runs, "torch", shape, args.repeat, args.threads)
        for phase, bar in BARS.items():
            ratio = ours[phase] / theirs[phase] if theirs[phase] > 0 else float("inf")
            ok = ratio <= bar
            failures += not ok
            print(
                f"{str(shape):>18} {phase:>13} {ours[phase]:11.2f} {theirs[phase]:9.2f} "
                f"{ratio:6.2f} {bar:5.1f}  {'yes' if ok else 'NO'}"
            )
    print(f"{failures} of {len(SHAPES) * len(BARS)} rows over their bar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
