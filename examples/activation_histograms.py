"""Experiment 2: what batch norm does to the values entering a hidden layer's activation.

The network of Ioffe & Szegedy's MNIST experiment (3 hidden layers of 100 sigmoid units, then
the output layer) is trained with and without a cupy_bn.BatchNorm1d before each sigmoid, from
the same initial weights and batch order. At checkpoints during training, the inputs of the
chosen hidden layer's sigmoid (`--layer`, default the last) are recorded on a fixed probe batch
of validation images, normalized as in training (with the batch's statistics).

Writes to --out: histograms.png (the distribution of those pre-activations at four points of
training, with the sigmoid's useful range shaded), percentiles.png (the 15th, 50th and 85th
percentile of one unit's input over training, as in the paper's Figure 1), results.md and
results.json.

    python examples/activation_histograms.py            # about 1 minute on 2 CPU cores
    python examples/activation_histograms.py --quick
"""

from __future__ import annotations

import sys

import numpy as np
from data import load
from deep_networks import build_network
from nn import SGD, Sequential, Sigmoid, softmax_cross_entropy, to_numpy
from rich.console import Console
from training import (
    Diverged,
    batch_indices,
    evaluate,
    example_parser,
    markdown_table,
    progress_bar,
    pyplot,
    save_figure,
    select_device,
    write_json,
    write_text,
)

SATURATION = 4.0
"""|z| beyond which sigmoid'(z) < 0.018, under 7% of its peak 0.25: a saturated unit."""


def activation_inputs(model: Sequential, x, layer: int) -> np.ndarray:
    """Inputs of the `layer`-th activation (0-based) on `x` as training sees them: (N, units).

    The forward runs in training mode, so batch norm normalizes with the probe batch's own
    statistics; the running statistics it updates on the way are restored afterwards.
    """
    activations = [i for i, m in enumerate(model.layers) if isinstance(m, Sigmoid)]
    state = model.state_dict()
    model.train()
    for module in model.layers[: activations[layer]]:
        x = module(x)
    model.load_state_dict(state)
    return to_numpy(x)


def checkpoint_steps(total: int, count: int) -> list[int]:
    """Step 0, then `count - 1` roughly log-spaced steps ending at `total`."""
    steps = np.unique(np.geomspace(1, total, count - 1).round().astype(int))
    return [0, *steps.tolist()]


def train_recording(
    model: Sequential,
    data: dict,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    layer: int,
    record_at: set[int],
    progress,
    label: str,
) -> dict:
    """Train, recording the chosen activation's inputs on the probe batch at `record_at` steps."""
    xp = data["xp"]
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(seed + 1)
    steps_per_epoch = len(data["y_train"]) // batch_size
    task = progress.add_task(label, total=epochs * steps_per_epoch)
    snapshots = {0: activation_inputs(model, data["x_probe"], layer)}
    step, diverged = 0, None
    model.train()
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(epochs):
            for idx in batch_indices(len(data["y_train"]), batch_size, rng):
                idx = xp.asarray(idx)
                try:
                    logits = model(data["x_train"][idx])
                except FloatingPointError as e:
                    diverged = str(e)
                    break
                loss, dlogits = softmax_cross_entropy(logits, data["y_train"][idx])
                if not np.isfinite(loss):
                    diverged = f"loss {loss} at step {step}"
                    break
                model.backward(dlogits)
                optimizer.step()
                step += 1
                if step in record_at:
                    snapshots[step] = activation_inputs(model, data["x_probe"], layer)
                progress.advance(task)
            if diverged:
                raise Diverged(diverged)
    return {
        "snapshots": snapshots,
        "val_accuracy": evaluate(model, data["x_val"], data["y_val"]),
        "test_accuracy": evaluate(model, data["x_test"], data["y_test"]),
    }


def summary(z: np.ndarray) -> dict:
    return {
        "mean": float(z.mean()),
        "std": float(z.std()),
        "saturated": float(np.mean(np.abs(z) > SATURATION)),
        "percentiles_15_50_85": np.percentile(z, [15, 50, 85]).tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__, "out/activation_histograms")
    parser.add_argument("--hidden", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--width", type=int, default=100, help="units per hidden layer")
    parser.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="which hidden layer's activation to record (0-based; -1: last)",
    )
    parser.add_argument("--unit", type=int, default=0, help="unit of the percentile plot")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    args = parser.parse_args(argv)
    if args.hidden < 1 or not -args.hidden <= args.layer < args.hidden:
        parser.error(f"--layer must be in [-{args.hidden}, {args.hidden - 1}]")
    if not 0 <= args.unit < args.width:
        parser.error(f"--unit must be in [0, {args.width - 1}]")
    xp = select_device(parser, args.device)
    console = Console()

    dataset = load(args.data, seed=args.seed)
    small = len(dataset.y_train) < 10000
    batch_size = 32 if small else 60
    epochs = args.epochs or ((8 if args.quick else 30) if small else (1 if args.quick else 5))
    if args.quick and not small:
        dataset = dataset.subset(10000, 1000, 2000)
    probe = min(1000, len(dataset.y_val))
    layer = args.layer % args.hidden
    console.print(
        f"{dataset.describe()}; device {args.device}; {args.hidden} hidden sigmoid "
        f"layers of {args.width}; recording the input of hidden layer {layer}'s "
        f"sigmoid on {probe} validation images"
    )
    data = {
        "xp": xp,
        "x_probe": xp.asarray(dataset.x_val[:probe]),
        **{
            k: xp.asarray(getattr(dataset, k))
            for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
        },
    }
    total_steps = epochs * (len(dataset.y_train) // batch_size)
    record_at = set(checkpoint_steps(total_steps, 60))
    shown = [0, *(int(round(total_steps**f)) for f in (1 / 3, 2 / 3)), total_steps]
    record_at.update(shown)

    results = {}
    with progress_bar() as progress:
        for bn in (False, True):
            name = "with BN" if bn else "without BN"
            model = build_network(
                int(np.prod(dataset.image_shape)),
                dataset.num_classes,
                args.hidden + 1,
                args.width,
                "sigmoid",
                bn,
                args.seed,
            ).to(xp)
            try:
                results[name] = train_recording(
                    model,
                    data,
                    epochs,
                    batch_size,
                    args.lr,
                    args.seed,
                    layer,
                    record_at,
                    progress,
                    f"sigmoid {name:<10}",
                )
            except Diverged as e:
                parser.exit(1, f"training {name} diverged ({e}); try a lower --lr\n")

    plt = pyplot()
    fig, axes = plt.subplots(2, len(shown), figsize=(3.1 * len(shown), 5.2), sharey="row")
    lo = min(float(np.percentile(r["snapshots"][s], 0.5)) for r in results.values() for s in shown)
    hi = max(float(np.percentile(r["snapshots"][s], 99.5)) for r in results.values() for s in shown)
    lo, hi = min(lo, -SATURATION - 1), max(hi, SATURATION + 1)
    bins = np.linspace(lo, hi, 80)
    for row, (name, r) in enumerate(results.items()):
        for col, step in enumerate(shown):
            ax = axes[row, col]
            ax.axvspan(-SATURATION, SATURATION, color="tab:green", alpha=0.08)
            ax.hist(
                r["snapshots"][step].ravel(),
                bins=bins,
                density=True,
                color="tab:blue" if row else "tab:red",
                alpha=0.8,
            )
            ax.set_xlim(lo, hi)
            if row == 0:
                ax.set_title(f"step {step}")
            if col == 0:
                ax.set_ylabel(f"{name}\ndensity")
            if row == 1:
                ax.set_xlabel("input of the sigmoid")
    fig.suptitle(
        f"Hidden layer {layer} of a {args.hidden}-hidden-layer sigmoid network on "
        f"{dataset.name} (shaded: |z| < {SATURATION:g}, where the sigmoid is not "
        "saturated)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, args.out / "histograms.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = sorted(results["without BN"]["snapshots"])
    for name, color in (("without BN", "tab:red"), ("with BN", "tab:blue")):
        pct = np.array(
            [
                np.percentile(results[name]["snapshots"][s][:, args.unit], [15, 50, 85])
                for s in steps
            ]
        )
        x = np.maximum(steps, 0.5)
        ax.plot(x, pct[:, 1], color=color, label=f"{name}: median, 15th-85th percentile")
        ax.fill_between(x, pct[:, 0], pct[:, 2], color=color, alpha=0.2)
    ax.set(
        xscale="log",
        xlabel="training step (step 0 drawn at 0.5)",
        ylabel=f"input of unit {args.unit}'s sigmoid",
        title=f"Hidden layer {layer}, unit {args.unit}, over training",
    )
    ax.legend()
    save_figure(fig, args.out / "percentiles.png")
    plt.close(fig)

    rows = []
    for name, r in results.items():
        for step in shown:
            s = summary(r["snapshots"][step])
            rows.append(
                [name, step, f"{s['mean']:+.2f}", f"{s['std']:.2f}", f"{100 * s['saturated']:.1f}%"]
            )
    acc_rows = [
        [name, f"{100 * r['val_accuracy']:.1f}%", f"{100 * r['test_accuracy']:.1f}%"]
        for name, r in results.items()
    ]
    report = (
        f"# Experiment 2: inputs of a sigmoid layer during training\n\n"
        f"{dataset.describe()}. {args.hidden} hidden layers of {args.width} sigmoid units, "
        f"SGD with momentum 0.9, learning rate {args.lr:g}, batch {batch_size}, {epochs} "
        f"epoch(s) ({total_steps} steps). Statistics of the inputs of hidden layer "
        f"{layer}'s sigmoid over {probe} validation images and all {args.width} units; "
        f"saturated means |z| > {SATURATION:g}.\n\n"
        + markdown_table(["network", "step", "mean", "std", "saturated"], rows)
        + "\n"
        + markdown_table(["network", "validation accuracy", "test accuracy"], acc_rows)
    )
    write_text(args.out / "results.md", report)
    write_json(
        args.out / "results.json",
        {
            "experiment": "activation_histograms",
            "dataset": dataset.name,
            "device": args.device,
            "quick": args.quick,
            "chance": 1 / dataset.num_classes,
            "hidden": args.hidden,
            "width": args.width,
            "layer": layer,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": args.lr,
            "total_steps": total_steps,
            "runs": {
                name: {
                    "val_accuracy": r["val_accuracy"],
                    "test_accuracy": r["test_accuracy"],
                    "checkpoints": {str(s): summary(z) for s, z in sorted(r["snapshots"].items())},
                }
                for name, r in results.items()
            },
        },
    )
    console.print(report, markup=False, soft_wrap=True)
    console.print(f"Wrote {args.out}/results.md, results.json, histograms.png, percentiles.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
