"""What every example shares: command-line options, device choice, the training loop, output files.

    parser = example_parser(__doc__)            # --quick --device --out --data --seed
    args = parser.parse_args(); xp = select_device(parser, args.device)
    loss = train_epoch(model, optimizer, x, y, batch_size, rng, on_batch=...)
    accuracy = evaluate(model, x, y)

Arrays passed to `train_epoch`/`evaluate` live on the device already (`xp.asarray` once per
split): on the GPU nothing but scalars crosses the bus while training.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from nn import Sequential, array_module, softmax_cross_entropy, to_numpy
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Array = Any


class Diverged(RuntimeError):
    """Training produced a non-finite loss or batch statistics (learning rate too high)."""


def example_parser(description: str | None, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run (under a minute on a CPU): fewer examples and epochs",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: NumPy; gpu: CuPy (needs a usable CUDA device)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(default_out),
        help="folder for the PNGs, tables and results.json (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        choices=("auto", "fashion-mnist", "digits"),
        default="auto",
        help="auto: Fashion-MNIST when installed, else scikit-learn's digits",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch order")
    return parser


def select_device(parser: argparse.ArgumentParser, device: str):
    """The array module for `device`; a usage error when the GPU cannot be used."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError:
        parser.error("--device gpu needs CuPy: pip install -e '.[cuda13]' (or '.[cuda12]')")
    if not cupy.is_available():
        parser.error(
            "--device gpu: CuPy is installed but finds no usable CUDA device "
            "(cupy.is_available() is False); use --device cpu"
        )
    return cupy


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def batch_indices(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled epoch as index arrays; the last, smaller batch is dropped (BN needs > 1)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train_epoch(
    model: Sequential,
    optimizer,
    x: Array,
    y: Array,
    batch_size: int,
    rng: np.random.Generator,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """One epoch of minibatch SGD; returns the mean training loss. Raises `Diverged`."""
    xp = array_module(x)
    model.train()
    losses = []
    with np.errstate(over="ignore", invalid="ignore"):
        for step, idx in enumerate(batch_indices(len(y), batch_size, rng)):
            idx = xp.asarray(idx)
            try:
                logits = model(x[idx])
            except FloatingPointError as e:  # cupy_bn refuses non-finite batch statistics
                raise Diverged(str(e)) from None
            loss, dlogits = softmax_cross_entropy(logits, y[idx])
            if not np.isfinite(loss):
                raise Diverged(f"loss is {loss} at step {step}")
            model.backward(dlogits)
            optimizer.step()
            losses.append(loss)
            if on_batch is not None:
                on_batch(step)
    return float(np.mean(losses))


def predict(model: Sequential, x: Array, batch_size: int = 1000) -> np.ndarray:
    """Logits of `x` in eval mode (running statistics), as a NumPy array."""
    was_training = model.training
    model.eval()
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.concatenate(
                [to_numpy(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
            )
    finally:
        model.train(was_training)


def evaluate(model: Sequential, x: Array, y: Array, batch_size: int = 1000) -> float:
    """Classification accuracy in eval mode; a model with non-finite outputs scores 0."""
    logits = predict(model, x, batch_size)
    finite = np.isfinite(logits).all(axis=1)
    return float(np.mean((logits.argmax(axis=1) == to_numpy(y)) & finite))


def time_calls(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, dict[str, float]]:
    """Median and minimum wall time in seconds of each `fn()` over `repeat` rounds.

    One warm-up call each, then the functions take turns within every round, so load from
    other processes on the machine falls on all of them alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": float(np.median(t)), "min_s": float(np.min(t))}
        for name, t in times.items()
    }


# ------------------------------------------------------------------------------------------
# Output files (written atomically: a temporary file in the target folder, then a rename)


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_json(path: Path, payload: Any) -> Path:
    return write_atomic(path, lambda f: json.dump(payload, f, indent=2, allow_nan=False))


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text))


def save_figure(fig, path: Path) -> Path:
    return write_atomic(
        path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), mode="wb"
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot with a file-only backend, or a clear exit when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "The examples draw with matplotlib: pip install -e '.[plot]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
