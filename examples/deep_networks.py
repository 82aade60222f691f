"""Experiment 1: batch norm makes a deep sigmoid network trainable and tolerates higher rates.

The same 10-layer dense network (9 hidden layers of 100 units and the output layer) is trained
four times, with sigmoid and with ReLU, each with and without a cupy_bn.BatchNorm1d between
every weighted sum and its activation; same initial weights (seed), batch order, optimizer and
budget. Then a learning-rate sweep trains the ReLU network with and without batch norm at
rates from 0.01 to 3.

Writes to --out: accuracy.png (validation accuracy during training), lr_sweep.png,
results.md (tables) and results.json (every number).

    python examples/deep_networks.py                 # about 5 minutes on 2 CPU cores
    python examples/deep_networks.py --quick         # under a minute
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from data import load
from nn import SGD, Dense, Flatten, ReLU, Sequential, Sigmoid
from rich.console import Console
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

ACTIVATIONS = {"sigmoid": Sigmoid, "relu": ReLU}


def build_network(
    in_features: int,
    classes: int,
    depth: int,
    width: int,
    activation: str,
    batch_norm: bool,
    seed: int,
) -> Sequential:
    """`depth` dense layers: (Dense -> [BatchNorm1d] -> activation) x (depth-1), then Dense.

    Weights are drawn with the same generator for every variant, so nets that differ only in
    batch norm start from identical weights. Layers followed by batch norm have no bias (the
    normalization would cancel it; its beta takes the role). Init: He for ReLU, LeCun
    (variance 1/fan_in) for sigmoid.
    """
    rng = np.random.default_rng(seed)
    init = "he" if activation == "relu" else "lecun"
    layers: list = [Flatten()]
    features = in_features
    for _ in range(depth - 1):
        layers.append(Dense(features, width, rng, init=init, bias=not batch_norm))
        if batch_norm:
            layers.append(cbn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
        features = width
    layers.append(Dense(features, classes, rng, init="lecun"))
    return Sequential(*layers)


@dataclass
class Plan:
    """Sizes of one run of the experiment."""

    train: int
    val: int
    test: int
    epochs: int
    batch_size: int
    lr: float
    sweep_lrs: tuple[float, ...]
    sweep_epochs: int
    evals_per_epoch: int


def make_plan(small_data: bool, quick: bool) -> Plan:
    """Budgets for Fashion-MNIST (55,000 training images) and the digits fallback (1,077)."""
    if small_data:
        if quick:
            return Plan(10**9, 10**9, 10**9, 12, 32, 0.05, (0.03, 0.3), 6, 1)
        return Plan(10**9, 10**9, 10**9, 40, 32, 0.05, (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), 15, 1)
    if quick:
        return Plan(6000, 1000, 2000, 2, 64, 0.05, (0.1, 1.0), 1, 2)
    return Plan(55000, 5000, 10000, 10, 128, 0.05, (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), 2, 4)


def train_run(
    model: Sequential,
    data: dict,
    plan: Plan,
    lr: float,
    epochs: int,
    seed: int,
    progress,
    label: str,
    evals_per_epoch: int,
) -> dict:
    """Train `model`; return validation accuracy after every fraction of an epoch, test accuracy.

    A run whose loss or batch statistics turn non-finite stops and is marked diverged; its
    remaining accuracies count as chance-or-worse (0 for the curve, nothing afterwards).
    """
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9)
    batch_rng = np.random.default_rng(seed + 1)
    steps = len(data["y_train"]) // plan.batch_size
    task = progress.add_task(label, total=epochs * steps)
    history = [(0.0, evaluate(model, data["x_val"], data["y_val"]))]
    eval_steps = {round(steps * (k + 1) / evals_per_epoch) - 1 for k in range(evals_per_epoch)}
    losses, diverged, start = [], None, time.perf_counter()
    for epoch in range(epochs):

        def on_batch(step: int, epoch: int = epoch) -> None:
            progress.advance(task)
            if step in eval_steps:
                acc = evaluate(model, data["x_val"], data["y_val"])
                history.append((epoch + (step + 1) / steps, acc))
                progress.update(task, description=f"{label}  val {acc:.3f}")

        try:
            losses.append(
                train_epoch(
                    model,
                    optimizer,
                    data["x_train"],
                    data["y_train"],
                    plan.batch_size,
                    batch_rng,
                    on_batch,
                )
            )
        except Diverged as e:
            diverged = f"epoch {epoch + 1}: {e}"
            progress.update(task, description=f"{label}  diverged", completed=epochs * steps)
            break
    seconds = time.perf_counter() - start
    return {
        "history": history,
        "train_loss": losses,
        "val_accuracy": history[-1][1] if diverged is None else None,
        "test_accuracy": (
            evaluate(model, data["x_test"], data["y_test"]) if diverged is None else None
        ),
        "diverged": diverged,
        "seconds": seconds,
    }


def fmt(acc: float | None) -> str:
    return "diverged" if acc is None else f"{100 * acc:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__, "out/deep_networks")
    parser.add_argument("--depth", type=int, default=10, help="dense layers (default 10)")
    parser.add_argument("--width", type=int, default=100, help="units per hidden layer")
    parser.add_argument("--epochs", type=int, help="epochs of the four main runs")
    parser.add_argument("--lr", type=float, help="learning rate of the four main runs")
    parser.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweep")
    args = parser.parse_args(argv)
    if args.depth < 2 or args.width < 1:
        parser.error("--depth must be >= 2 and --width >= 1")
    xp = select_device(parser, args.device)
    console = Console()

    dataset = load(args.data, seed=args.seed)
    plan = make_plan(small_data=len(dataset.y_train) < 10000, quick=args.quick)
    plan.epochs = args.epochs or plan.epochs
    plan.lr = args.lr or plan.lr
    dataset = dataset.subset(plan.train, plan.val, plan.test)
    plan.train, plan.val, plan.test = (
        len(dataset.y_train),
        len(dataset.y_val),
        len(dataset.y_test),
    )
    console.print(
        f"{dataset.describe()}; device {args.device}; {args.depth} dense layers of "
        f"{args.width}; batch {plan.batch_size}, SGD momentum 0.9"
    )
    data = {
        "xp": xp,
        **{
            k: xp.asarray(getattr(dataset, k))
            for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
        },
    }
    in_features = int(np.prod(dataset.image_shape))

    def network(activation: str, batch_norm: bool) -> Sequential:
        return build_network(
            in_features,
            dataset.num_classes,
            args.depth,
            args.width,
            activation,
            batch_norm,
            args.seed,
        ).to(xp)

    variants = [(a, bn) for a in ("sigmoid", "relu") for bn in (False, True)]
    runs: dict[str, dict] = {}
    sweep: dict[str, dict[str, dict]] = {"relu": {}, "relu+bn": {}}
    with progress_bar() as progress:
        for activation, bn in variants:
            name = activation + ("+bn" if bn else "")
            runs[name] = train_run(
                network(activation, bn),
                data,
                plan,
                plan.lr,
                plan.epochs,
                args.seed,
                progress,
                f"{name:<11} lr {plan.lr:g}",
                plan.evals_per_epoch,
            )
        if not args.no_sweep:
            for lr in plan.sweep_lrs:
                for bn in (False, True):
                    name = "relu+bn" if bn else "relu"
                    sweep[name][f"{lr:g}"] = train_run(
                        network("relu", bn),
                        data,
                        plan,
                        lr,
                        plan.sweep_epochs,
                        args.seed,
                        progress,
                        f"sweep {name:<8} lr {lr:g}",
                        1,
                    )

    chance = 1 / dataset.num_classes
    main_rows = [
        [
            name,
            fmt(r["val_accuracy"]),
            fmt(r["test_accuracy"]),
            f"{r['train_loss'][-1]:.3f}" if r["train_loss"] else "-",
        ]
        for name, r in runs.items()
    ]
    report = (
        f"# Experiment 1: deep networks with and without batch norm\n\n"
        f"{dataset.describe()}. {args.depth} dense layers ({args.depth - 1} hidden of "
        f"{args.width} units), SGD with momentum 0.9, learning rate {plan.lr:g}, batch "
        f"{plan.batch_size}, {plan.epochs} epochs, seed {args.seed}; chance is "
        f"{100 * chance:.0f}%.\n\n"
        + markdown_table(
            ["network", "validation accuracy", "test accuracy", "last epoch's training loss"],
            main_rows,
        )
    )
    if not args.no_sweep:
        sweep_rows = [
            [lr] + [fmt(sweep[n][lr]["val_accuracy"]) for n in ("relu", "relu+bn")]
            for lr in sweep["relu"]
        ]
        report += (
            f"\n## Learning-rate sweep (ReLU network, {plan.sweep_epochs} epoch(s) each)\n\n"
            + markdown_table(
                ["learning rate", "validation accuracy without BN", "validation accuracy with BN"],
                sweep_rows,
            )
        )

    out = args.out
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"sigmoid": "tab:orange", "relu": "tab:blue"}
    for name, r in runs.items():
        activation, bn = name.split("+")[0], name.endswith("+bn")
        epochs, accs = zip(*r["history"], strict=True)
        ax.plot(
            epochs,
            accs,
            color=styles[activation],
            linestyle="-" if bn else "--",
            marker="o" if bn else "x",
            markersize=3,
            label=f"{activation} {'with' if bn else 'without'} batch norm",
        )
    ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set(
        xlabel="epoch",
        ylabel="validation accuracy",
        ylim=(0, 1),
        title=f"{args.depth}-layer dense network on {dataset.name}, lr {plan.lr:g}",
    )
    ax.legend(loc="center right")
    save_figure(fig, out / "accuracy.png")
    plt.close(fig)
    if not args.no_sweep:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        lrs = [float(lr) for lr in sweep["relu"]]
        for name, color in (("relu", "tab:red"), ("relu+bn", "tab:green")):
            accs = [r["val_accuracy"] or 0.0 for r in sweep[name].values()]
            ax.plot(
                lrs,
                accs,
                marker="o",
                color=color,
                label=f"ReLU {'with' if name.endswith('bn') else 'without'} batch norm",
            )
            for lr, r in zip(lrs, sweep[name].values(), strict=True):
                if r["diverged"]:
                    ax.annotate(
                        "diverged",
                        (lr, 0.0),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=8,
                        color=color,
                    )
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set(
            xscale="log",
            xlabel="learning rate (SGD, momentum 0.9)",
            ylabel=f"validation accuracy after {plan.sweep_epochs} epoch(s)",
            ylim=(-0.03, 1),
            title="Learning-rate sweep",
        )
        ax.legend(loc="center left")
        save_figure(fig, out / "lr_sweep.png")
        plt.close(fig)
    write_text(out / "results.md", report)
    write_json(
        out / "results.json",
        {
            "experiment": "deep_networks",
            "dataset": dataset.name,
            "device": args.device,
            "quick": args.quick,
            "chance": chance,
            "depth": args.depth,
            "width": args.width,
            "plan": vars(plan),
            "runs": runs,
            "sweep": sweep,
        },
    )
    console.print(report, markup=False, soft_wrap=True)
    console.print(
        f"Wrote {out}/results.md, results.json, accuracy.png"
        + ("" if args.no_sweep else ", lr_sweep.png")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
