"""Experiment 5: cupy_bn's batch norm in a network differentiated by HIPS autograd.

The network is a function of a dict of parameters written in `autograd.numpy`: two hidden
layers (x @ W -> cupy_bn.integrations.autograd.batch_norm -> ReLU, 256 units each) and a
softmax output, trained by SGD with momentum on gradients from `autograd.value_and_grad`,
next to the same network without batch norm (with biases instead), from the same initial
weights and batch order. Training and test accuracy are measured in inference mode (the
running statistics, which each training forward updates in place).

Writes results.md and results.json to --out.

    python examples/autograd_mlp.py            # about 30 s on 2 CPU cores
    python examples/autograd_mlp.py --quick
"""

from __future__ import annotations

import sys
import time

import numpy as np
from data import load
from training import batch_indices, example_parser, markdown_table, write_json, write_text

try:
    import autograd.numpy as anp
    from autograd import value_and_grad
    from autograd.scipy.special import logsumexp
except ImportError:
    raise SystemExit("This example needs autograd: pip install -e '.[autograd]'") from None

from cupy_bn.integrations.autograd import batch_norm

HIDDEN = 2


def init_network(features: int, width: int, classes: int, batch_norm: bool, seed: int):
    """Parameters (He-initialized weights; BN's gamma/beta, or biases without batch norm) and
    the running statistics of each batch norm. Weights depend on the seed only."""
    rng = np.random.default_rng(seed)
    params, running = {}, []
    sizes = [features] + [width] * HIDDEN
    for i in range(HIDDEN):
        params[f"W{i}"] = (rng.standard_normal((sizes[i], width)) * np.sqrt(2 / sizes[i])).astype(
            np.float32
        )
        if batch_norm:
            params[f"gamma{i}"] = np.ones(width, np.float32)
            params[f"beta{i}"] = np.zeros(width, np.float32)
            running.append((np.zeros(width, np.float32), np.ones(width, np.float32)))
        else:
            params[f"b{i}"] = np.zeros(width, np.float32)
    params["W_out"] = (rng.standard_normal((width, classes)) * np.sqrt(1 / width)).astype(
        np.float32
    )
    params["b_out"] = np.zeros(classes, np.float32)
    return params, running


def logits(params: dict, running: list, x, training: bool):
    h = x
    for i in range(HIDDEN):
        h = anp.dot(h, params[f"W{i}"])
        if running:
            mean, var = running[i]
            h = batch_norm(h, params[f"gamma{i}"], params[f"beta{i}"], mean, var, training)
        else:
            h = h + params[f"b{i}"]
        h = anp.maximum(h, 0.0)
    return anp.dot(h, params["W_out"]) + params["b_out"]


def cross_entropy(params: dict, running: list, x, labels) -> float:
    z = logits(params, running, x, training=True)
    return -anp.mean(z[np.arange(len(labels)), labels] - logsumexp(z, axis=1))


def accuracy(params: dict, running: list, x, y, batch_size: int = 2000) -> float:
    right = 0
    for i in range(0, len(y), batch_size):
        z = logits(params, running, x[i : i + batch_size], training=False)
        right += int((z.argmax(axis=1) == y[i : i + batch_size]).sum())
    return right / len(y)


def train(params, running, data: dict, epochs: int, batch_size: int, lr: float, seed: int):
    step = value_and_grad(cross_entropy)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(seed + 1)
    x_train, y_train = data["x_train"], data["y_train"]
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in batch_indices(len(y_train), batch_size, rng):
            loss, grads = step(params, running, x_train[idx], y_train[idx])
            for k, g in grads.items():  # SGD with momentum 0.9, PyTorch's form
                velocity[k] = 0.9 * velocity[k] + g
                params[k] = params[k] - lr * velocity[k]
            losses.append(float(loss))
    seconds = time.perf_counter() - start
    return {
        "train_accuracy": accuracy(params, running, x_train, y_train),
        "test_accuracy": accuracy(params, running, data["x_test"], data["y_test"]),
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__, "out/autograd_mlp")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--width", type=int, default=256, help="units per hidden layer")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD's learning rate")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("--device gpu: autograd differentiates NumPy arrays only; use --device cpu")

    dataset = load(args.data, seed=args.seed)
    small = len(dataset.y_train) < 10000
    epochs = args.epochs or ((10 if args.quick else 30) if small else (1 if args.quick else 3))
    if args.quick and not small:
        dataset = dataset.subset(10000, 1000, 2000)
    batch_size = 32 if small else 128
    data = {
        "x_train": dataset.x_train.reshape(len(dataset.y_train), -1),
        "y_train": dataset.y_train,
        "x_test": dataset.x_test.reshape(len(dataset.y_test), -1),
        "y_test": dataset.y_test,
    }
    features = data["x_train"].shape[1]
    print(
        f"{dataset.describe()}; autograd MLP, {HIDDEN} hidden layers of {args.width}; SGD "
        f"{args.lr:g} with momentum 0.9, batch {batch_size}, {epochs} epoch(s)",
        flush=True,
    )
    runs = {}
    for with_bn in (True, False):
        name = "with batch_norm" if with_bn else "without"
        params, running = init_network(
            features, args.width, dataset.num_classes, with_bn, args.seed
        )
        runs[name] = train(params, running, data, epochs, batch_size, args.lr, args.seed)
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
        "# Experiment 5: batch norm in a network differentiated by autograd\n\n"
        f"{dataset.describe()}. autograd.numpy network: (x @ W -> [cupy_bn batch_norm] -> "
        f"ReLU) x {HIDDEN} with {args.width} units, softmax output; SGD with momentum 0.9, "
        f"learning rate {args.lr:g}, batch {batch_size}, {epochs} epoch(s), CPU. Accuracy in "
        "inference mode (running statistics); seconds of training.\n\n"
        + markdown_table(["network", "train accuracy", "test accuracy", "loss", "seconds"], rows)
    )
    write_text(args.out / "results.md", report)
    write_json(
        args.out / "results.json",
        {
            "experiment": "autograd_mlp",
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
