"""Data for the examples: Fashion-MNIST from IDX files, or scikit-learn's digits as a fallback.

Fashion-MNIST (70,000 28x28 grey images of clothing, 10 classes) comes with Debian's
`dataset-fashion-mnist` package as gzipped IDX files in /usr/share/datasets/fashion-mnist
(`apt-get install dataset-fashion-mnist`); `FASHION_MNIST_DIR` points elsewhere. When the files
are missing, `load` falls back to the 1,797 8x8 digits bundled with scikit-learn
(`pip install scikit-learn`) and says so.

Images come back as float32 NCHW `(N, 1, H, W)`, standardized with the training set's mean and
standard deviation; labels as int64. The validation set is a fixed, seeded part of the
training files; the test set is only used for final numbers.
"""

from __future__ import annotations

import gzip
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz) into a native-endian array.

    Format: two zero bytes, a type code, the number of dimensions `d`, `d` big-endian uint32
    sizes, then the values in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass
class Dataset:
    """Train/validation/test splits of one data set, float32 NCHW images and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, train: int, val: int, test: int) -> Dataset:
        """The first `train`/`val`/`test` examples of each split (already shuffled)."""
        return Dataset(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_val[:val],
            self.y_val[:val],
            self.x_test[:test],
            self.y_test[:test],
            self.classes,
        )

    def describe(self) -> str:
        c, h, w = self.image_shape
        return (
            f"{self.name}: {h}x{w} images, {self.num_classes} classes, "
            f"{len(self.y_train)} train / {len(self.y_val)} validation / "
            f"{len(self.y_test)} test"
        )


def _standardize(dataset: Dataset) -> Dataset:
    mean = dataset.x_train.mean(dtype=np.float64)
    std = dataset.x_train.std(dtype=np.float64)
    for split in ("x_train", "x_val", "x_test"):
        x = getattr(dataset, split)
        setattr(dataset, split, ((x - mean) / std).astype(np.float32))
    return dataset


def _split_train_val(
    x: np.ndarray, y: np.ndarray, val_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    order = rng.permutation(len(y))
    val, train = order[:val_size], order[val_size:]
    return x[train], y[train], x[val], y[val]


def fashion_mnist_available(root: Path | None = None) -> bool:
    """Whether the four IDX files are in `root` (default `FASHION_MNIST_DIR`)."""
    root = FASHION_MNIST_DIR if root is None else Path(root)
    return all((root / name).is_file() for name in FASHION_MNIST_FILES.values())


def load_fashion_mnist(root: Path | None = None, val_size: int = 5000, seed: int = 0) -> Dataset:
    """Fashion-MNIST from the IDX files in `root` (default `FASHION_MNIST_DIR`); `val_size`
    training images for validation."""
    root = FASHION_MNIST_DIR if root is None else Path(root)
    arrays = {k: read_idx(root / name) for k, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
    rng = np.random.default_rng(seed)
    x = arrays["train_images"][:, None].astype(np.float32) / 255
    x_train, y_train, x_val, y_val = _split_train_val(
        x, arrays["train_labels"].astype(np.int64), val_size, rng
    )
    test_order = rng.permutation(len(arrays["test_labels"]))
    x_test = arrays["test_images"][test_order, None].astype(np.float32) / 255
    y_test = arrays["test_labels"][test_order].astype(np.int64)
    return _standardize(
        Dataset(
            "Fashion-MNIST", x_train, y_train, x_val, y_val, x_test, y_test, FASHION_MNIST_CLASSES
        )
    )


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits: 60% train, 20% validation, 20% test."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise SystemExit(
            "Neither Fashion-MNIST nor scikit-learn is installed. Install one:\n"
            "  apt-get install dataset-fashion-mnist\n"
            "  pip install scikit-learn"
        ) from None
    digits = sklearn_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    x = digits.images[order, None].astype(np.float32) / 16
    y = digits.target[order].astype(np.int64)
    n_val = n_test = len(y) // 5
    n_train = len(y) - n_val - n_test
    return _standardize(
        Dataset(
            "digits (scikit-learn)",
            x[:n_train],
            y[:n_train],
            x[n_train : n_train + n_val],
            y[n_train : n_train + n_val],
            x[n_train + n_val :],
            y[n_train + n_val :],
            tuple(str(i) for i in range(10)),
        )
    )


def load(name: str = "auto", seed: int = 0) -> Dataset:
    """`fashion-mnist`, `digits`, or `auto`: Fashion-MNIST when its files exist, else digits."""
    if name not in ("auto", "fashion-mnist", "digits"):
        raise ValueError(f"data set must be auto, fashion-mnist or digits, got {name!r}")
    if name == "fashion-mnist" or (name == "auto" and fashion_mnist_available()):
        if not fashion_mnist_available():
            raise SystemExit(
                f"Fashion-MNIST files not found in {FASHION_MNIST_DIR} "
                "(apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)"
            )
        return load_fashion_mnist(seed=seed)
    if name == "auto":
        print(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR} "
            "(apt-get install dataset-fashion-mnist); using scikit-learn's 8x8 digits instead.",
            file=sys.stderr,
        )
    return load_digits(seed=seed)
