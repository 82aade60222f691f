"""Experiment 4: cupy_bn's batch norm as a Thinc layer.

A Thinc network of two hidden layers (Linear -> cupy_bn.integrations.thinc.BatchNorm -> ReLU,
256 units each) and a softmax output is trained with Adam, next to the same network without
batch norm, from the same initial weights (Thinc's seed) and batch order. Training and test
accuracy are measured in inference mode (`model.predict`: the running statistics).

Writes results.md and results.json to --out.

    python examples/thinc_mlp.py            # about 30 s on 2 CPU cores
    python examples/thinc_mlp.py --quick
"""

from __future__ import annotations

import sys
import time

import numpy as np
from data import load
from training import (
    batch_indices,
    example_parser,
    markdown_table,
    select_device,
    write_json,
    write_text,
)

try:
    from thinc.api import (
        Adam,
        CategoricalCrossentropy,
        CupyOps,
        Linear,
        Model,
        NumpyOps,
        Softmax,
        chain,
        fix_random_seed,
        set_current_ops,
    )
except ImportError:
    raise SystemExit("This example needs Thinc: pip install -e '.[thinc]'") from None

from cupy_bn.integrations.thinc import BatchNorm


def relu() -> Model:
    """The ReLU activation alone (Thinc's `Relu` is a dense layer with it)."""

    def forward(model: Model, X, is_train: bool):
        Y = model.ops.relu(X)
        return Y, lambda dY: model.ops.backprop_relu(dY, Y)

    return Model("relu", forward)


def build_network(width: int, classes: int, batch_norm: bool, seed: int) -> Model:
    """(Linear -> [BatchNorm] -> ReLU) x 2 -> Softmax; identical Linear weights for a seed."""
    fix_random_seed(seed)
    layers = []
    for _ in range(2):
        layers.append(Linear(width))
        if batch_norm:
            layers.append(BatchNorm())
        layers.append(relu())
    return chain(*layers, Softmax(classes))


def accuracy(model: Model, x, y, batch_size: int = 2000) -> float:
    """Accuracy of `model.predict` (inference mode) on `x`."""
    right = 0
    for i in range(0, len(y), batch_size):
        scores = model.predict(x[i : i + batch_size])
        right += int((model.ops.to_numpy(scores).argmax(axis=1) == y[i : i + batch_size]).sum())
    return right / len(y)


def train(model: Model, data: dict, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    xp = model.ops.xp
    x_train, y_train = data["x_train"], data["y_train"]
    truth = xp.eye(data["classes"], dtype=np.float32)[xp.asarray(y_train)]
    model.initialize(X=x_train[:batch_size], Y=truth[:batch_size])
    optimizer = Adam(lr)
    loss_calc = CategoricalCrossentropy()
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()
    losses = []
    for _ in range(epochs):
        for idx in batch_indices(len(y_train), batch_size, rng):
            idx = xp.asarray(idx)
            scores, backprop = model.begin_update(x_train[idx])
            d_scores, _ = loss_calc(scores, truth[idx])
            backprop(d_scores)
            model.finish_update(optimizer)
            losses.append(float(-(truth[idx] * xp.log(scores + 1e-12)).sum(axis=1).mean()))
    seconds = time.perf_counter() - start
    return {
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, data["x_test"], data["y_test"]),
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__, "out/thinc_mlp")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--width", type=int, default=256, help="units per hidden layer")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    args = parser.parse_args(argv)
    xp = select_device(parser, args.device)
    set_current_ops(NumpyOps() if xp is np else CupyOps())

    dataset = load(args.data, seed=args.seed)
    small = len(dataset.y_train) < 10000
    epochs = args.epochs or ((10 if args.quick else 30) if small else (1 if args.quick else 3))
    if args.quick and not small:
        dataset = dataset.subset(10000, 1000, 2000)
    batch_size = 32 if small else 128
    flat = {
        split: xp.asarray(
            getattr(dataset, f"x_{split}").reshape(len(getattr(dataset, f"y_{split}")), -1)
        )
        for split in ("train", "test")
    }
    data = {
        "x_train": flat["train"],
        "y_train": dataset.y_train,
        "x_test": flat["test"],
        "y_test": dataset.y_test,
        "classes": dataset.num_classes,
    }
    print(
        f"{dataset.describe()}; device {args.device}; Thinc MLP, 2 hidden layers of "
        f"{args.width}; Adam {args.lr:g}, batch {batch_size}, {epochs} epoch(s)",
        flush=True,
    )
    runs = {}
    for batch_norm in (True, False):
        name = "with BatchNorm" if batch_norm else "without"
        model = build_network(args.width, dataset.num_classes, batch_norm, args.seed)
        runs[name] = train(model, data, epochs, batch_size, args.lr, args.seed)
        r = runs[name]
        print(
            f"{name:>15}: train {100 * r['train_accuracy']:.1f}%, "
            f"test {100 * r['test_accuracy']:.1f}%, {r['seconds']:.1f} s",
            flush=True,
        )

    rows = [
        [
            name,
            f"{100 * r['train_accuracy']:.1f}%",
            f"{100 * r['test_accuracy']:.1f}%",
            f"{r['final_loss']:.3f}",
            f"{r['seconds']:.1f}",
        ]
        for name, r in runs.items()
    ]
    report = (
        "# Experiment 4: batch norm as a Thinc layer\n\n"
        f"{dataset.describe()}. Thinc network: (Linear -> [cupy_bn BatchNorm] -> ReLU) x 2 "
        f"with {args.width} units, softmax output; Adam, learning rate {args.lr:g}, batch "
        f"{batch_size}, {epochs} epoch(s), device {args.device}. Accuracy in inference mode "
        "(running statistics); seconds of training.\n\n"
        + markdown_table(["network", "train accuracy", "test accuracy", "loss", "seconds"], rows)
    )
    write_text(args.out / "results.md", report)
    write_json(
        args.out / "results.json",
        {
            "experiment": "thinc_mlp",
            "dataset": dataset.name,
            "device": args.device,
            "quick": args.quick,
            "chance": 1 / dataset.num_classes,
            "epochs": epochs,
            "batch_size": batch_size,
            "width": args.width,
            "lr": args.lr,
            "runs": runs,
        },
    )
    print(f"Wrote {args.out}/results.md, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
