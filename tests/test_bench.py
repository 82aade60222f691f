"""Benchmark machinery: statistics, the traffic model, case sets, the implementations computing
batch norm at all, the report's JSON."""

from __future__ import annotations

import json
import math
import statistics
import types

import numpy as np
import pytest
import reference

from cupy_bn import bench, machine, traffic
from cupy_bn.backends import cupy_usable
from cupy_bn.backends.cuda_backend import simulator_usable

TINY = bench.BenchCase("tiny", (4, 3, 5, 2), 1, "float64")
TINY_LAST = bench.BenchCase("tiny-last", (4, 5, 2, 3), -1, "float64")


def test_timing_stats_match_the_definitions():
    times = [0.5, 0.1, 0.2, 0.3, 0.4, 5.0]
    s = bench.timing_stats(times)
    assert s["min"] == 0.1 and s["max"] == 5.0 and s["rounds"] == 6
    assert s["median"] == pytest.approx(0.35)
    assert s["mean"] == pytest.approx(sum(times) / 6)
    assert s["stddev"] == pytest.approx(statistics.stdev(times))
    q1, _, q3 = statistics.quantiles(sorted(times), n=4, method="inclusive")
    assert (s["q1"], s["q3"], s["iqr"]) == pytest.approx((q1, q3, q3 - q1))
    assert s["iqr_outliers"] == 1 and s["hd15iqr"] == 0.5  # 5.0 lies beyond q3 + 1.5 iqr
    assert s["ops"] == pytest.approx(1 / s["mean"])
    assert s["total"] == pytest.approx(sum(times))
    assert bench.timing_stats([0.25])["q1"] == 0.25


def _row(impl="x", ours=True, phase="backward", median=1e-3, limit=4.8e6, case=None):
    return bench.BenchRow(
        impl=impl,
        ours=ours,
        device="cpu",
        case=case or bench.BenchCase("c", (10, 20), -1, "float32"),
        phase=phase,
        stats={"median": median, "min": median, "rounds": 1},
        bandwidth_limit=limit,
    )


def test_row_bandwidths_divide_the_traffic_model():
    ours, peer = _row(), _row(impl="peer", ours=False)
    for row in (ours, peer):
        assert row.minimal_bytes == 3 * 200 * 4  # R2 W1
        assert row.gbps == pytest.approx(2400 / 1e-3 / 1e9)
        assert row.percent_of_bandwidth == pytest.approx(50.0)
    assert ours.moved_bytes == 5 * 200 * 4  # R4 W1: what our backends move
    assert ours.moved_gbps == pytest.approx(4000 / 1e-3 / 1e9)
    assert ours.moved_percent_of_bandwidth == pytest.approx(4000 / 1e-3 / 4.8e6 * 100)
    assert peer.moved_bytes is peer.moved_gbps is peer.moved_percent_of_bandwidth is None
    assert _row(phase="forward_train").minimal_bytes == 2 * 200 * 4  # R1 W1
    assert _row(phase="forward_train").moved_bytes == 3 * 200 * 4  # R2 W1
    assert _row(phase="eval").minimal_bytes == _row(phase="eval").moved_bytes == 2 * 200 * 4
    unknown = _row(limit=None)
    assert unknown.percent_of_bandwidth is None and unknown.moved_percent_of_bandwidth is None
    instant = _row(median=0.0)
    assert instant.gbps is None and instant.moved_gbps is None


def test_every_case_set_divides_by_the_one_traffic_model(monkeypatch):
    """Rows of the default and the gpu case sets get their bytes from cupy_bn.traffic alone."""
    cases = [bench.SUITES[name].cases("float32")[0] for name in ("default", "gpu")]
    monkeypatch.setitem(traffic.MINIMAL_PASSES, "eval", traffic.Passes(3, 4))
    monkeypatch.setitem(traffic.PRIMITIVE_PASSES, "apply", traffic.Passes(5, 6))
    for case in cases:
        row = _row(phase="eval", case=case)
        assert row.minimal_bytes == 7 * case.numel * 4
        assert row.moved_bytes == 11 * case.numel * 4
        entry = row.to_json(warmup=0)["extra_info"]
        assert entry["minimal_bytes"] == 7 * case.numel * 4
        assert entry["moved_bytes"] == 11 * case.numel * 4


def _runners_agree_with_reference(name: str, case: bench.BenchCase) -> None:
    rng = np.random.default_rng(0)
    inputs = bench._host_inputs(case, np.random.default_rng(0))
    runners = bench.IMPLEMENTATIONS[name].setup(case, rng)
    x, dy, w, b = inputs["x"], inputs["dy"], inputs["weight"], inputs["bias"]
    axis = case.channel_axis
    y_train = _in_layout(_first(runners["forward_train"]()), case)
    np.testing.assert_allclose(y_train, reference.forward(x, w, b, channel_axis=axis), atol=1e-10)
    dx, dw, db = runners["backward"]()[:3]
    dx, dw, db = _in_layout(dx, case), np.asarray(dw, np.float64), np.asarray(db, np.float64)
    want_dx, want_dw, want_db = reference.backward(x, dy, w, channel_axis=axis)
    np.testing.assert_allclose(dx, want_dx, atol=1e-10)
    np.testing.assert_allclose(dw, want_dw, atol=1e-10)
    np.testing.assert_allclose(db, want_db, atol=1e-10)
    # Running statistics started at (0, 1); setup and the call above made two momentum-0.1
    # updates with the batch mean and the unbiased batch variance.
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    m = x.size // x.shape[axis]
    mean = x.mean(axis=axes)
    unbiased = x.var(axis=axes) * m / (m - 1)
    want_eval = reference.forward(
        x, w, b, channel_axis=axis, mean=0.19 * mean, var=0.81 + 0.19 * unbiased
    )
    np.testing.assert_allclose(_in_layout(_first(runners["eval"]()), case), want_eval, atol=1e-10)


def _in_layout(value, case: bench.BenchCase) -> np.ndarray:
    """A tensor result as a float64 array in the case's layout (PyTorch's are NCHW views)."""
    if type(value).__module__.startswith("torch"):
        return np.moveaxis(value.numpy(), 1, case.channel_axis).astype(np.float64)
    return np.asarray(value, np.float64)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize("case", [TINY, TINY_LAST], ids=lambda c: c.name)
@pytest.mark.parametrize("name", ["cupy_bn.numpy", "numpy.textbook", "numpy.einsum"])
def test_cpu_implementations_compute_batch_norm(name, case):
    _runners_agree_with_reference(name, case)


@pytest.mark.parametrize("case", [TINY, TINY_LAST], ids=lambda c: c.name)
def test_numba_backend_computes_batch_norm(case):
    pytest.importorskip("numba")
    _runners_agree_with_reference("cupy_bn.numba", case)


@pytest.mark.parametrize("case", [TINY, TINY_LAST], ids=lambda c: c.name)
def test_torch_peer_computes_batch_norm(case):
    pytest.importorskip("torch")
    _runners_agree_with_reference("torch.cpu", case)


def test_run_bench_rows_ratios_and_notes(monkeypatch):
    report = bench.run_bench(
        [TINY],
        ["cupy_bn.numpy", "numpy.textbook", "cupy.naive"],
        repeat=3,
        warmup=1,
        copy_bytes=1 << 20,
    )
    assert report.errors == []
    assert [(r.impl, r.phase) for r in report.rows] == [
        (impl, phase) for impl in ("cupy_bn.numpy", "numpy.textbook") for phase in bench.PHASES
    ] + ([("cupy.naive", p) for p in bench.PHASES] if cupy_usable() else [])
    if not cupy_usable():
        assert report.notes == ["cupy.naive skipped: no usable GPU (cupy.is_available() is False)"]
    for row in report.rows:
        assert row.stats["rounds"] == 3
        assert row.bandwidth_limit == report.cpu_bandwidth or row.device == "gpu"
        if row.impl == "numpy.textbook":
            assert row.ratio_to_fastest_peer == 1.0  # the only CPU peer
    ours = [r for r in report.rows if r.impl == "cupy_bn.numpy"]
    peer = {r.phase: r.median for r in report.rows if r.impl == "numpy.textbook"}
    for row in ours:
        assert row.ratio_to_fastest_peer == pytest.approx(row.median / peer[row.phase])


def test_run_bench_peer_failure_is_a_note_ours_an_error(monkeypatch):
    def broken_setup(case, rng):
        raise RuntimeError("unsupported")

    peer = bench.IMPLEMENTATIONS["numpy.textbook"]
    ours = bench.IMPLEMENTATIONS["cupy_bn.numpy"]
    monkeypatch.setitem(
        bench.IMPLEMENTATIONS,
        "numpy.textbook",
        peer.__class__(**{**peer.__dict__, "setup": broken_setup}),
    )
    monkeypatch.setitem(
        bench.IMPLEMENTATIONS,
        "cupy_bn.numpy",
        ours.__class__(**{**ours.__dict__, "setup": broken_setup}),
    )
    report = bench.run_bench(
        [TINY], ["cupy_bn.numpy", "numpy.textbook"], repeat=1, copy_bytes=1 << 16
    )
    assert report.rows == []
    assert report.errors == ["cupy_bn.numpy on tiny: RuntimeError: unsupported"]
    assert report.notes == ["numpy.textbook on tiny: RuntimeError: unsupported (skipped)"]


def test_run_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown 'nope'"):
        bench.run_bench([TINY], ["nope"])
    with pytest.raises(ValueError, match="phases"):
        bench.run_bench([TINY], ["cupy_bn.numpy"], ["sideways"])
    with pytest.raises(ValueError, match="repeat"):
        bench.run_bench([TINY], ["cupy_bn.numpy"], repeat=0)


def test_simulator_and_bare_kernels_are_not_default_implementations():
    assert {"cupy_bn.sim", "cupy_bn.cuda.kernels"} <= set(bench.IMPLEMENTATIONS)
    assert "cupy_bn.sim" not in bench.DEFAULT_IMPLEMENTATIONS
    assert "cupy_bn.cuda.kernels" not in bench.DEFAULT_IMPLEMENTATIONS
    assert bench.SUITES["default"].implementations == bench.DEFAULT_IMPLEMENTATIONS


def test_default_cases_are_resnet_like_and_dense():
    cases = bench.default_cases("float16")
    assert [(c.shape, c.channel_axis) for c in cases] == [
        ((32, 64, 56, 56), 1),
        ((32, 56, 56, 64), -1),
        ((4096, 1024), -1),
    ]
    assert all(c.dtype == "float16" and c.itemsize == 2 for c in cases)
    assert bench.SUITES["default"].cases("float16") == cases


def test_gpu_case_set_is_resnet50_in_both_layouts_against_the_gpu_peers():
    suite = bench.SUITES["gpu"]
    assert suite.needs_gpu
    assert suite.implementations == (
        "cupy_bn.cuda",
        "cupy_bn.cuda.kernels",
        "cupy.naive",
        "torch.cuda",
        "torch.cuda.cudnn",
    )
    assert suite.dtypes == ("float16", "bfloat16", "float32") and suite.flush_l2
    assert all(bench.IMPLEMENTATIONS[n].device == "gpu" for n in suite.implementations)
    cases = suite.cases("float16")
    assert len(cases) == 18
    assert all(c.dtype == "float16" for c in cases)
    first, first_last = cases[0], cases[1]
    assert (first.name, first.shape, first.channel_axis) == (
        "64x112x112-nchw",
        (256, 64, 112, 112),
        1,
    )
    assert (first_last.shape, first_last.channel_axis) == ((256, 112, 112, 64), -1)
    assert {c.channels for c in cases} == {64, 128, 256, 512, 1024, 2048}
    assert [c.shape for c in bench.gpu_cases(batch=2)][-1] == (2, 7, 7, 2048)


def test_gpu_inputs_at_batch_256_overflow_an_h200_l2():
    """Every input is at least 12 MB at float16: a timed call cannot find it in a 50-60 MB L2
    after the flush, which writes twice the L2 (and the smallest tensors are x plus dy)."""
    smallest = min(c.numel * 2 for c in bench.gpu_cases("float16"))
    assert smallest >= 12 << 20
    flush = bench.l2_flush(np, 1000)
    flush()  # writes a host buffer here; a device buffer on a GPU


def test_cudnn_peer_calls_the_aten_ops_with_their_schemas():
    """The cuDNN peer runs on a GPU only; its calls are checked against the ops' schemas."""
    torch = pytest.importorskip("torch")
    forward = torch.ops.aten.cudnn_batch_norm.default._schema
    backward = torch.ops.aten.cudnn_batch_norm_backward.default._schema
    assert [a.name for a in forward.arguments] == [
        "input", "weight", "bias", "running_mean", "running_var", "training",
        "exponential_average_factor", "epsilon",
    ]  # fmt: skip
    assert len(forward.returns) == 4  # output, save_mean, save_var, reserve
    assert [a.name for a in backward.arguments] == [
        "input", "grad_output", "weight", "running_mean", "running_var", "save_mean",
        "save_var", "epsilon", "reserveSpace",
    ]  # fmt: skip
    reason = bench.IMPLEMENTATIONS["torch.cuda.cudnn"].available()
    assert reason is None or "GPU" in reason


def test_host_inputs_are_drawn_once_per_case_and_vectors_fresh():
    case = bench.BenchCase("t", (4, 3, 5), 1, "float32")
    first = bench._host_inputs(case, np.random.default_rng([0, 0]))
    first["running_mean"] += 1  # a setup updating its running statistics
    again = bench._host_inputs(case, np.random.default_rng([0, 0]))
    assert again["x"] is first["x"] and np.array_equal(again["dy"], first["dy"])
    assert np.array_equal(again["weight"], first["weight"])
    assert np.array_equal(again["running_mean"], np.zeros(3, np.float32))
    other = bench._host_inputs(case, np.random.default_rng([0, 1]))
    assert not np.array_equal(other["x"], first["x"])


def _gpu(monkeypatch, usable: bool) -> None:
    monkeypatch.setattr(bench, "cupy_usable", lambda: usable)


def test_select_implementations(monkeypatch):
    _gpu(monkeypatch, False)
    assert bench.select_implementations() == list(bench.DEFAULT_IMPLEMENTATIONS)
    assert bench.select_implementations(["numpy.textbook", "cupy_bn.numpy", "numpy.textbook"]) == [
        "numpy.textbook",
        "cupy_bn.numpy",
    ]
    # an unavailable peer beside a runnable implementation is left to run_bench's notes
    assert bench.select_implementations(["cupy_bn.numpy", "cupy.naive"]) == [
        "cupy_bn.numpy",
        "cupy.naive",
    ]
    with pytest.raises(ValueError, match="unknown 'fastest'"):
        bench.select_implementations(["fastest"])
    with pytest.raises(ValueError, match="suite must be one of default, gpu; got 'tpu'"):
        bench.select_implementations(suite="tpu")


def test_select_implementations_refuses_what_cannot_run(monkeypatch):
    _gpu(monkeypatch, False)
    with pytest.raises(bench.UnavailableError, match=r"^cupy_bn.cuda cannot run here: no usable"):
        bench.select_implementations(["cupy_bn.numpy", "cupy_bn.cuda"])
    with pytest.raises(bench.UnavailableError, match=r"none of .* \(cupy.naive: no usable GPU"):
        bench.select_implementations(["cupy.naive"])
    with pytest.raises(bench.UnavailableError, match="case set 'gpu' needs a GPU: no usable GPU"):
        bench.select_implementations(suite="gpu")
    _gpu(monkeypatch, True)
    assert bench.select_implementations(suite="gpu") == list(bench.SUITES["gpu"].implementations)


@pytest.mark.parametrize("threads", [1, 3])
def test_copy_bandwidth_is_bytes_moved_over_the_best_time(monkeypatch, threads):
    # a clock under the test's control: each timed copy takes the next of these durations
    durations = iter([0.004, 0.003, 0.0025, 0.005, 0.002, 0.006][: 3 * (1 + (threads > 1))])
    now = [0.0]
    started = [False]

    def perf_counter():
        if started[0]:
            now[0] += next(durations)
        started[0] = not started[0]
        return now[0]

    monkeypatch.setattr(machine, "cpu_threads", lambda: threads)
    monkeypatch.setattr(machine, "time", types.SimpleNamespace(perf_counter=perf_counter))
    nbytes = 1 << 20
    best = 0.002 if threads > 1 else 0.0025
    assert machine.measure_copy_bandwidth(nbytes, repeat=3) == pytest.approx(2 * nbytes / best)
    assert next(durations, None) is None  # every copy was timed, one per repeat and mode


def _fake_cupy(monkeypatch, props, attributes):
    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda device: props,
        deviceGetAttribute=lambda attr, device: attributes[attr],
        getDeviceCount=lambda: 1,
    )
    monkeypatch.setitem(
        __import__("sys").modules,
        "cupy",
        types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)),
    )


def test_device_peak_bandwidth_from_properties(monkeypatch):
    # H100 SXM: 2619 MHz HBM3, 5120-bit bus -> 3.35 TB/s
    _fake_cupy(monkeypatch, {"memoryClockRate": 2_619_000, "memoryBusWidth": 5120}, {})
    assert machine.device_peak_bandwidth(0) == pytest.approx(2 * 2.619e9 * 5120 / 8)


def test_device_peak_bandwidth_from_attributes_when_fields_are_gone(monkeypatch):
    _fake_cupy(monkeypatch, {"name": b"GPU"}, {36: 1_593_000, 37: 5120})
    assert machine.device_peak_bandwidth(0) == pytest.approx(2 * 1.593e9 * 5120 / 8)
    _fake_cupy(monkeypatch, {}, {36: 0, 37: 0})
    assert machine.device_peak_bandwidth(0) is None


def test_gpu_devices_is_empty_without_a_gpu():
    if cupy_usable():
        pytest.skip("a GPU is usable here")
    assert machine.gpu_devices() == []


def test_report_serializes_itself_as_pytest_benchmark_json():
    report = bench.run_bench([TINY], ["cupy_bn.numpy"], ["eval"], repeat=2, copy_bytes=1 << 16)
    payload = report.to_json()
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload  # plain JSON types
    info = payload["machine_info"]
    for key in ("node", "machine", "python_version", "system", "cpu", "cpu_copy_bandwidth"):
        assert key in info
    (entry,) = payload["benchmarks"]
    assert entry["name"] == "eval[tiny-float64-cupy_bn.numpy]"
    assert entry["params"] == {
        "shape": [4, 3, 5, 2],
        "channel_axis": 1,
        "dtype": "float64",
        "phase": "eval",
        "implementation": "cupy_bn.numpy",
    }
    assert entry["options"] == {"timer": "perf_counter", "warmup": 2, "rounds": 2}
    stats = entry["stats"]
    assert len(stats["data"]) == stats["rounds"] == 2
    assert math.isclose(entry["extra_info"]["gbps"], 2 * 120 * 8 / stats["median"] / 1e9)
    assert math.isclose(entry["extra_info"]["moved_gbps"], 2 * 120 * 8 / stats["median"] / 1e9)


def test_report_json_has_no_non_finite_numbers():
    row = _row(median=0.0, limit=math.inf)
    row.stats = bench.timing_stats([0.0, 0.0])
    row.ratio_to_fastest_peer = math.nan
    report = bench.BenchReport(rows=[row], cpu_bandwidth=math.inf)
    payload = report.to_json()
    json.dumps(payload, allow_nan=False)
    extra = payload["benchmarks"][0]["extra_info"]
    assert extra["gbps"] is extra["moved_gbps"] is extra["ratio_to_fastest_peer"] is None
    assert extra["bandwidth_limit"] is None
    assert payload["benchmarks"][0]["stats"]["ops"] is None
    assert payload["machine_info"]["cpu_copy_bandwidth"] is None
    assert isinstance(bench.timing_stats(np.array([0.5, 1.0], np.float32))["data"][0], float)


@pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator toolchain not found")
@pytest.mark.parametrize("case", [TINY, TINY_LAST], ids=lambda c: c.name)
def test_bare_kernel_runners_compute_batch_norm(case):
    """The gpu case set's kernel-launch runners, driven through the simulator backend."""
    inputs = bench._host_inputs(case, np.random.default_rng(0))
    runners = bench._kernels_setup("sim", np.asarray)(case, np.random.default_rng(0))
    x, dy, w, b = inputs["x"], inputs["dy"], inputs["weight"], inputs["bias"]
    axis = case.channel_axis
    want = reference.forward(x, w, b, channel_axis=axis)
    np.testing.assert_allclose(runners["forward_train"](), want, atol=1e-10)
    dx, dw, db = runners["backward"]()
    want_dx, want_dw, want_db = reference.backward(x, dy, w, channel_axis=axis)
    np.testing.assert_allclose(dx, want_dx, atol=1e-10)
    np.testing.assert_allclose(dw, want_dw, atol=1e-10)
    np.testing.assert_allclose(db, want_db, atol=1e-10)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    m = x.size // x.shape[axis]
    mean, unbiased = x.mean(axis=axes), x.var(axis=axes) * m / (m - 1)
    want_eval = reference.forward(
        x, w, b, channel_axis=axis, mean=0.1 * mean, var=0.9 + 0.1 * unbiased
    )
    np.testing.assert_allclose(runners["eval"](), want_eval, atol=1e-10)


def test_bare_kernel_runners_need_fused_statistics():
    with pytest.raises(TypeError, match="'numpy' has no fused train_statistics"):
        bench._kernels_setup("numpy", np.asarray)(TINY, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("shape", "axis", "message"),
    [
        ((4, 3), 0, "not a channel axis"),
        ((4, 3), 2, "channel_axis must be in"),
        ((5,), 0, "rank 2 to 5"),
        ((4, 0, 2), 1, "positive sizes"),
    ],
)
def test_a_case_needs_a_valid_shape_and_a_channel_axis_that_is_not_the_batch(shape, axis, message):
    with pytest.raises(ValueError, match=message):
        bench.BenchCase("x", shape, axis, "float32")
