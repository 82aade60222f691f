"""The examples: their network pieces against finite differences, and each example end to end.

The unit tests check examples/nn.py in float64 against central finite differences and
independent loop formulas. The smoke tests run each example (the Thinc and autograd ones where
those are installed) with `--quick` in a subprocess
(on Fashion-MNIST when installed, and on the scikit-learn digits fallback) and check the
results it writes: accuracy far above chance, and each experiment's claim.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import data  # noqa: E402
import nn  # noqa: E402

import cupy_bn as cbn  # noqa: E402

F64 = np.float64


def as_float64(layer):
    """The layer with float64 parameters and gradients (finite differences need them)."""
    layer.params = {k: v.astype(F64) for k, v in layer.params.items()}
    layer.grads = {k: np.zeros_like(v) for k, v in layer.params.items()}
    return layer


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function `f()` w.r.t. every entry of `x` (in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def check_layer_gradients(layer, x: np.ndarray, rng: np.random.Generator) -> None:
    """dx and every parameter gradient of `layer` against finite differences of sum(y * r)."""
    y = layer(x)
    r = rng.standard_normal(y.shape)
    dx = layer.backward(r)
    analytic = {"x": dx, **{k: g.copy() for k, g in layer.grads.items()}}

    def loss() -> float:
        return float(np.sum(layer(x) * r))

    numeric = {
        "x": numeric_grad(loss, x),
        **{k: numeric_grad(loss, p) for k, p in layer.params.items()},
    }
    for k in numeric:
        np.testing.assert_allclose(analytic[k], numeric[k], rtol=1e-6, atol=1e-7, err_msg=k)


def conv_reference(x, w, b, padding, stride):
    """Direct float64 cross-correlation with explicit loops over output positions."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            y[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w)
    return y + (0 if b is None else b[None, :, None, None])


# ------------------------------------------------------------------------------------------
# Network pieces


@pytest.mark.parametrize("padding,stride,bias", [(1, 1, True), (0, 2, False), (2, 1, True)])
def test_conv2d_matches_loops_and_finite_differences(padding, stride, bias):
    rng = np.random.default_rng(0)
    conv = as_float64(nn.Conv2d(2, 3, 3, rng, padding=padding, stride=stride, bias=bias))
    if bias:
        conv.params["bias"][...] = rng.standard_normal(3)
    x = rng.standard_normal((2, 2, 6, 5))
    expected = conv_reference(x, conv.params["weight"], conv.params.get("bias"), padding, stride)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-12, atol=1e-12)
    check_layer_gradients(conv, x, rng)


def test_col2im_is_the_adjoint_of_im2col():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6))
    cols, _, _ = nn.im2col(x, 3, padding=1, stride=2)
    c = rng.standard_normal(cols.shape)
    back = nn.col2im(c, x.shape, 3, padding=1, stride=2)
    assert back.shape == x.shape
    np.testing.assert_allclose(np.sum(cols * c), np.sum(x * back), rtol=1e-12)


def test_dense_gradients():
    rng = np.random.default_rng(2)
    dense = as_float64(nn.Dense(5, 4, rng))
    dense.params["bias"][...] = rng.standard_normal(4)
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(dense(x), x @ dense.params["weight"].T + dense.params["bias"])
    check_layer_gradients(dense, x, rng)


def test_maxpool_forward_and_gradients():
    rng = np.random.default_rng(3)
    pool = nn.MaxPool2d(2)
    x = rng.permutation(2 * 3 * 4 * 6).reshape(2, 3, 4, 6).astype(F64)  # distinct: no ties
    expected = x.reshape(2, 3, 2, 2, 3, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(pool(x), expected)
    check_layer_gradients(pool, x, rng)


def test_maxpool_sends_the_gradient_to_the_first_maximum_only():
    pool = nn.MaxPool2d(2)
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 1, 2:] = 5.0  # second window: two maxima
    pool(x)
    dx = pool.backward(np.array([[[[2.0, 3.0]]]]))
    np.testing.assert_array_equal(dx, [[[[2, 0, 0, 0], [0, 0, 3, 0]]]])


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid])
def test_activation_gradients(activation):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from ReLU's kink
    check_layer_gradients(activation(), x, rng)


def test_sigmoid_is_exact_and_does_not_overflow():
    x = np.array([-1000.0, -30.0, -1.0, 0.0, 2.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        y = nn.sigmoid(x)
    np.testing.assert_allclose(y[1:5], 1 / (1 + np.exp(-x[1:5])), rtol=1e-15)
    assert y[0] == 0.0 and y[-1] == 1.0


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 6)) * 3
    labels = np.array([0, 5, 2, 2])

    def reference() -> float:
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return float(-np.mean(np.log(p[np.arange(4), labels])))

    loss, grad = nn.softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(reference(), rel=1e-12)
    np.testing.assert_allclose(grad, numeric_grad(reference, logits), rtol=1e-6, atol=1e-9)
    big_loss, big_grad = nn.softmax_cross_entropy(
        np.array([[1000.0, 0.0], [0.0, 1000.0]]), np.array([0, 0])
    )
    assert big_loss == pytest.approx(500.0) and np.isfinite(big_grad).all()


def test_sgd_momentum_follows_pytorchs_update():
    p, g = np.array([1.0, -2.0]), np.array([0.5, 1.0])
    opt = nn.SGD([(p, g)], lr=0.1, momentum=0.9)
    opt.step()  # v = g
    opt.step()  # v = 0.9 g + g
    np.testing.assert_allclose(p, np.array([1.0, -2.0]) - 0.1 * (g + 1.9 * g))


def test_network_with_cupy_bn_layers_backpropagates_exactly():
    """Dense -> BatchNorm1d -> Sigmoid -> Dense, the whole chain against finite differences."""
    rng = np.random.default_rng(6)
    net = nn.Sequential(
        as_float64(nn.Dense(4, 3, rng, bias=False)),
        cbn.BatchNorm1d(3, dtype=F64),
        nn.Sigmoid(),
        as_float64(nn.Dense(3, 2, rng)),
    )
    bn = net[1]
    bn.params["weight"][...] = [0.5, 1.5, -1.0]
    bn.params["bias"][...] = [0.1, -0.2, 0.3]
    x, labels = rng.standard_normal((6, 4)), np.array([0, 1, 1, 0, 1, 0])
    _, dlogits = nn.softmax_cross_entropy(net(x), labels)
    dx = net.backward(dlogits)
    analytic = [g.copy() for _, g in net.parameters()]

    def loss() -> float:
        return nn.softmax_cross_entropy(net(x), labels)[0]

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-8)
    for (p, _), a in zip(net.parameters(), analytic, strict=True):
        np.testing.assert_allclose(a, numeric_grad(loss, p), rtol=1e-5, atol=1e-8)


def test_convnet_state_dict_names_fold_into_the_bn_free_network():
    """PyTorch names survive export; cupy_bn's fold gives a network with the same outputs."""
    from fold_inference import build_convnet

    from cupy_bn.fold import fold_state_dict

    rng = np.random.default_rng(7)
    model = build_convnet((1, 8, 8), 10, seed=0)
    opt = nn.SGD(model.parameters(), lr=0.05)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    for _ in range(3):  # move the running statistics
        _, d = nn.softmax_cross_entropy(model(x), rng.integers(0, 10, 16))
        model.backward(d)
        opt.step()
    state = model.state_dict()
    assert list(state)[:6] == [
        "features.0.weight",
        "features.1.weight",
        "features.1.bias",
        "features.1.running_mean",
        "features.1.running_var",
        "features.1.num_batches_tracked",
    ]
    pairs = [(layer, bn) for layer, bn, _ in model.fold_pairs()]
    assert pairs == [
        ("features.0", "features.1"),
        ("features.4", "features.5"),
        ("classifier.1", "classifier.2"),
    ]
    folded, report = fold_state_dict(state, pairs=pairs)
    assert [(p.layer, p.bn) for p in report.pairs] == pairs
    folded_model = build_convnet((1, 8, 8), 10, seed=0, folded=True)
    folded_model.load_state_dict(folded)
    model.eval()
    folded_model.eval()
    np.testing.assert_allclose(folded_model(x), model(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Data


def write_idx(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip_and_bad_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images.gz", images, 0x08)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "images.gz"), images)
    values = np.array([1.5, -2.0], np.float32)
    write_idx(tmp_path / "floats.gz", values, 0x0D)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "floats.gz"), values)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="file has 3"):
        data.read_idx(tmp_path / "short.gz")


def test_auto_falls_back_to_digits_with_a_message(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    dataset = data.load("auto")
    assert "using scikit-learn's 8x8 digits" in capsys.readouterr().err
    assert dataset.image_shape == (1, 8, 8) and dataset.num_classes == 10
    assert len(dataset.y_train) + len(dataset.y_val) + len(dataset.y_test) == 1797
    assert dataset.x_train.dtype == np.float32
    assert abs(dataset.x_train.mean()) < 1e-5 and dataset.x_train.std() == pytest.approx(1, 1e-4)


# ------------------------------------------------------------------------------------------
# The examples end to end

FASHION = data.fashion_mnist_available()
DATASETS = [
    pytest.param(
        "fashion-mnist",
        marks=pytest.mark.skipif(not FASHION, reason="dataset-fashion-mnist is not installed"),
    ),
    "digits",
]


def run_example(
    name: str, out: Path, *args: str, fashion_dir: str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if fashion_dir is not None:
        env["FASHION_MNIST_DIR"] = fashion_dir
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def run_quick(name: str, dataset: str, out: Path) -> dict:
    pytest.importorskip("matplotlib")
    if dataset == "digits":
        pytest.importorskip("sklearn")
    # digits through `auto` with no Fashion-MNIST files: the fallback CI gets without them
    done = run_example(
        name,
        out,
        "--quick",
        "--data",
        "auto",
        fashion_dir=str(out / "missing") if dataset == "digits" else None,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if dataset == "digits":
        assert "using scikit-learn's 8x8 digits" in done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["chance"] == pytest.approx(0.1)
    assert (out / "results.md").read_text().startswith("# Experiment")
    return results


@pytest.mark.parametrize("dataset", DATASETS)
def test_deep_networks_quick(tmp_path, dataset):
    r = run_quick("deep_networks", dataset, tmp_path)
    runs = r["runs"]
    assert runs["sigmoid+bn"]["val_accuracy"] > 0.6  # chance is 0.1
    assert runs["relu+bn"]["val_accuracy"] > 0.6
    assert runs["sigmoid"]["val_accuracy"] < 0.3  # the deep sigmoid net stalls
    highest = max(r["sweep"]["relu+bn"], key=float)
    assert r["sweep"]["relu+bn"][highest]["val_accuracy"] > 0.4
    assert r["sweep"]["relu"][highest]["diverged"] or (
        r["sweep"]["relu"][highest]["val_accuracy"] < 0.3
    )
    for png in ("accuracy.png", "lr_sweep.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("dataset", DATASETS)
def test_activation_histograms_quick(tmp_path, dataset):
    r = run_quick("activation_histograms", dataset, tmp_path)
    with_bn = r["runs"]["with BN"]
    assert with_bn["val_accuracy"] > 0.6
    last = with_bn["checkpoints"][str(r["total_steps"])]
    assert abs(last["mean"]) < 1.0 and last["saturated"] < 0.05
    for png in ("histograms.png", "percentiles.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("dataset", DATASETS)
def test_fold_inference_quick(tmp_path, dataset):
    r = run_quick("fold_inference", dataset, tmp_path)
    assert r["test_accuracy"] > 0.6
    assert r["test_accuracy_folded"] == r["test_accuracy"]
    assert r["predictions_differing"] == 0
    assert [p["layer"] for p in r["fold"]["pairs"]] == ["features.0", "features.4", "classifier.1"]
    with np.load(tmp_path / "model.folded.npz", allow_pickle=False) as folded:
        assert not any("running_mean" in k for k in folded.files)
        assert "features.0.bias" in folded.files


@pytest.mark.parametrize("dataset", DATASETS)
def test_thinc_mlp_quick(tmp_path, dataset):
    pytest.importorskip("thinc")
    r = run_quick("thinc_mlp", dataset, tmp_path)
    for run in r["runs"].values():
        assert run["test_accuracy"] > 0.6 and run["train_accuracy"] > 0.6
        assert run["seconds"] > 0
    assert set(r["runs"]) == {"with BatchNorm", "without"}


@pytest.mark.parametrize("dataset", DATASETS)
def test_autograd_mlp_quick(tmp_path, dataset):
    pytest.importorskip("autograd")
    r = run_quick("autograd_mlp", dataset, tmp_path)
    for run in r["runs"].values():
        assert run["test_accuracy"] > 0.6 and run["train_accuracy"] > 0.6
        assert run["seconds"] > 0
    assert set(r["runs"]) == {"with batch_norm", "without"}


def test_small_batches_renorm_schedule_and_training_mode_accuracy():
    import small_batches as sb

    assert sb.renorm_bounds(0, 100) == (1.0, 0.0) and sb.renorm_bounds(10, 100) == (1.0, 0.0)
    assert sb.renorm_bounds(30, 100) == pytest.approx((2.0, 2.5))
    assert sb.renorm_bounds(50, 100) == (3.0, 5.0) and sb.renorm_bounds(100, 100) == (3.0, 5.0)
    rng = np.random.default_rng(8)
    model = sb.build_network(12, 3, 5, seed=0, renorm=True)
    x, y = rng.standard_normal((10, 12)).astype(np.float32), rng.integers(0, 3, 10)
    model(x)  # move the running statistics away from 0 and 1
    before = model.state_dict()
    accuracy = sb.training_mode_accuracy(model, x, y, batch_size=4)  # 2 batches; 2 left out
    assert 0 <= accuracy <= 1 and accuracy * 8 == round(accuracy * 8)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert [bn.momentum for bn in sb.batch_norms(model)] == [0.1, 0.1]


@pytest.mark.parametrize("dataset", DATASETS)
def test_small_batches_quick(tmp_path, dataset):
    r = run_quick("small_batches", dataset, tmp_path)
    assert r["small_batch_sizes"] == [4] and r["ghost_factor"] == 8
    assert set(r["runs"]) == {
        "batch norm, batch 4",
        "renorm, batch 4",
        "ghost, batch 32 in 4s",
        "batch norm, batch 32",
    }
    for run in r["runs"].values():
        assert run["diverged"] is None and run["seconds"] > 0
        for key in (
            "train_accuracy_training_mode",
            "train_accuracy_inference_mode",
            "test_accuracy",
        ):
            assert run[key] > 0.5, key  # chance is 0.1
        gap = run["train_accuracy_training_mode"] - run["train_accuracy_inference_mode"]
        assert run["gap"] == pytest.approx(gap)
    assert [r["runs"][name]["samples_per_normalization"] for name in r["runs"]] == [4, 4, 4, 32]
    renorm = r["runs"]["renorm, batch 4"]
    assert (renorm["final_rmax"], renorm["final_dmax"]) == (3.0, 5.0)  # the ramp's end
    # renorm trains with outputs corrected towards the running statistics: a smaller gap
    assert abs(renorm["gap"]) < abs(r["runs"]["batch norm, batch 4"]["gap"])
    assert (tmp_path / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_gpu_without_a_usable_device_is_a_clear_usage_error(tmp_path):
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None and cupy.is_available():
        pytest.skip("a GPU is usable here")
    done = run_example("deep_networks", tmp_path, "--device", "gpu", timeout=60)
    assert done.returncode == 2
    assert "--device gpu" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results.json").exists()
