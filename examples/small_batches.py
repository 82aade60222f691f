"""Experiment 6: batch norm with small batches, and its two remedies.

With a few samples per batch, batch norm's batch statistics are noisy: the network trains on
activations normalized one way (the batch's statistics) and predicts with activations
normalized another (the running statistics). Two remedies are compared on the same MLP
(784-256-256-10 on Fashion-MNIST; a cupy_bn.BatchNorm1d before each ReLU), for each small
batch size `b` (default 4 and 8):

- `batch norm`: plain batch norm, batches of `b`.
- `renorm`: batch renormalization (`BatchNorm1d(C, renorm=True)`), batches of `b`, with the
  paper's schedule scaled to the run: `rmax=1, dmax=0` (batch norm) for the first 10% of the
  steps, then a linear ramp to `rmax=3, dmax=5` by half of the steps, constant afterwards; the
  schedule sets the layers' `rmax` and `dmax` attributes before every step.
- `ghost`: ghost batches (`BatchNorm1d(C, virtual_batch=b)`), batches of `8 b` split into 8
  virtual batches of `b`. Each normalization sees `b` samples, as in the first two variants,
  and the groups are the same: a ghost batch is 8 consecutive small batches of the same
  shuffled order, so the ghost run normalizes exactly the sample groups the small-batch runs
  do. What differs is the gradient: one step per `8 b` samples instead of 8 steps.
- `batch norm, batch 8b`: plain batch norm on the ghost run's batches (the statistics of
  `8 b` samples), for reference: what the small statistics cost.

Every variant starts from the same initial weights (the seed), sees the same shuffled order
of the same training images for the same number of epochs, and uses SGD with momentum 0.9.
The learning rate is proportional to the batch size (`--lr` per 4 samples: 8 times as high
for the batches of `8 b`), so every sample moves the weights by the same amount per epoch
(the linear scaling rule; Goyal et al. 2017).

Reported for each variant, on a fixed subset of the training images: accuracy in training mode
(each batch normalized with its own statistics, batches of the variant's size, in order;
renorm's correction with its final `rmax` and `dmax`; the running statistics are left as they
were) and in inference mode (the running statistics), and the gap between the two; test
accuracy in inference mode; seconds of training.

Writes to --out: accuracy.png, results.md and results.json.

    python examples/small_batches.py            # 8 minutes on 2 CPU cores busy with other work
    python examples/small_batches.py --quick    # under a minute
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from data import load
from nn import SGD, Dense, Flatten, ReLU, Sequential, to_numpy
from rich.console import Console
from rich.table import Table
from training import (
    Diverged,
    evaluate,
    example_parser,
    markdown_table,
    progress_bar,
    pyplot,
    save_figure,
    select_device,
    train_epoch,
    write_json,
    write_text,
)

import cupy_bn as cbn

GHOST_FACTOR = 8
"""Small batches per ghost batch."""

WARMUP, RAMP_END = 0.1, 0.5
"""Renorm's schedule as fractions of the run's steps: batch norm until WARMUP, then a linear
ramp of rmax (1 -> 3) and dmax (0 -> 5) until RAMP_END."""
RMAX, DMAX = 3.0, 5.0


def build_network(
    in_features: int, classes: int, width: int, seed: int, **bn_options
) -> Sequential:
    """(Dense -> BatchNorm1d -> ReLU) x 2 -> Dense; the same weights for a seed."""
    rng = np.random.default_rng(seed)
    return Sequential(
        Flatten(),
        Dense(in_features, width, rng, bias=False),
        cbn.BatchNorm1d(width, **bn_options),
        ReLU(),
        Dense(width, width, rng, bias=False),
        cbn.BatchNorm1d(width, **bn_options),
        ReLU(),
        Dense(width, classes, rng, init="lecun"),
    )


def batch_norms(model: Sequential) -> list[cbn.BatchNorm1d]:
    return [layer for _, layer in model.named_layers() if isinstance(layer, cbn.BatchNorm1d)]


def renorm_bounds(step: int, total: int) -> tuple[float, float]:
    """(rmax, dmax) for `step` of `total`: 1 and 0 until WARMUP, a linear ramp to RAMP_END."""
    t = (step / total - WARMUP) / (RAMP_END - WARMUP)
    t = min(max(t, 0.0), 1.0)
    return 1.0 + (RMAX - 1.0) * t, DMAX * t


@dataclass
class Variant:
    name: str
    small_batch: int  # samples per normalization
    batch_size: int  # samples per step
    bn_options: dict


def variants(small_batches: list[int]) -> list[Variant]:
    out = []
    for b in small_batches:
        big = GHOST_FACTOR * b
        out += [
            Variant(f"batch norm, batch {b}", b, b, {}),
            Variant(f"renorm, batch {b}", b, b, {"renorm": True, "rmax": 1.0, "dmax": 0.0}),
            Variant(f"ghost, batch {big} in {b}s", b, big, {"virtual_batch": b}),
            Variant(f"batch norm, batch {big}", big, big, {}),
        ]
    return out


def training_mode_accuracy(model: Sequential, x, y, batch_size: int) -> float:
    """Accuracy with batch statistics: `x` in consecutive batches of `batch_size` (the
    incomplete last one left out), each normalized as in training. The running statistics
    stay as they were (momentum 0 for the pass, the state restored afterwards)."""
    state = model.state_dict()
    bns = batch_norms(model)
    momenta = [bn.momentum for bn in bns]
    model.train()
    right = total = 0
    try:
        for bn in bns:
            bn.momentum = 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(0, len(y) - batch_size + 1, batch_size):
                logits = to_numpy(model(x[i : i + batch_size]))
                right += int((logits.argmax(axis=1) == to_numpy(y[i : i + batch_size])).sum())
                total += batch_size
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.load_state_dict(state)
    return right / total


def train_variant(
    variant: Variant,
    data: dict,
    width: int,
    epochs: int,
    lr: float,
    seed: int,
    progress,
) -> dict:
    """Train one variant; its accuracies in both modes, test accuracy and seconds."""
    xp = data["xp"]
    model = build_network(
        data["in_features"], data["classes"], width, seed, **variant.bn_options
    ).to(xp)
    bns = batch_norms(model)
    step_lr = lr * variant.batch_size / 4
    optimizer = SGD(model.parameters(), lr=step_lr, momentum=0.9)
    batch_rng = np.random.default_rng(seed + 1)  # the same order for every variant
    n = len(data["y_train"])
    steps = n // variant.batch_size
    total = epochs * steps
    renorm = bool(variant.bn_options.get("renorm"))
    task = progress.add_task(f"{variant.name:<24}", total=total)
    losses, diverged, done = [], None, 0

    def set_bounds(step: int) -> None:
        rmax, dmax = renorm_bounds(step, total)
        for bn in bns:
            bn.rmax, bn.dmax = rmax, dmax

    start = time.perf_counter()
    for epoch in range(epochs):

        def on_batch(step: int, epoch: int = epoch) -> None:
            nonlocal done
            done = epoch * steps + step + 1
            progress.advance(task)
            if renorm:
                set_bounds(done)

        if renorm:
            set_bounds(done)
        try:
            losses.append(
                train_epoch(
                    model,
                    optimizer,
                    data["x_train"],
                    data["y_train"],
                    variant.batch_size,
                    batch_rng,
                    on_batch,
                )
            )
        except Diverged as e:
            diverged = f"epoch {epoch + 1}: {e}"
            progress.update(task, description=f"{variant.name:<24} diverged", completed=total)
            break
    seconds = time.perf_counter() - start
    result = {
        "samples_per_normalization": variant.small_batch,
        "batch_size": variant.batch_size,
        "lr": step_lr,
        "steps": done,
        "train_loss": losses,
        "diverged": diverged,
        "seconds": seconds,
        "train_accuracy_training_mode": None,
        "train_accuracy_inference_mode": None,
        "gap": None,
        "test_accuracy": None,
    }
    if renorm:
        result["final_rmax"], result["final_dmax"] = bns[0].rmax, bns[0].dmax
    if diverged is None:
        x_probe, y_probe = data["x_probe"], data["y_probe"]
        train_mode = training_mode_accuracy(model, x_probe, y_probe, variant.batch_size)
        inference_mode = evaluate(model, x_probe, y_probe)
        result.update(
            train_accuracy_training_mode=train_mode,
            train_accuracy_inference_mode=inference_mode,
            gap=train_mode - inference_mode,
            test_accuracy=evaluate(model, data["x_test"], data["y_test"]),
        )
    progress.update(
        task,
        description=f"{variant.name:<24} "
        + ("diverged" if diverged else f"test {result['test_accuracy']:.3f}"),
    )
    return result


def pct(acc: float | None) -> str:
    return "diverged" if acc is None else f"{100 * acc:.1f}%"


def points(gap: float | None) -> str:
    return "-" if gap is None else f"{100 * gap:+.1f}"


def plot_accuracy(runs: dict, dataset_name: str, path) -> None:
    """Bars of each run's training-mode, inference-mode and test accuracy, saved at `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = list(runs)
    bars = (
        ("train_accuracy_training_mode", "train, training mode", "tab:orange"),
        ("train_accuracy_inference_mode", "train, inference mode", "tab:blue"),
        ("test_accuracy", "test, inference mode", "tab:green"),
    )
    width = 0.8 / len(bars)
    for k, (key, label, color) in enumerate(bars):
        ax.bar(
            np.arange(len(names)) + (k - 1) * width,
            [runs[n][key] or 0.0 for n in names],
            width,
            label=label,
            color=color,
        )
    low = min([r[key] for r in runs.values() for key, _, _ in bars if r[key] is not None] or [0])
    ax.set_xticks(np.arange(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set(
        ylabel="accuracy",
        ylim=(max(0.0, low - 0.1), 1.0),
        title=f"Small batches on {dataset_name}: training vs inference normalization",
    )
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__, "out/small_batches")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="the small batch sizes (default 4 8; --quick: 4)",
    )
    parser.add_argument("--epochs", type=int, help="training epochs of every variant")
    parser.add_argument(
        "--lr", type=float, default=0.001, help="SGD's learning rate per 4 samples of a batch"
    )
    parser.add_argument("--width", type=int, default=256, help="units per hidden layer")
    args = parser.parse_args(argv)
    small_batches = args.batch_sizes or ([4] if args.quick else [4, 8])
    if min(small_batches) < 2 or args.width < 1 or args.lr <= 0:
        parser.error("--batch-sizes must be >= 2, --width >= 1 and --lr > 0")
    xp = select_device(parser, args.device)
    console = Console()

    dataset = load(args.data, seed=args.seed)
    small_data = len(dataset.y_train) < 10000
    if small_data:
        epochs, probe = (5 if args.quick else 15), 10**9
    else:
        epochs, probe = 1, (2000 if args.quick else 10000)
        dataset = dataset.subset(5000 if args.quick else 25000, 0, 2000 if args.quick else 10000)
    epochs = args.epochs or epochs
    console.print(
        f"{dataset.describe()}; device {args.device}; MLP with 2 hidden layers of "
        f"{args.width}; SGD momentum 0.9, learning rate {args.lr:g} per 4 samples; "
        f"{epochs} epoch(s)"
    )
    data = {
        "xp": xp,
        "in_features": int(np.prod(dataset.image_shape)),
        "classes": dataset.num_classes,
        "x_train": xp.asarray(dataset.x_train),
        "y_train": xp.asarray(dataset.y_train),
        "x_probe": xp.asarray(dataset.x_train[:probe]),
        "y_probe": xp.asarray(dataset.y_train[:probe]),
        "x_test": xp.asarray(dataset.x_test),
        "y_test": xp.asarray(dataset.y_test),
    }
    runs: dict[str, dict] = {}
    with progress_bar() as progress:
        for variant in variants(small_batches):
            runs[variant.name] = train_variant(
                variant, data, args.width, epochs, args.lr, args.seed, progress
            )

    chance = 1 / dataset.num_classes
    headers = [
        "variant",
        "samples per normalization",
        "train acc., training mode",
        "train acc., inference mode",
        "gap (points)",
        "test acc.",
        "seconds",
    ]
    rows = [
        [
            name,
            r["samples_per_normalization"],
            pct(r["train_accuracy_training_mode"]),
            pct(r["train_accuracy_inference_mode"]),
            points(r["gap"]),
            pct(r["test_accuracy"]),
            f"{r['seconds']:.1f}",
        ]
        for name, r in runs.items()
    ]
    probe_size = len(dataset.y_train[:probe])
    intro = (
        "# Experiment 6: batch norm with small batches, renorm and ghost batches\n\n"
        f"{dataset.describe()}. MLP {data['in_features']}-{args.width}-{args.width}-"
        f"{dataset.num_classes} with a BatchNorm1d before each ReLU; SGD with momentum 0.9, "
        f"learning rate {args.lr:g} per 4 samples of a batch (proportional to the batch "
        f"size), {epochs} epoch(s), the same initial weights and sample order (seed "
        f"{args.seed}), device {args.device}. Renorm: rmax=1, dmax=0 for the first "
        f"{100 * WARMUP:.0f}% of the steps, then a linear ramp to rmax={RMAX:g}, dmax={DMAX:g} "
        f"by {100 * RAMP_END:.0f}%. Ghost: batches of {GHOST_FACTOR} small batches, each "
        "normalized on its own. Training accuracy on the first "
        f"{probe_size} training images, in training mode (batch statistics, batches as in "
        "training) and in inference mode (running statistics); gap = training mode minus "
        f"inference mode; test accuracy in inference mode; seconds of training. Chance is "
        f"{100 * chance:.0f}%.\n\n"
    )

    report = intro + markdown_table(headers, rows)
    out = args.out
    plot_accuracy(runs, dataset.name, out / "accuracy.png")
    write_text(out / "results.md", report)
    write_json(
        out / "results.json",
        {
            "experiment": "small_batches",
            "dataset": dataset.name,
            "device": args.device,
            "quick": args.quick,
            "chance": chance,
            "width": args.width,
            "epochs": epochs,
            "lr_per_4_samples": args.lr,
            "small_batch_sizes": small_batches,
            "ghost_factor": GHOST_FACTOR,
            "renorm_schedule": {
                "warmup_fraction": WARMUP,
                "ramp_end_fraction": RAMP_END,
                "rmax": RMAX,
                "dmax": DMAX,
            },
            "train_images": len(dataset.y_train),
            "probe_images": probe_size,
            "test_images": len(dataset.y_test),
            "runs": runs,
        },
    )
    table = Table(title="Small batches: accuracy in training and inference mode")
    for h in headers:
        table.add_column(h, justify="left" if h == "variant" else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    console.print(intro, markup=False, soft_wrap=True)
    console.print(table)
    console.print(f"Wrote {out}/results.md, results.json, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
