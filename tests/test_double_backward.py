"""`batch_norm_double_backward`: the gradients of the backward's outputs.

Checked against PyTorch's double backward (`torch.autograd.grad(..., create_graph=True)`
through `F.batch_norm`) in float64, against central differences of `batch_norm_backward` (no
torch), on offset float32 data, on float16 / bfloat16 input against float64, on the simulator
backend, under sync batch norm on fake processes, and for bad arguments.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as ref
from fake_comm import Counting, run_group

import cupy_bn as cbn
from cupy_bn.backends.cuda_backend import simulator_usable
from cupy_bn.distributed import RemoteFailure, SyncReducer, sync_batch_norm
from cupy_bn.dtypes import BFLOAT16
from cupy_bn.layout import canonical

COTANGENTS = ("ddx", "ddweight", "ddbias")

#: (shape, channel_axis, channels-last memory): ranks 2-5, NCS and MC views.
LAYOUTS = [
    ((6, 3), 1, False),  # MC (dense)
    ((4, 3, 5), 1, False),  # NCS
    ((3, 4, 2, 5), 1, False),  # NCHW
    ((2, 3, 2, 2, 3), 1, False),  # NCDHW
    ((4, 5, 3), -1, False),  # MC
    ((3, 2, 4, 3), -1, False),  # NHWC
    ((3, 4, 2, 5), 1, True),  # NCHW with channels-last memory: MC
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-axis{a}{'-cl' if cl else ''}" for s, a, cl in LAYOUTS]
AFFINE = {"affine": (True, True), "none": (False, False), "weight": (True, False)}
AFFINE["bias"] = (False, True)


def _channels_last(a: np.ndarray) -> np.ndarray:
    """The same logical NCHW array with NHWC memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def make_case(shape, channel_axis, channels_last=False, affine="affine", seed=0, loc=1.0):
    """Float64 data of one case: x, weight, bias, running statistics, dy and the cotangents."""
    rng = np.random.default_rng(seed)
    c = shape[channel_axis]
    cs = ref.channel_shape(len(shape), channel_axis, c)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, cs) + loc * rng.uniform(-2, 2, cs)
    dy, ddx = rng.standard_normal(shape), rng.standard_normal(shape)
    if channels_last:
        x, dy, ddx = _channels_last(x), _channels_last(dy), _channels_last(ddx)
    with_weight, with_bias = AFFINE[affine]
    return {
        "x": x,
        "weight": rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c) if with_weight else None,
        "bias": rng.standard_normal(c) if with_bias else None,
        "running": (rng.uniform(-1.0, 1.0, c), rng.uniform(0.5, 2.0, c)),
        "dy": dy,
        "ddx": ddx,
        "ddweight": rng.standard_normal(c) if with_weight else None,
        "ddbias": rng.standard_normal(c) if with_bias else None,
    }


def ours(case, training, channel_axis, given=COTANGENTS, backend="numpy"):
    running = tuple(r.copy() for r in case["running"])
    _, saved = cbn.batch_norm(
        case["x"],
        case["weight"],
        case["bias"],
        *running,
        training=training,
        channel_axis=channel_axis,
        backend=backend,
    )
    cotangents = [case[n] if n in given else None for n in COTANGENTS]
    return cbn.batch_norm_double_backward(*cotangents, case["dy"], saved)


def torch_double_backward(case, training, channel_axis, given=COTANGENTS, eps=1e-5):
    """`(gx, gweight, gdy)` by PyTorch's autograd, float64 (zeros where torch has no path)."""
    import torch
    import torch.nn.functional as F

    def leaf(a):
        return None if a is None else torch.tensor(np.array(a, np.float64), requires_grad=True)

    x, weight, bias, dy = (leaf(case[n]) for n in ("x", "weight", "bias", "dy"))
    rm, rv = (torch.tensor(r.copy()) for r in case["running"])
    axis = channel_axis % x.ndim
    # A constant weight of ones where there is none: PyTorch's double backward leaves the
    # ddbias term out of gdy when F.batch_norm has a bias but no weight (gdy = ddbias exactly,
    # which the finite-difference test below confirms for our result).
    ones = torch.ones(x.shape[axis], dtype=torch.float64)
    scale = ones if weight is None else weight
    y = F.batch_norm(x.movedim(axis, 1), rm, rv, scale, bias, training, 0.1, eps)
    y = y.movedim(1, axis)
    leaves = {"x": x, "weight": weight, "bias": bias}
    names = [n for n, t in leaves.items() if t is not None]
    first = torch.autograd.grad(y, [leaves[n] for n in names], dy, create_graph=True)
    grads = dict(zip(names, first, strict=True))
    loss = torch.zeros((), dtype=torch.float64)
    for name, grad in (("ddx", "x"), ("ddweight", "weight"), ("ddbias", "bias")):
        if name in given and case[name] is not None:
            loss = loss + (grads[grad] * torch.tensor(case[name])).sum()
    wrt = [x, dy] + ([weight] if weight is not None else [])
    found = (
        torch.autograd.grad(loss, wrt, allow_unused=True)
        if loss.requires_grad
        else [None] * len(wrt)
    )
    out = [
        np.zeros(t.shape) if g is None else g.detach().numpy()
        for g, t in zip(found, wrt, strict=True)
    ]
    return out[0], (out[2] if weight is not None else None), out[1]


def assert_close(got, want, rtol, what=""):
    """max |got - want| <= rtol * max(1, max |want|), in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bound = rtol * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _given_sets(affine):
    with_weight, with_bias = AFFINE[affine]
    names = ["ddx"] + (["ddweight"] if with_weight else []) + (["ddbias"] if with_bias else [])
    return [s for k in range(len(names) + 1) for s in itertools.combinations(names, k)]


TORCH_CASES = [
    pytest.param(affine, given, id=f"{affine}-{'+'.join(given) or 'nothing'}")
    for affine in AFFINE
    for given in _given_sets(affine)
]


# -- against PyTorch ----------------------------------------------------------------------------
@pytest.mark.parametrize("affine,given", TORCH_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channel_axis,channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_matches_torch_double_backward(shape, channel_axis, channels_last, training, affine, given):
    pytest.importorskip("torch")
    case = make_case(shape, channel_axis, channels_last, affine)
    gx, gweight, gdy = ours(case, training, channel_axis, given)
    want_gx, want_gweight, want_gdy = torch_double_backward(case, training, channel_axis, given)
    assert_close(gx, want_gx, 1e-12, "gx")
    assert_close(gdy, want_gdy, 1e-12, "gdy")
    if case["weight"] is None:
        assert gweight is None
    else:
        assert_close(gweight, want_gweight, 1e-12, "gweight")


# -- against finite differences of batch_norm_backward -------------------------------------------
def _loss(case, training, channel_axis, x, weight, dy):
    """`L2 = sum(ddx * dx) + sum(ddweight * dweight) + sum(ddbias * dbias)` at (x, weight, dy)."""
    running = tuple(r.copy() for r in case["running"])
    _, saved = cbn.batch_norm(
        x, weight, case["bias"], *running, training=training, channel_axis=channel_axis
    )
    dx, dweight, dbias = cbn.batch_norm_backward(dy, saved)
    total = np.sum(case["ddx"] * dx)
    if dweight is not None:
        total += np.sum(case["ddweight"] * dweight)
    if dbias is not None:
        total += np.sum(case["ddbias"] * dbias)
    return total


@pytest.mark.parametrize("affine", ["affine", "none", "bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channel_axis,channels_last", LAYOUTS[:2] + LAYOUTS[4:5])
def test_matches_finite_differences_of_the_backward(
    shape, channel_axis, channels_last, training, affine
):
    case = make_case(shape, channel_axis, channels_last, affine, seed=1)
    gx, gweight, gdy = ours(case, training, channel_axis)
    x, weight, dy = case["x"], case["weight"], case["dy"]

    def loss(**at):
        args = {"x": x, "weight": weight, "dy": dy, **at}
        return _loss(case, training, channel_axis, args["x"], args["weight"], args["dy"])

    numeric_gx = ref.numeric_gradient(lambda v: loss(x=v), x, 1.0)
    numeric_gdy = ref.numeric_gradient(lambda v: loss(dy=v), dy, 1.0)
    assert_close(gx, numeric_gx, 1e-6, "gx")
    assert_close(gdy, numeric_gdy, 1e-6, "gdy")
    if weight is not None:
        numeric_gweight = ref.numeric_gradient(lambda v: loss(weight=v), weight, 1.0)
        assert_close(gweight, numeric_gweight, 1e-6, "gweight")


def test_gx_sums_to_zero_per_channel_in_training():
    """Shifting a channel of x by a constant changes neither dx nor dweight: sum(gx) = 0."""
    case = make_case((5, 3, 7), 1, seed=2, loc=50.0)
    gx, _, _ = ours(case, True, 1)
    sums = gx.sum(axis=(0, 2))
    assert np.max(np.abs(sums)) < 1e-10 * np.abs(gx).sum()


# -- numerics -------------------------------------------------------------------------------------
def _float64_reference(case, training, channel_axis):
    """The double backward of the float64 copy of a case (the float64 path, checked above)."""
    as64 = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in case.items()}
    as64["running"] = tuple(np.asarray(r, np.float64) for r in case["running"])
    return ours(as64, training, channel_axis)


def _cast(case, dtype):
    out = {k: (None if v is None else v.astype(dtype)) for k, v in case.items() if k != "running"}
    out["running"] = tuple(r.astype(np.float32) for r in case["running"])
    return out


def _backends():
    sim = pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")
    return ["numpy", pytest.param("sim", marks=sim)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channel_axis", [((16, 3, 256), 1), ((4096, 3), -1)])
def test_float32_offset_data_stays_accurate(shape, channel_axis, training, backend):
    """Mean 1e4, std 1, through the public function. The float32 results differ from the
    float64 ones of the same data by the rounding of the float32 mean (half an ulp of 1e4,
    5e-4, shifts `x - mean` as it shifts the forward's output), not by lost sums."""
    rng = np.random.default_rng(3)
    case = _cast(make_case(shape, channel_axis, seed=3), np.float32)
    case["x"] = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    case["running"] = (np.full(3, 1e4, np.float32), np.ones(3, np.float32))
    got = ours(case, training, channel_axis, backend=backend)
    want = _float64_reference(case, training, channel_axis)
    for g, w, what in zip(got, want, ("gx", "gweight", "gdy"), strict=True):
        assert g.dtype == np.float32, what
        assert_close(g, w, 2e-4, what)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape,channel_axis", [((16, 3, 256), 1), ((4096, 3), -1)])
def test_float32_offset_data_sums_are_centred(shape, channel_axis, backend):
    """`double_backward_reduce` on mean 1e4, std 1 data: each sum within 1e-7 of float64,
    relative to `sqrt(sum(a**2) * sum(b**2))` for `sum(a * b)`, where float32 sums of `ddx * x`
    less `mean * sum(ddx)` are more than a hundred times further off."""
    rng = np.random.default_rng(12)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy, ddx = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    view = canonical(x, channel_axis)
    be = cbn.get_backend(backend, x)
    mean, _ = be.batch_stats(view)
    sums = be.double_backward_reduce(view.match(dy, "dy"), view, view.match(ddx, "ddx"), mean)
    axes = ref.reduce_axes(len(shape), channel_axis)
    cs = ref.channel_shape(len(shape), channel_axis, shape[channel_axis])
    x64, dy64, ddx64 = (a.astype(np.float64) for a in (x, dy, ddx))
    xmu = x64 - np.asarray(mean, np.float64).reshape(cs)

    def error(got, a, b):
        scale = np.sqrt((a * a).sum(axis=axes) * (b * b).sum(axis=axes))
        return float(np.max(np.abs(np.asarray(got, np.float64) - (a * b).sum(axis=axes)) / scale))

    for got, (a, b) in zip(
        sums[1:], [(dy64, xmu), (ddx64, 1.0), (ddx64, xmu), (ddx64, dy64)], strict=True
    ):
        assert error(got, a, np.broadcast_to(b, a.shape)) < 1e-7
    naive = (ddx * x).sum(axis=axes, dtype=np.float32) - np.asarray(mean).reshape(-1) * (
        ddx.sum(axis=axes, dtype=np.float32)
    )
    assert error(naive, ddx64, xmu) > 1e-5


LOW_PRECISION = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: d.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channel_axis", [((8, 3, 40), 1), ((300, 5), -1)])
def test_low_precision_input_against_float64(shape, channel_axis, training, dtype, backend):
    """float16 / bfloat16 tensors accumulate in float32: the results are the float64 ones to
    a few of the storage dtype's ulps."""
    case = _cast(make_case(shape, channel_axis, seed=4), dtype)
    got = ours(case, training, channel_axis, backend=backend)
    want = _float64_reference(case, training, channel_axis)
    tol = {"float16": 4e-3, "bfloat16": 3e-2}[dtype.name]
    for g, w, what in zip(got, want, ("gx", "gweight", "gdy"), strict=True):
        assert g.dtype == dtype, what
        assert_close(g, w, tol, what)


@pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")
@pytest.mark.parametrize("given", [COTANGENTS, ("ddweight", "ddbias")], ids=["all", "no-ddx"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channel_axis,channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_sim_backend_matches_numpy(shape, channel_axis, channels_last, training, given):
    case = make_case(shape, channel_axis, channels_last, seed=5)
    got = ours(case, training, channel_axis, given, backend="sim")
    want = ours(case, training, channel_axis, given)
    for g, w, what in zip(got, want, ("gx", "gweight", "gdy"), strict=True):
        assert_close(g, w, 1e-12, what)


# -- outputs ------------------------------------------------------------------------------------
def test_outputs_keep_shape_dtype_and_memory_order():
    case = make_case((3, 4, 2, 5), 1, True, seed=6)
    case32 = _cast(case, np.float32)
    _, saved = cbn.batch_norm(case32["x"], case32["weight"], case32["bias"])
    dx, _, _ = cbn.batch_norm_backward(case32["dy"], saved)
    gx, gweight, gdy = cbn.batch_norm_double_backward(
        case32["ddx"], case32["ddweight"], case32["ddbias"], case32["dy"], saved
    )
    for g in (gx, gdy):
        assert g.shape == (3, 4, 2, 5) and g.dtype == np.float32
        assert g.strides == dx.strides  # channels-last memory, as x
    assert gweight.dtype == np.float32 and gweight.shape == (4,)
    gdy16 = cbn.batch_norm_double_backward(None, None, None, case32["dy"].astype(np.float16), saved)
    assert gdy16[0].dtype == np.float32 and gdy16[2].dtype == np.float16


def test_nothing_given_is_zero():
    case = make_case((4, 3, 5), 1, seed=7)
    gx, gweight, gdy = ours(case, True, 1, given=())
    assert not gx.any() and not gweight.any() and not gdy.any()


# -- bad arguments ------------------------------------------------------------------------------
def _saved(weight=True, bias=True):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 5))
    _, saved = cbn.batch_norm(x, np.ones(3) if weight else None, np.zeros(3) if bias else None)
    return x, saved


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"ddx": np.zeros((4, 3, 6))}, ValueError, r"ddx must have the input's shape \(4, 3, 5\)"),
        ({"ddx": [[0.0]]}, TypeError, "ddx must be a NumPy or CuPy array, got list"),
        ({"ddx": np.zeros((4, 3, 5), np.int32)}, TypeError, "ddx must have a floating dtype"),
        ({"dy": np.zeros((3, 5))}, ValueError, "dy must have the input's shape"),
        ({"dy": None}, TypeError, "dy must be a NumPy or CuPy array, got NoneType"),
        ({"ddweight": np.zeros(4)}, ValueError, r"ddweight must have shape \(3,\)"),
        ({"ddbias": np.zeros((3, 1))}, ValueError, r"ddbias must have shape \(3,\)"),
        ({"ddweight": np.zeros(3, np.int64)}, TypeError, "ddweight must have a floating dtype"),
        ({"ddbias": 1.0}, TypeError, "ddbias must be a NumPy or CuPy array, got float"),
        ({"saved": (1, 2)}, TypeError, "saved must be the SavedForBackward that batch_norm"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, message):
    x, saved = _saved()
    args = {"ddx": x, "ddweight": None, "ddbias": None, "dy": x, "saved": saved, **change}
    with pytest.raises(error, match=message):
        cbn.batch_norm_double_backward(**args)


@pytest.mark.parametrize("name", ["ddweight", "ddbias"])
def test_cotangent_of_a_missing_parameter_is_refused(name):
    x, saved = _saved(weight=False, bias=False)
    args = {"ddx": None, "ddweight": None, "ddbias": None, name: np.zeros(3)}
    with pytest.raises(ValueError, match=f"{name} must be None: the forward had no"):
        cbn.batch_norm_double_backward(**args, dy=x, saved=saved)


# -- sync batch norm ----------------------------------------------------------------------------
SIZES = [3, 0, 5, 2]


def _slices(a, sizes):
    bounds = np.cumsum([0, *sizes])
    return [a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("same_ddweight", [True, False], ids=["same-ddweight", "own-ddweight"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channel_axis", [((10, 3, 4), 1), ((10, 2, 3, 3), -1)])
def test_sync_batch_norm_is_exact_for_the_global_batch(
    shape, channel_axis, training, same_ddweight
):
    """Each fake process holds a slice of the batch (one holds none). gx and gdy are the
    processes' parts of the single-process result on the whole batch, and their gweight shares
    sum to it. With a ddweight of its own per process (each the cotangent of its share of
    dweight), the reference is `L2 = sum_p sum(ddx_p * dx_p) + ddweight_p * dweight_p + ...`
    by PyTorch on the whole batch."""
    case = make_case(shape, channel_axis, seed=9)
    c = shape[channel_axis]
    rng = np.random.default_rng(10)
    own = [case["ddweight"] if same_ddweight else rng.standard_normal(c) for _ in SIZES]
    own_bias = [case["ddbias"] if same_ddweight else rng.standard_normal(c) for _ in SIZES]
    parts = {n: _slices(case[n], SIZES) for n in ("x", "dy", "ddx")}

    def process(comm):
        r = comm.rank
        running = tuple(v.copy() for v in case["running"])
        _, saved = sync_batch_norm(
            parts["x"][r],
            case["weight"],
            case["bias"],
            *running,
            training=training,
            channel_axis=channel_axis,
            comm=SyncReducer(Counting(comm), c),
        )
        calls = saved.reducer.comm.calls
        out = cbn.batch_norm_double_backward(
            parts["ddx"][r], own[r], own_bias[r], parts["dy"][r], saved
        )
        return out, saved.reducer.comm.calls - calls

    results = run_group(len(SIZES), process)
    assert {calls for _, calls in results} == {4 if training else 0}
    gx = np.concatenate([out[0] for out, _ in results])
    gweight = sum(out[1] for out, _ in results)
    gdy = np.concatenate([out[2] for out, _ in results])
    if same_ddweight:
        want = ours(case, training, channel_axis)
        want_gweight = want[1]
    else:
        want = _per_process_reference(case, training, channel_axis, own, own_bias)
        want_gweight = want[1]
    assert_close(gx, want[0], 1e-12, "gx")
    assert_close(gdy, want[2], 1e-12, "gdy")
    assert_close(gweight, want_gweight, 1e-12, "gweight")


def _per_process_reference(case, training, channel_axis, ddweights, ddbiases):
    """`(gx, gweight, gdy)` of `sum_p [sum(ddx_p * dx_p) + ddweight_p * dweight_p + ddbias_p *
    dbias_p]`, dweight_p and dbias_p the sums over process p's slice, by PyTorch."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x, weight, bias, dy = (
        torch.tensor(case[n], requires_grad=True) for n in ("x", "weight", "bias", "dy")
    )
    rm, rv = (torch.tensor(r.copy()) for r in case["running"])
    axis = channel_axis % x.ndim
    xhat = F.batch_norm(x.movedim(axis, 1), rm, rv, None, None, training, 0.1, 1e-5)
    xhat = xhat.movedim(1, axis)
    y = (xhat.movedim(axis, -1) * weight + bias).movedim(-1, axis)
    (dx,) = torch.autograd.grad(y, (x,), dy, create_graph=True)
    others = tuple(a for a in range(x.ndim) if a != axis)
    loss = (dx * torch.tensor(case["ddx"])).sum()
    bounds = np.cumsum([0, *SIZES])
    for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        dweight_p = (dy[lo:hi] * xhat[lo:hi]).sum(dim=others)
        dbias_p = dy[lo:hi].sum(dim=others)
        loss = loss + (dweight_p * torch.tensor(ddweights[p])).sum()
        loss = loss + (dbias_p * torch.tensor(ddbiases[p])).sum()
    gx, gweight, gdy = torch.autograd.grad(loss, (x, weight, dy))
    return gx.detach().numpy(), gweight.detach().numpy(), gdy.detach().numpy()


def test_sync_batch_norm_failure_on_one_process_reaches_every_process():
    case = make_case((8, 3, 4), 1, seed=11)
    parts = {n: _slices(case[n], [4, 4]) for n in ("x", "dy", "ddx")}

    def process(comm):
        _, saved = sync_batch_norm(parts["x"][comm.rank], case["weight"], comm=comm)
        ddx = parts["ddx"][comm.rank] if comm.rank == 0 else np.zeros((1, 2))
        try:
            cbn.batch_norm_double_backward(ddx, None, None, parts["dy"][comm.rank], saved)
        except (RemoteFailure, ValueError) as exc:
            return type(exc).__name__
        return "returned"

    assert run_group(2, process) == ["RemoteFailure", "ValueError"]
