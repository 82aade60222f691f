"""The fused kernels (bn_fused.cu: apply with residual and ReLU, the ReLU's backward) run in
the simulator under two thread schedules and two tunings, against the NumPy backend."""

import dataclasses
import warnings

import cuda_checks as cc
import numpy as np
import pytest

from cupy_bn import traffic
from cupy_bn.backends.cuda_backend import CudaBackend, Tuning, simulator_usable
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.functional import batch_norm, batch_norm_backward
from cupy_bn.layout import canonical

pytestmark = pytest.mark.skipif(
    not simulator_usable(), reason="CUDA simulator toolchain (g++, CUDA headers) not found"
)

#: Tiny work sizes: elementwise kernels spread a channel over several blocks.
TUNINGS = {"default": None, "split": Tuning(reduction_min_work=32, elementwise_work=64)}
#: NCS and MC, a channel over several blocks (S = 300, M = 300), a partly idle MC tile.
SHAPES = [((3, 5, 4, 6), 1), ((3, 4, 6, 5), -1), ((3, 2, 300), 1), ((300, 2), -1), ((9, 37), -1)]
FORMS = [(True, True), (True, False), (False, True)]  # (relu, with residual)


@pytest.fixture(autouse=True)
def _argument_type_warnings_are_errors():
    """A scalar whose type differs from the kernel parameter reads garbage on a GPU."""
    from cupy_bn import sim as simulator

    with warnings.catch_warnings():
        warnings.simplefilter("error", simulator.ArgumentTypeWarning)
        yield


def sim(schedule, tuning) -> CudaBackend:
    return CudaBackend.for_simulator(schedule=schedule, tuning=TUNINGS[tuning])


@pytest.mark.parametrize("form", FORMS, ids=str)
@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("tuning", sorted(TUNINGS))
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,channel_axis", SHAPES, ids=str)
def test_fused_primitives_match_the_numpy_backend(
    shape, channel_axis, dtype, tuning, schedule, form
):
    relu, with_residual = form
    x, dy = cc.make_inputs(shape, dtype, seed=5)
    z, _ = cc.make_inputs(shape, dtype, seed=6, loc=-1.0)
    view, ref, be = canonical(x, channel_axis), NumpyBackend(), sim(schedule, tuning)
    residual = view.match(z, "residual") if with_residual else None
    acc = np.float64 if view.data.dtype == np.float64 else np.float32
    channels = view.num_channels
    scale = np.linspace(0.2, 0.4, channels).astype(acc)
    shift = np.linspace(-0.8, 0.3, channels).astype(acc)
    y = be.apply_activation(view, scale, shift, residual, relu)
    expected = ref.apply_activation(view, scale, shift, residual, relu)
    assert y.dtype == view.data.dtype and y.shape == view.data.shape
    cc.assert_close(y, expected, cc.OUTPUT_TOL[np.dtype(dtype).name], "y")
    if relu:
        assert (y.astype(np.float64) >= 0).all() and (y.astype(np.float64) == 0).any()
    yview = dataclasses.replace(view, data=expected)
    g = be.relu_gradient(view.match(dy, "dy"), yview)
    np.testing.assert_array_equal(g, ref.relu_gradient(view.match(dy, "dy"), yview))


def test_relu_gradient_of_mixed_dtypes_keeps_dys():
    """`dy` float32 against a float16 `y`: the mask is y's, the values and dtype dy's."""
    y = np.array([[1.0, -1.0, 0.0, 2e-5]], np.float16)
    dy = np.array([[3.0, 4.0, np.nan, 1.0 / 3.0]], np.float32)
    yview = canonical(y, -1)
    g = sim("forward", "default").relu_gradient(yview.match(dy, "dy"), yview)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, [[3.0, 0.0, 0.0, np.float32(1.0 / 3.0)]])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,channel_axis", [((4, 3, 5), 1), ((4, 5, 3), -1)], ids=str)
def test_batch_norm_on_the_simulator_matches_the_numpy_backend(shape, channel_axis, training):
    x, dy = cc.make_inputs(shape, np.float32, seed=7)
    z, _ = cc.make_inputs(shape, np.float32, seed=8, loc=0.0)
    rng = np.random.default_rng(9)
    weight, bias = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3)
    results = []
    for backend in (sim("reverse", "split"), "numpy"):
        running = (np.full(3, 2.0, np.float32), np.full(3, 9.0, np.float32))
        y, saved = batch_norm(
            x, weight, bias.astype(np.float32), *running, training,
            channel_axis=channel_axis, backend=backend, activation="relu", residual=z,
        )  # fmt: skip
        results.append((y, *batch_norm_backward(dy, saved), *running))
    for got, want in zip(*results, strict=True):
        cc.assert_close(got, want, 1e-5, "batch_norm")


class RecordingLoader:
    """A loader that keeps the arguments of every launch (the simulator's, wrapped)."""

    def __init__(self, loader):
        self._loader, self.launches = loader, []

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def launch(self, kernel, grid, block, args):
        self.launches.append(args)
        return self._loader.launch(kernel, grid, block, args)


def _passes(launches, numel: int, inputs) -> traffic.Passes:
    """Tensor-sized arguments of the launches: a buffer is written by the first launch that
    takes it unless it is one of `inputs`, and read by every other launch that takes it."""
    reads = writes = 0
    seen = list(inputs)
    for args in launches:
        for arg in args:
            if isinstance(arg, np.ndarray) and arg.size == numel:
                if any(np.shares_memory(arg, s) for s in seen):
                    reads += 1
                else:
                    writes += 1
                    seen.append(arg)
    return traffic.Passes(reads, writes)


@pytest.mark.parametrize(("shape", "channel_axis"), [((4, 3, 16, 16), 1), ((2048, 3), -1)])
def test_fused_phases_move_and_launch_what_the_traffic_model_says(shape, channel_axis):
    be = CudaBackend.for_simulator()
    be.loader = recorder = RecordingLoader(be.loader)
    x, dy = cc.make_inputs(shape, np.float32, seed=1)
    z, _ = cc.make_inputs(shape, np.float32, seed=2)
    c = shape[channel_axis]
    weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
    running = np.zeros(c, np.float32), np.ones(c, np.float32)
    fused = dict(channel_axis=channel_axis, backend=be, activation="relu", residual=z)
    recorder.launches.clear()
    y, saved = batch_norm(x, weight, bias, *running, **fused)
    recorded = {"forward_train_fused": (list(recorder.launches), (x, z))}
    recorder.launches.clear()
    batch_norm_backward(dy, saved)
    recorded["backward_fused"] = (list(recorder.launches), (x, dy, y))
    recorder.launches.clear()
    batch_norm(x, weight, bias, *running, training=False, **fused)
    recorded["eval_fused"] = (list(recorder.launches), (x, z))
    assert sorted(recorded) == sorted(traffic.FUSED_PHASES)
    for name, (launches, inputs) in recorded.items():
        assert len(launches) == traffic.launches(name), name
        assert _passes(launches, x.size, inputs) == traffic.moved_passes(name), name
