"""Experiment 3: fold batch norm into the convolutions for inference, with `cupy-bn fold`.

A small conv net (conv-BN-ReLU-pool twice, then dense-BN-ReLU and the output layer) is
trained, exported as a PyTorch-style state dict (`features.0.weight`, `features.1.running_mean`,
... in an .npz, as `np.savez(path, **model.state_dict())` writes it) together with the fold
record, the network's own list of which layer feeds which batch norm
(`cupy_bn.fold.FOLD_RECORD_KEY`; a state dict alone holds no graph), and folded with

    cupy-bn fold model.npz -o model.folded.npz

which rewrites each conv/dense weight and bias so that the batch norm after it disappears
(`W' = W * gamma / sqrt(var + eps)`, `b' = (b - mean) * gamma / sqrt(var + eps) + beta`).
The folded file is loaded into the same network with the batch-norm slots left empty, and both
networks classify the test set: same accuracy, same predictions, and the time each takes.
(The same fold as a library call: `cupy_bn.fold.fold_state_dict(state_dict)`.)

Writes to --out: model.npz, model.folded.npz, results.md, results.json, inference.png.

    python examples/fold_inference.py                  # about 3 minutes on 2 CPU cores
    python examples/fold_inference.py --quick
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from data import load
from nn import SGD, Conv2d, Dense, Flatten, Identity, MaxPool2d, Named, ReLU, Sequential
from rich.console import Console
from rich.table import Table
from training import (
    evaluate,
    example_parser,
    markdown_table,
    predict,
    progress_bar,
    pyplot,
    save_figure,
    select_device,
    time_calls,
    train_epoch,
    write_atomic,
    write_json,
    write_text,
)

import cupy_bn as cbn
from cupy_bn.fold import FOLD_RECORD_KEY, PairStatement, fold_record


def build_convnet(
    image_shape: tuple[int, int, int], classes: int, seed: int, folded: bool = False
) -> Named:
    """The conv net, with PyTorch's module names.

    features:   0 Conv2d(c, 16, 3, padding=1)  1 BatchNorm2d(16)  2 ReLU  3 MaxPool2d(2)
                4 Conv2d(16, 32, 3, padding=1) 5 BatchNorm2d(32)  6 ReLU  7 MaxPool2d(2)
    classifier: 0 Flatten  1 Linear(32*h/4*w/4, 64)  2 BatchNorm1d(64)  3 ReLU
                4 Linear(64, classes)

    Layers before a batch norm have no bias. With `folded=True` the batch norms are
    `Identity` placeholders and those layers have a bias: the shape of a folded state dict.
    """
    c, h, w = image_shape
    rng = np.random.default_rng(seed)

    def bn(layer):
        return Identity() if folded else layer

    features = Sequential(
        Conv2d(c, 16, 3, rng, padding=1, bias=folded),
        bn(cbn.BatchNorm2d(16)),
        ReLU(),
        MaxPool2d(2),
        Conv2d(16, 32, 3, rng, padding=1, bias=folded),
        bn(cbn.BatchNorm2d(32)),
        ReLU(),
        MaxPool2d(2),
    )
    classifier = Sequential(
        Flatten(),
        Dense(32 * (h // 4) * (w // 4), 64, rng, bias=folded),
        bn(cbn.BatchNorm1d(64)),
        ReLU(),
        Dense(64, classes, rng, init="lecun"),
    )
    return Named(features=features, classifier=classifier)


def save_model(path: Path, model: Named) -> Path:
    """An .npz of NumPy arrays under the state dict's names (what PyTorch users export), with
    the fold record of the model's (layer, batch norm) pairs, so that `cupy-bn fold` needs no
    options."""
    state = model.state_dict()
    arrays = {k: np.asarray(v.get() if hasattr(v, "get") else v) for k, v in state.items()}
    arrays[FOLD_RECORD_KEY] = fold_record(
        PairStatement(layer, bn_name, eps=bn.eps) for layer, bn_name, bn in model.fold_pairs()
    )
    return write_atomic(path, lambda f: np.savez(f, **arrays), mode="wb")


def cupy_bn_command() -> list[str]:
    """The `cupy-bn` command of this Python: its console script, or the CLI module."""
    script = shutil.which("cupy-bn", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from cupy_bn.cli import main; main()"]


def run_fold(model: Path, folded: Path) -> dict:
    """Run `cupy-bn fold MODEL -o OUT --force --json` and return its JSON report."""
    command = [*cupy_bn_command(), "fold", str(model), "-o", str(folded), "--force", "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=os.environ.copy(), check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"cupy-bn fold failed (exit {done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__, "out/fold_inference")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--repeat", type=int, default=7, help="timed inference passes")
    args = parser.parse_args(argv)
    xp = select_device(parser, args.device)
    console = Console()

    dataset = load(args.data, seed=args.seed)
    small = len(dataset.y_train) < 10000
    batch_size = 32 if small else 64
    epochs = args.epochs or ((10 if args.quick else 30) if small else (1 if args.quick else 3))
    if args.quick and not small:
        dataset = dataset.subset(6000, 1000, 2000)
    console.print(
        f"{dataset.describe()}; device {args.device}; conv net with batch norm, "
        f"batch {batch_size}, {epochs} epoch(s)"
    )
    data = {
        k: xp.asarray(getattr(dataset, k))
        for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    }

    model = build_convnet(dataset.image_shape, dataset.num_classes, args.seed).to(xp)
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9)
    rng = np.random.default_rng(args.seed + 1)
    steps = len(dataset.y_train) // batch_size
    history = []
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("training", total=epochs * steps)
        for epoch in range(epochs):
            loss = train_epoch(
                model,
                optimizer,
                data["x_train"],
                data["y_train"],
                batch_size,
                rng,
                lambda _: progress.advance(task),
            )
            acc = evaluate(model, data["x_val"], data["y_val"])
            history.append({"epoch": epoch + 1, "train_loss": loss, "val_accuracy": acc})
            progress.update(task, description=f"training  val {acc:.3f}")
    train_seconds = time.perf_counter() - start

    out = args.out
    model_path = save_model(out / "model.npz", model)
    folded_path = out / "model.folded.npz"
    fold_report = run_fold(model_path, folded_path)
    with np.load(folded_path, allow_pickle=False) as archive:
        folded_state = {k: archive[k] for k in archive.files}
    folded_model = build_convnet(dataset.image_shape, dataset.num_classes, args.seed, folded=True)
    folded_model.load_state_dict(folded_state)
    folded_model.to(xp).eval()
    model.eval()

    x_test, y_test = data["x_test"], dataset.y_test
    logits = predict(model, x_test)
    logits_folded = predict(folded_model, x_test)
    pred, pred_folded = logits.argmax(axis=1), logits_folded.argmax(axis=1)
    timing = time_calls(
        {
            "with batch norm": lambda: predict(model, x_test),
            "folded": lambda: predict(folded_model, x_test),
        },
        args.repeat,
    )
    results = {
        "test_accuracy": float(np.mean(pred == y_test)),
        "test_accuracy_folded": float(np.mean(pred_folded == y_test)),
        "predictions_differing": int(np.sum(pred != pred_folded)),
        "max_abs_logit_difference": float(np.max(np.abs(logits - logits_folded))),
        "max_abs_logit": float(np.max(np.abs(logits))),
        "test_images": len(y_test),
        "inference": timing,
        "speedup": timing["with batch norm"]["median_s"] / timing["folded"]["median_s"],
    }

    pair_columns = [
        "layer",
        "batch norm",
        "kind",
        "channels",
        "bias created",
        "pair",
        "algebra max abs err",
    ]
    pair_rows = [
        [
            p["layer"],
            p["bn"],
            p["kind"],
            p["channels"],
            "yes" if p["created_bias"] else "no",
            p["established"],
            "-" if p["algebra_max_abs_error"] is None else f"{p['algebra_max_abs_error']:.1e}",
        ]
        for p in fold_report["pairs"]
    ]
    table = Table(title="cupy-bn fold")
    for column in pair_columns:
        table.add_column(column)
    for row in pair_rows:
        table.add_row(*map(str, row))
    console.print(table)

    n_images = len(y_test)
    report = (
        f"# Experiment 3: folding batch norm for inference\n\n"
        f"{dataset.describe()}. Trained {epochs} epoch(s) on {args.device} "
        f"({train_seconds:.0f} s), exported to `model.npz` "
        f"({len(model.state_dict())} arrays), folded with "
        f"`cupy-bn fold model.npz -o model.folded.npz` ({len(folded_state)} arrays).\n\n"
        + markdown_table(
            ["epoch", "training loss", "validation accuracy"],
            [
                [h["epoch"], f"{h['train_loss']:.3f}", f"{100 * h['val_accuracy']:.1f}%"]
                for h in history
            ],
        )
        + "\n"
        + markdown_table(pair_columns, pair_rows)
        + "\n"
        + markdown_table(
            ["network", "test accuracy", "inference on the test set (median)", "min"],
            [
                [
                    "with batch norm (eval mode)",
                    f"{100 * results['test_accuracy']:.2f}%",
                    f"{1e3 * timing['with batch norm']['median_s']:.0f} ms",
                    f"{1e3 * timing['with batch norm']['min_s']:.0f} ms",
                ],
                [
                    "folded",
                    f"{100 * results['test_accuracy_folded']:.2f}%",
                    f"{1e3 * timing['folded']['median_s']:.0f} ms",
                    f"{1e3 * timing['folded']['min_s']:.0f} ms",
                ],
            ],
        )
        + f"\nPredictions that differ: {results['predictions_differing']} of {n_images}. "
        f"Largest logit difference: {results['max_abs_logit_difference']:.2e} (logits up to "
        f"{results['max_abs_logit']:.1f}). Folded inference is {results['speedup']:.2f}x as "
        f"fast ({n_images} images in batches of 1000, median of {args.repeat} alternating "
        f"passes).\n"
    )

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(timing)
    medians = [1e3 * timing[n]["median_s"] for n in names]
    minimums = [1e3 * timing[n]["min_s"] for n in names]
    accuracies = [results["test_accuracy"], results["test_accuracy_folded"]]
    bars = ax.barh(names, medians, color=["tab:blue", "tab:green"], label="median")
    ax.scatter(minimums, names, color="black", marker="|", s=200, zorder=3, label="fastest")
    for bar, acc in zip(bars, accuracies, strict=True):
        ax.text(
            bar.get_width() * 0.02,
            bar.get_y() + bar.get_height() / 2,
            f"test accuracy {100 * acc:.2f}%",
            va="center",
            color="white",
        )
    ax.invert_yaxis()
    ax.set_xlim(0, 1.35 * max(medians))
    ax.set(
        xlabel=f"ms to classify {n_images} test images ({args.device})",
        title=f"Inference before and after cupy-bn fold: {results['predictions_differing']} "
        "predictions differ",
    )
    ax.legend(loc="lower right")
    save_figure(fig, out / "inference.png")
    plt.close(fig)
    write_text(out / "results.md", report)
    write_json(
        out / "results.json",
        {
            "experiment": "fold_inference",
            "dataset": dataset.name,
            "device": args.device,
            "quick": args.quick,
            "chance": 1 / dataset.num_classes,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": args.lr,
            "train_seconds": train_seconds,
            "history": history,
            "fold": fold_report,
            **results,
        },
    )
    console.print(report, markup=False, soft_wrap=True)
    console.print(
        f"Wrote {out}/model.npz, model.folded.npz, results.md, results.json, inference.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
