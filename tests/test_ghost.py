"""Ghost batches (`batch_norm(..., virtual_batch=G)`, `BatchNorm2d(C, virtual_batch=G)`):
each chunk of G samples along axis 0 against the float64 closed form of `tests/reference.py`
applied to that chunk alone, on both backends and layouts, in every supported dtype; the
running-statistics rule, the errors, and that chunks are views of x."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import cupy_bn as cbn
from cupy_bn import ghost
from cupy_bn.backends.cuda_backend import simulator_usable
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.dtypes import BFLOAT16

SIM = pytest.param(
    "sim", marks=pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")
)
BACKENDS = ["numpy", SIM]
#: (channel_axis, shape) with a batch of 7: G=3 gives chunks of 3, 3 and 1 samples.
LAYOUTS = [
    (1, (7, 3, 4, 5)),  # NCHW (NCS)
    (-1, (7, 4, 5, 3)),  # NHWC (MC)
    (1, (7, 3, 6)),  # NCL (NCS)
    (-1, (8, 3)),  # dense (N, C) (MC): G=3 gives 3, 3, 2 (a single sample has one value)
]
LAYOUT_IDS = ["NCHW", "NHWC", "NCL", "NC"]
MOMENTUM = 0.3
#: Largest error against the float64 formula, relative to the values' scale, per dtype:
#: float64 and float32 are the plain path's accuracy; 16-bit outputs round once.
TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float16): 4e-3,
}
DTYPES = [np.float64, np.float32, np.float16]
if BFLOAT16 is not None:  # ml_dtypes installed
    DTYPES.append(BFLOAT16)
    TOLERANCE[BFLOAT16] = 3e-2


def make(shape, channel_axis, dtype=np.float64, seed=0):
    """x with per-channel offsets and scales, weight, bias (float32 for narrower x, as a
    mixed-precision layer keeps them), dy and running statistics."""
    rng = np.random.default_rng(seed)
    vector = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    c = shape[channel_axis]
    cs = ref.channel_shape(len(shape), channel_axis, c)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2, cs) + rng.uniform(-3, 3, cs)
    return {
        "x": x.astype(dtype),
        "weight": rng.uniform(0.5, 1.5, c).astype(vector),
        "bias": rng.standard_normal(c).astype(vector),
        "dy": rng.standard_normal(shape).astype(dtype),
        "running": (rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c)),
    }


def chunks(a, g):
    return [a[i : i + g] for i in range(0, a.shape[0], g)]


def reference(case, g, channel_axis):
    """Float64 closed form on each chunk alone: y, dx, dweight, dbias."""
    x64, dy64 = (case[k].astype(np.float64) for k in ("x", "dy"))
    w, b = case["weight"].astype(np.float64), case["bias"].astype(np.float64)
    ys, dxs, dws, dbs = [], [], [], []
    for xc, dyc in zip(chunks(x64, g), chunks(dy64, g), strict=True):
        ys.append(ref.forward(xc, w, b, channel_axis=channel_axis))
        dx, dw, db = ref.backward(xc, dyc, w, channel_axis=channel_axis)
        dxs.append(dx)
        dws.append(dw)
        dbs.append(db)
    return np.concatenate(ys), np.concatenate(dxs), np.sum(dws, 0), np.sum(dbs, 0)


def ours(case, g, channel_axis, backend="numpy", **options):
    rm, rv = (r.astype(np.float32) for r in case["running"])
    y, saved = cbn.batch_norm(
        case["x"], case["weight"], case["bias"], rm, rv, True, MOMENTUM,
        channel_axis=channel_axis, backend=backend, virtual_batch=g, **options,
    )  # fmt: skip
    return y, cbn.batch_norm_backward(case["dy"], saved), (rm, rv), saved


def assert_close(got, want, dtype, what):
    tol = TOLERANCE[np.dtype(dtype)]
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("channel_axis", "shape"), LAYOUTS, ids=LAYOUT_IDS)
def test_each_chunk_is_batch_norm_of_its_samples(channel_axis, shape, dtype, backend):
    """G=3 over a batch of 7 (or 8): two full chunks and a shorter last one."""
    case = make(shape, channel_axis, dtype)
    y, (dx, dw, db), _, saved = ours(case, 3, channel_axis, backend)
    want_y, want_dx, want_dw, want_db = reference(case, 3, channel_axis)
    assert isinstance(saved, ghost.GhostSaved) and len(saved.chunks) == 3
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == np.dtype(dtype)
    assert dw.dtype == db.dtype == case["weight"].dtype
    assert_close(y, want_y, dtype, "y")
    assert_close(dx, want_dx, dtype, "dx")
    assert_close(dw, want_dw, dw.dtype if dtype == np.float64 else dtype, "dweight")
    assert_close(db, want_db, db.dtype if dtype == np.float64 else dtype, "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g", [1, 2, 5])
def test_chunk_sizes_on_a_spatial_input(g, backend):
    """G=1 (one sample per chunk: its spatial values), and sizes that leave other remainders."""
    case = make((5, 2, 3, 4), 1)
    y, (dx, dw, db), _, _ = ours(case, g, 1, backend)
    want = reference(case, g, 1)
    for got, expected, name in zip((y, dx, dw, db), want, ("y", "dx", "dw", "db"), strict=True):
        assert_close(got, expected, np.float64, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g", [7, 8, 100])
def test_a_chunk_as_large_as_the_batch_is_plain_batch_norm(g, backend):
    case = make((7, 3, 4, 5), 1, np.float32)
    y, grads, running, saved = ours(case, g, 1, backend)
    plain_y, plain_grads, plain_running, _ = ours(case, None, 1, backend)
    assert isinstance(saved, cbn.SavedForBackward)
    for a, b in zip((y, *grads, *running), (plain_y, *plain_grads, *plain_running), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("channel_axis", "shape"), LAYOUTS, ids=LAYOUT_IDS)
def test_running_statistics_are_updated_once_from_the_pooled_chunks(channel_axis, shape, backend):
    """mean: the count-weighted mean of the chunk means (the batch mean); variance: the pooled
    within-chunk variance sum(n_k * var_k) / (n - K), computed here from the chunks."""
    case = make(shape, channel_axis)
    _, _, (rm, rv), _ = ours(case, 3, channel_axis, backend)
    axes = ref.reduce_axes(len(shape), channel_axis)
    parts = chunks(case["x"], 3)
    counts = np.array([p.size // shape[channel_axis] for p in parts])
    means = np.array([p.mean(axis=axes) for p in parts])
    m2 = sum(((p - np.reshape(m, ref.channel_shape(len(shape), channel_axis, -1))) ** 2).sum(axes)
             for p, m in zip(parts, means, strict=True))  # fmt: skip
    mean = (counts[:, None] * means).sum(0) / counts.sum()
    pooled = m2 / (counts.sum() - len(parts))
    rm0, rv0 = case["running"]
    np.testing.assert_allclose(rm, (1 - MOMENTUM) * rm0 + MOMENTUM * mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, (1 - MOMENTUM) * rv0 + MOMENTUM * pooled, rtol=1e-6, atol=1e-6)
    # neither the whole batch's unbiased variance nor the chunks' plain (unweighted) mean
    whole = case["x"].var(axis=axes, ddof=1)
    assert not np.allclose(rv, (1 - MOMENTUM) * rv0 + MOMENTUM * whole, rtol=1e-4, atol=0)


def test_equal_chunks_average_the_chunk_means_and_unbiased_variances():
    """With equal chunks the rule is Keras's average of the chunks' statistics, with the
    unbiased variance of each chunk (PyTorch's running-variance convention)."""
    case = make((6, 2, 5), 1)
    x = case["x"] + np.arange(6).reshape(6, 1, 1) * 3.0  # chunks differ in mean
    rm, rv = np.zeros(2), np.ones(2)
    cbn.batch_norm(x, None, None, rm, rv, momentum=1.0, virtual_batch=2)
    means = [c.mean(axis=(0, 2)) for c in chunks(x, 2)]
    variances = [c.var(axis=(0, 2), ddof=1) for c in chunks(x, 2)]
    np.testing.assert_allclose(rm, np.mean(means, 0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean(variances, 0), rtol=1e-12)
    assert np.all(rv < x.var(axis=(0, 2), ddof=1) / 2)  # not the spread between chunks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", [("relu", True), ("relu", False), (None, True)])
@pytest.mark.parametrize(("channel_axis", "shape"), LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_fused_activation_and_residual_per_chunk(channel_axis, shape, form, backend):
    activation, with_residual = form
    case = make(shape, channel_axis, np.float32)
    z = (
        np.random.default_rng(5).standard_normal(shape).astype(np.float32)
        if with_residual
        else None
    )
    y, grads, _, _ = ours(case, 3, channel_axis, backend, activation=activation, residual=z)
    want_y, _, _, _ = reference(case, 3, channel_axis)
    pre = want_y + (0 if z is None else z)
    want = np.maximum(pre, 0) if activation == "relu" else pre
    assert_close(y, want, np.float32, "y")
    # the gradient entering the normalization is dy where the output is positive
    masked = dict(case, dy=np.where(pre > 0, case["dy"], 0) if activation else case["dy"])
    _, want_dx, want_dw, want_db = reference(masked, 3, channel_axis)
    assert len(grads) == (4 if with_residual else 3)
    for got, expected, name in zip(
        grads, (want_dx, want_dw, want_db), ("dx", "dw", "db"), strict=False
    ):
        assert_close(got, expected, np.float32, name)
    if with_residual:
        np.testing.assert_array_equal(grads[3], masked["dy"].astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_ignores_virtual_batch(backend):
    case = make((7, 3, 4, 5), 1, np.float32)
    rm, rv = (r.astype(np.float32) for r in case["running"])
    args = (case["x"], case["weight"], case["bias"], rm, rv, False)
    y, saved = cbn.batch_norm(*args, backend=backend, virtual_batch=3)
    plain, plain_saved = cbn.batch_norm(*args, backend=backend)
    np.testing.assert_array_equal(y, plain)
    for a, b in zip(
        cbn.batch_norm_backward(case["dy"], saved),
        cbn.batch_norm_backward(case["dy"], plain_saved),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_output_keeps_channels_last_memory_order():
    """An NCHW-shaped view of NHWC memory: chunks are views, and y and dx keep that order."""
    case = make((7, 4, 5, 3), -1, np.float32)
    x = case["x"].transpose(0, 3, 1, 2)  # (7, 3, 4, 5), channels-last memory
    dy = case["dy"].transpose(0, 3, 1, 2)
    y, saved = cbn.batch_norm(x, case["weight"], case["bias"], virtual_batch=3)
    dx, _, _ = cbn.batch_norm_backward(dy, saved)
    for out in (y, dx):
        assert out.shape == x.shape and out.transpose(0, 2, 3, 1).flags.c_contiguous
    want_y, want_dx, _, _ = reference(case, 3, -1)
    assert_close(y.transpose(0, 2, 3, 1), want_y, np.float32, "y")
    assert_close(dx.transpose(0, 2, 3, 1), want_dx, np.float32, "dx")


class TrackingBackend(NumpyBackend):
    """The NumPy backend, recording the arrays its statistics, apply and backward read."""

    def __init__(self):
        super().__init__()
        self.read: list[tuple[str, np.ndarray]] = []

    def batch_stats(self, x):
        self.read.append(("x", x.data))
        return super().batch_stats(x)

    def apply(self, x, scale, shift):
        self.read.append(("x", x.data))
        return super().apply(x, scale, shift)

    def backward(self, dy, x, mean, invstd, gamma, count):
        self.read += [("dy", dy.data), ("x", x.data)]
        return super().backward(dy, x, mean, invstd, gamma, count)


@pytest.mark.parametrize(
    "layout", ["NCHW", "NHWC", "channels-last memory"], ids=lambda s: s.replace(" ", "-")
)
def test_chunks_are_views_of_x_and_dy(layout):
    rng = np.random.default_rng(0)
    if layout == "NCHW":
        x, dy, axis = rng.standard_normal((7, 3, 4, 5)), rng.standard_normal((7, 3, 4, 5)), 1
    else:
        x, dy = rng.standard_normal((7, 4, 5, 3)), rng.standard_normal((7, 4, 5, 3))
        axis = -1
        if layout == "channels-last memory":
            x, dy, axis = x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2), 1
    be = TrackingBackend()
    _, saved = cbn.batch_norm(x, backend=be, channel_axis=axis, virtual_batch=3)
    cbn.batch_norm_backward(dy, saved)
    sources = {"x": x, "dy": dy}
    kinds = [kind for kind, _ in be.read]
    assert kinds.count("x") == 3 * 3 and kinds.count("dy") == 3  # stats, apply, backward
    sizes = sorted({a.shape[0] for _, a in be.read})
    assert len(sizes) == 2  # full chunks and the shorter last one, never the whole batch
    for kind, data in be.read:
        assert np.shares_memory(data, sources[kind]), f"a chunk of {kind} was copied"


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (0, ValueError, "virtual_batch must be an int >= 1"),
        (-2, ValueError, "virtual_batch must be an int >= 1"),
        (2.0, TypeError, "virtual_batch must be an int >= 1 or None, got float"),
        ("3", TypeError, "got str"),
        (True, TypeError, "got bool"),
        (3, ValueError, r"virtual_batch=3 leaves a chunk with 1 value\(s\) per channel"),
    ],
)
def test_errors_name_virtual_batch_and_change_nothing(value, error, words):
    x = np.random.default_rng(0).standard_normal((7, 2))  # G=3: the last chunk is one sample
    x0 = x.copy()
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(error, match=words):
        cbn.batch_norm(x, None, None, rm, rv, virtual_batch=value)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    np.testing.assert_array_equal(x, x0)
    with pytest.raises(error, match=words.split("=")[0]):
        if value == 3:
            cbn.BatchNorm1d(2, virtual_batch=value)(x)
        else:
            cbn.BatchNorm1d(2, virtual_batch=value)


def test_numpy_integers_are_accepted_and_the_channel_axis_cannot_be_the_batch_axis():
    x = np.random.default_rng(0).standard_normal((6, 4))
    y, _ = cbn.batch_norm(x, virtual_batch=np.int64(3))
    want, _, _, _ = reference({"x": x, "dy": x, "weight": np.ones(4), "bias": np.zeros(4)}, 3, 1)
    np.testing.assert_allclose(y, want, atol=1e-12)
    with pytest.raises(ValueError, match="virtual_batch splits the batch axis"):
        cbn.batch_norm(x, channel_axis=0, virtual_batch=3)


def test_non_finite_chunk_leaves_the_running_statistics_alone():
    x = np.random.default_rng(0).standard_normal((6, 3, 4))
    x[5, 1, 2] = np.nan  # in the last chunk, channel 1
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1"):
        cbn.batch_norm(x, None, None, rm, rv, virtual_batch=2)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_sync_batch_norm_refuses_ghost_batches():
    """The layer and the conversion refuse before any communication; the functional form
    with a reducer refuses inside its collective, announcing the failure to the others."""
    from fake_comm import Counting, run_group

    from cupy_bn.distributed import SyncReducer

    def refuse(comm):
        counted = Counting(comm)
        with pytest.raises(ValueError, match="virtual_batch=2.*nothing to synchronize"):
            cbn.SyncBatchNorm(3, comm=counted, virtual_batch=2)
        layer = cbn.BatchNorm1d(3, virtual_batch=2)
        with pytest.raises(ValueError, match="virtual_batch=2.*BatchNorm1d.*nothing to"):
            cbn.convert_sync_batchnorm([layer], counted)
        before = counted.calls
        x = np.random.default_rng(0).standard_normal((4, 3))
        with pytest.raises(ValueError, match="not supported by sync batch norm"):
            cbn.batch_norm(x, reducer=SyncReducer(counted, 3), virtual_batch=2)
        return before, counted.calls

    assert run_group(2, refuse) == [(0, 1), (0, 1)]


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_layer_step_matches_the_functional_form(channel_axis):
    shape = (7, 3, 4, 5) if channel_axis == 1 else (7, 4, 5, 3)
    case = make(shape, channel_axis, np.float32)
    bn = cbn.BatchNorm2d(
        3, momentum=MOMENTUM, channel_axis=channel_axis, virtual_batch=3, backend="numpy"
    )
    bn.params["weight"][...] = case["weight"]
    bn.params["bias"][...] = case["bias"]
    bn.buffers["running_mean"][...] = case["running"][0]
    bn.buffers["running_var"][...] = case["running"][1]
    y = bn(case["x"])
    dx = bn.backward(case["dy"])
    want_y, (want_dx, want_dw, want_db), (rm, rv), _ = ours(case, 3, channel_axis)
    for got, want in (
        (y, want_y),
        (dx, want_dx),
        (bn.grads["weight"], want_dw),
        (bn.grads["bias"], want_db),
        (bn.running_mean, rm),
        (bn.running_var, rv),
    ):
        np.testing.assert_array_equal(got, want)
    assert bn.num_batches_tracked == 1
    assert repr(bn).endswith(", virtual_batch=3)")
    bn.eval()  # running statistics: the chunks play no part
    plain = cbn.BatchNorm2d(3, channel_axis=channel_axis, backend="numpy")
    plain.load_state_dict(bn.state_dict())
    np.testing.assert_array_equal(bn(case["x"]).astype(np.float32), plain.eval()(case["x"]))


def test_layer_without_running_statistics_uses_ghost_batches_in_eval_mode():
    case = make((7, 3, 4, 5), 1)
    bn = cbn.BatchNorm2d(3, affine=False, track_running_stats=False, virtual_batch=3).eval()
    y = bn(case["x"])
    want = np.concatenate([ref.forward(c) for c in chunks(case["x"], 3)])
    np.testing.assert_allclose(y, want, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_with_ghost_batches(backend):
    result = cbn.gradcheck(
        shapes=[(8, 3), (5, 3, 4), (5, 2, 3, 2)],
        backends=backend,
        virtual_batch=3,
        fast=backend == "sim",
    )
    assert result, result.summary()
    assert {c.case.virtual_batch for c in result.cases} == {3}
    assert len(result.cases) == 3 * 2 * 2 * 2


def test_gradcheck_catches_a_backward_with_the_wrong_chunk_statistics(monkeypatch):
    """A backward that uses the first chunk's mean for every chunk must fail the check."""
    import dataclasses

    original = ghost.ghost_batch_norm_backward

    def wrong(dy, saved):
        first = saved.chunks[0].mean
        moved = tuple(dataclasses.replace(c, mean=first) for c in saved.chunks)
        return original(dy, dataclasses.replace(saved, chunks=moved))

    monkeypatch.setattr(ghost, "ghost_batch_norm_backward", wrong)
    result = cbn.gradcheck(shapes=[(5, 3, 4)], modes="train", virtual_batch=3)
    assert not result
    assert all(not c.comparisons["x"].passed for c in result.cases)


def test_gradcheck_refuses_bad_ghost_options():
    with pytest.raises(ValueError, match="virtual_batch: 3 leaves a last chunk"):
        cbn.gradcheck(shapes=[(7, 2)], virtual_batch=3)
    with pytest.raises(ValueError, match="virtual_batch: the double backward"):
        cbn.gradcheck(shapes=[(6, 2)], virtual_batch=3, order=2)
    with pytest.raises(ValueError, match="virtual_batch: expected None or an int >= 1"):
        cbn.gradcheck(shapes=[(6, 2)], virtual_batch=0)


def test_double_backward_refuses_a_ghost_batch_forward():
    x = np.random.default_rng(0).standard_normal((6, 3))
    _, saved = cbn.batch_norm(x, virtual_batch=3)
    with pytest.raises(TypeError, match="GhostSaved"):
        cbn.batch_norm_double_backward(x, None, None, x, saved)


def test_cli_gradcheck_with_ghost_batches():
    import json

    from click.testing import CliRunner

    from cupy_bn.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["gradcheck", *args])

    shapes = ("--shape", "8,3", "--shape", "5,3,4")
    result = run("--virtual-batch", "3", *shapes, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["cases"]) == 2 * 2 * 2 * 2
    assert {c["virtual_batch"] for c in report["cases"]} == {3}
    assert all(c["name"].endswith(" virtual_batch=3") for c in report["cases"])
    table = run("--virtual-batch", "3", "--virtual-batch", "2", "--shape", "5,3,4")
    assert table.exit_code == 0 and "ghost" in table.stdout and "16/16" in table.stdout
    refused = run("--virtual-batch", "3", "--shape", "7,2")
    assert refused.exit_code == 2 and "virtual_batch: 3 leaves a last chunk" in refused.output


@pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")
@pytest.mark.parametrize("bad_sample", [5, 0], ids=["last-chunk", "first-chunk"])
def test_deferred_statistics_checks_leave_the_running_statistics_alone(bad_sample):
    """A backend that defers its non-finite checks to the device (the CUDA backend, here in
    the simulator) reports a NaN chunk later; the one running update of the call is skipped
    on the device, as without ghost batches."""
    from cupy_bn import deferred
    from cupy_bn.backends.cuda_backend import CudaBackend

    be = CudaBackend.for_simulator(defers_checks=True)
    previous = deferred.set_deferred_checks(True)
    try:
        x = np.random.default_rng(0).standard_normal((6, 3, 4))
        x[bad_sample, 1, 2] = np.nan
        rm, rv = np.zeros(3), np.ones(3)
        with pytest.raises(FloatingPointError, match=r"channel\(s\) 1"):
            cbn.batch_norm(x, None, None, rm, rv, backend=be, virtual_batch=2)
            deferred.check_errors()  # when the failing chunk is the last one
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
        cbn.batch_norm(np.full((4, 3, 4), 1.5), None, None, rm, rv, backend=be, virtual_batch=2)
        deferred.check_errors()
        np.testing.assert_array_equal(rm, 0.1 * 1.5)  # the next finite call updates them
    finally:
        deferred._pending.checks.clear()
        deferred.set_deferred_checks(previous)
