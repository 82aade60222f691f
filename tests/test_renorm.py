"""Batch renormalization (`renorm=True`) against a float64 NumPy reference of the paper's
formulas written here, on both backends, both layouts and every floating dtype; the
`rmax=1, dmax=0` identity with batch norm; the layers; argument errors; the fused forms; the
double backward against finite differences of the backward; sync batch norm."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import reference as ref
from fake_comm import run_group

import cupy_bn as cbn
from cupy_bn.backends.cuda_backend import simulator_usable
from cupy_bn.dtypes import SUPPORTED

EPS = 1e-5
MOMENTUM = 0.2
BFLOAT16 = next((d for d in SUPPORTED if d.name == "bfloat16"), None)
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)] + (
    [BFLOAT16] if BFLOAT16 is not None else []
)
#: Largest error against the float64 reference, relative to the largest reference value, by
#: dtype: about two roundings to the storage dtype (measured: 5e-16, 4e-7, 5e-4, 4e-3). The
#: running statistics are in the accumulation dtype (float32 for 16-bit input).
TOLERANCE = {"float64": 1e-14, "float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}
RUNNING_TOLERANCE = {"float64": 1e-14, "float32": 5e-7, "float16": 5e-7, "bfloat16": 5e-7}
#: (channel_axis, shape): NCHW and NHWC.
LAYOUTS = [(1, (6, 4, 3, 5)), (-1, (6, 3, 5, 4))]
#: regime -> (rmax, dmax): loose bounds the corrections stay inside, tight ones they exceed.
REGIMES = {"unclipped": (3.0, 5.0), "clipped": (1.25, 0.25)}


def _backends():
    sim = pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")
    return ["numpy", pytest.param("sim", marks=sim)]


# -- the reference ---------------------------------------------------------------------------
def renorm_reference(x, weight, bias, running_mean, running_var, dy, rmax, dmax, axis):
    """Float64 renorm (Ioffe 2017, Algorithm 1, r and d under stop-gradient): y, dx, dweight,
    dbias, the updated running statistics (PyTorch's momentum, unbiased variance), r and d."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = ref.reduce_axes(x.ndim, axis)
    c = x.shape[axis]
    cs = ref.channel_shape(x.ndim, axis, c)
    m = x.size // c
    mu = x.mean(axis=axes)
    var = ((x - mu.reshape(cs)) ** 2).mean(axis=axes)
    sigma_b = np.sqrt(var + EPS)
    rm, rv = (np.asarray(v, np.float64) for v in (running_mean, running_var))
    sigma = np.sqrt(rv + EPS)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mu - rm) / sigma, -dmax, dmax)
    g = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    xhat = (x - mu.reshape(cs)) / sigma_b.reshape(cs)
    y = g.reshape(cs) * (xhat * r.reshape(cs) + d.reshape(cs)) + b.reshape(cs)
    # y = gamma * (r * xhat + d) + beta; dL/dxhat = dy * gamma * r, then the chain rule through
    # the batch mean and variance (r and d constant)
    dxhat = dy * (g * r).reshape(cs)
    xmu = x - mu.reshape(cs)
    dvar = (dxhat * xmu).sum(axis=axes) * -0.5 * sigma_b**-3
    dmu = -(dxhat / sigma_b.reshape(cs)).sum(axis=axes) - 2 * dvar * xmu.sum(axis=axes) / m
    dx = dxhat / sigma_b.reshape(cs) + (2 * dvar.reshape(cs) * xmu + dmu.reshape(cs)) / m
    dweight = (dy * (xhat * r.reshape(cs) + d.reshape(cs))).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    new_rm = (1 - MOMENTUM) * rm + MOMENTUM * mu
    new_rv = (1 - MOMENTUM) * rv + MOMENTUM * var * m / (m - 1)
    return dict(y=y, dx=dx, dweight=dweight, dbias=dbias, rm=new_rm, rv=new_rv, r=r, d=d)


def make_case(shape, axis, dtype, regime, seed=0):
    """Input and running statistics whose corrections stay inside (`unclipped`) or exceed
    (`clipped`) the regime's bounds in every channel."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    cs = ref.channel_shape(len(shape), axis, c)
    loc, scale = rng.uniform(-2, 2, c), rng.uniform(0.5, 2, c)
    x = (rng.standard_normal(shape) * scale.reshape(cs) + loc.reshape(cs)).astype(dtype)
    xs = x.astype(np.float64)
    axes = ref.reduce_axes(len(shape), axis)
    mu, sd = xs.mean(axis=axes), xs.std(axis=axes)
    sign = rng.choice([-1.0, 1.0], c)
    if regime == "unclipped":  # r in (0.8, 1.25) against rmax 3, |d| < 0.3 against dmax 5
        rv = (sd * rng.uniform(0.8, 1.25, c)) ** 2
        rm = mu - sign * rng.uniform(0.05, 0.3, c) * np.sqrt(rv)
    else:  # r = 2 or 1/2 against rmax 1.25, |d| in (1, 2) against dmax 0.25
        rv = (sd * 2.0**sign) ** 2
        rm = mu - sign * rng.uniform(1, 2, c) * np.sqrt(rv)
    acc = np.float64 if dtype == np.float64 else np.float32
    return dict(
        x=x,
        weight=rng.uniform(0.5, 1.5, c).astype(dtype) * sign.astype(dtype),
        bias=rng.standard_normal(c).astype(dtype),
        running_mean=rm.astype(acc),
        running_var=rv.astype(acc),
        dy=rng.standard_normal(shape).astype(dtype),
    )


def run(case, axis, backend="numpy", rmax=3.0, dmax=5.0, **options):
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    y, saved = cbn.batch_norm(
        case["x"], case["weight"], case["bias"], rm, rv, True, MOMENTUM, EPS, axis, backend,
        renorm=True, rmax=rmax, dmax=dmax, **options,
    )  # fmt: skip
    dx, dweight, dbias = cbn.batch_norm_backward(case["dy"], saved)
    return dict(y=y, dx=dx, dweight=dweight, dbias=dbias, rm=rm, rv=rv), saved


def relative_error(got, want) -> float:
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def reference_of(case, axis, rmax, dmax):
    return renorm_reference(
        case["x"], case["weight"], case["bias"], case["running_mean"], case["running_var"],
        case["dy"], rmax, dmax, axis,
    )  # fmt: skip


# -- the reference itself ----------------------------------------------------------------------
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_reference_gradients_are_finite_differences_with_r_and_d_constant(regime):
    axis, shape = 1, (4, 3, 5)
    case = make_case(shape, axis, np.float64, regime, seed=9)
    rmax, dmax = REGIMES[regime]
    want = reference_of(case, axis, rmax, dmax)
    cs = ref.channel_shape(3, axis, 3)
    r, d = want["r"].reshape(cs), want["d"].reshape(cs)

    def formula(x, w=case["weight"], b=case["bias"]):
        return ref.forward(x) * r * w.reshape(cs) + d * w.reshape(cs) + b.reshape(cs)

    dy = case["dy"]
    np.testing.assert_allclose(
        want["dx"], ref.numeric_gradient(formula, case["x"], dy), rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(
        want["dweight"],
        ref.numeric_gradient(lambda w: formula(case["x"], w), case["weight"], dy),
        rtol=1e-6,
    )
    np.testing.assert_allclose(want["y"], formula(case["x"]), atol=1e-12)


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_cases_are_in_their_regime(regime):
    for axis, shape in LAYOUTS:
        case = make_case(shape, axis, np.float32, regime)
        rmax, dmax = REGIMES[regime]
        want = reference_of(case, axis, rmax, dmax)
        at_bound = (np.isclose(want["r"], rmax) | np.isclose(want["r"], 1 / rmax)) & np.isclose(
            np.abs(want["d"]), dmax
        )
        if regime == "clipped":
            assert at_bound.all()
        else:
            assert (np.abs(np.log(want["r"])) < np.log(rmax) / 2).all()
            assert (np.abs(want["d"]) < dmax / 2).all() and (np.abs(want["d"]) > 0.01).all()


# -- against the reference ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
def test_matches_the_float64_reference(axis, shape, dtype, regime, backend):
    case = make_case(shape, axis, dtype, regime, seed=1)
    rmax, dmax = REGIMES[regime]
    got, saved = run(case, axis, backend, rmax, dmax)
    want = reference_of(case, axis, rmax, dmax)
    tol = TOLERANCE[dtype.name]
    for name in ("y", "dx", "dweight", "dbias"):
        assert got[name].dtype == dtype, name
        assert got[name].shape == want[name].shape, name
        assert relative_error(got[name], want[name]) < tol, name
    for name in ("rm", "rv"):  # accumulation-dtype running statistics
        assert relative_error(got[name], want[name]) < RUNNING_TOLERANCE[dtype.name], name
    np.testing.assert_allclose(saved.renorm.r, want["r"], rtol=RUNNING_TOLERANCE[dtype.name])
    np.testing.assert_allclose(saved.renorm.d, want["d"], atol=10 * RUNNING_TOLERANCE[dtype.name])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("missing", [("weight", "bias"), ("weight",), ("bias",)], ids=str)
def test_without_weight_or_bias(axis, shape, backend, missing):
    case = make_case(shape, axis, np.float64, "clipped", seed=2)
    case.update(dict.fromkeys(missing))
    got, _ = run(case, axis, backend, *REGIMES["clipped"])
    want = reference_of(case, axis, *REGIMES["clipped"])
    for name in ("weight", "bias"):
        if name in missing:
            assert got["d" + name] is None, name
        else:
            assert relative_error(got["d" + name], want["d" + name]) < 1e-14, name
    for name in ("y", "dx"):
        assert relative_error(got[name], want[name]) < 1e-14, name


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
def test_rmax_1_dmax_0_is_batch_norm_bit_for_bit(axis, shape, dtype, backend):
    case = make_case(shape, axis, dtype, "clipped", seed=3)
    got, saved = run(case, axis, backend, rmax=1, dmax=0)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    y, plain = cbn.batch_norm(
        case["x"], case["weight"], case["bias"], rm, rv, True, MOMENTUM, EPS, axis, backend
    )
    dx, dweight, dbias = cbn.batch_norm_backward(case["dy"], plain)
    assert (saved.renorm.r == 1).all() and (saved.renorm.d == 0).all()
    for name, want in (("y", y), ("dx", dx), ("dweight", dweight), ("dbias", dbias)):
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    np.testing.assert_array_equal(got["rm"], rm)
    np.testing.assert_array_equal(got["rv"], rv)


def test_inference_mode_ignores_renorm():
    case = make_case((5, 3, 4), 1, np.float64, "clipped", seed=4)
    args = (case["x"], case["weight"], case["bias"], case["running_mean"], case["running_var"])
    y, saved = cbn.batch_norm(*args, training=False, renorm=True, rmax=1.25, dmax=0.25)
    plain, _ = cbn.batch_norm(*args, training=False)
    np.testing.assert_array_equal(y, plain)
    assert saved.renorm is None


def test_the_corrections_use_the_running_statistics_before_the_update():
    """With momentum 1 the updated running statistics are the batch's own: r and d computed
    from them would be 1 and 0."""
    case = make_case((6, 2, 5), 1, np.float64, "clipped", seed=5)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    y, saved = cbn.batch_norm(case["x"], None, None, rm, rv, momentum=1.0, renorm=True)
    want = renorm_reference(case["x"], None, None, case["running_mean"], case["running_var"],
                            case["dy"], 3.0, 5.0, 1)  # fmt: skip
    np.testing.assert_allclose(y, want["y"], atol=1e-12)
    assert np.all(np.abs(saved.renorm.d) > 0.5)


# -- fused forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [np.dtype(np.float64), np.dtype(np.float32)], ids=str)
@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
def test_fused_relu_and_residual(axis, shape, dtype, backend):
    case = make_case(shape, axis, dtype, "clipped", seed=6)
    z = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    y, saved = cbn.batch_norm(
        case["x"], case["weight"], case["bias"], rm, rv, True, MOMENTUM, EPS, axis, backend,
        activation="relu", residual=z, renorm=True, rmax=1.25, dmax=0.25,
    )  # fmt: skip
    dx, dweight, dbias, dz = cbn.batch_norm_backward(case["dy"], saved)
    pre = reference_of(case, axis, 1.25, 0.25)["y"] + z
    mask = pre > 0
    masked = dict(case, dy=np.where(mask, case["dy"], 0).astype(dtype))
    want = reference_of(masked, axis, 1.25, 0.25)
    tol = TOLERANCE[dtype.name]
    assert relative_error(y, np.maximum(pre, 0)) < tol
    for name, got in (("dx", dx), ("dweight", dweight), ("dbias", dbias)):
        assert relative_error(got, want[name]) < tol, name
    np.testing.assert_array_equal(dz, masked["dy"])


# -- errors before state changes ----------------------------------------------------------------
@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(rmax=0.5), ValueError, "rmax must be a finite number >= 1, got 0.5"),
        (dict(rmax=float("inf")), ValueError, "rmax must be a finite number >= 1"),
        (dict(rmax=float("nan")), ValueError, "rmax must be a finite number >= 1"),
        (dict(dmax=-0.1), ValueError, "dmax must be a finite number >= 0, got -0.1"),
        (dict(dmax=float("inf")), ValueError, "dmax must be a finite number >= 0"),
        (dict(rmax="3"), TypeError, "rmax must be a real number, got str"),
        (dict(dmax=True), TypeError, "dmax must be a real number, got bool"),
        (dict(renorm=1), TypeError, "renorm must be a bool, got int"),
    ],
)
def test_bad_options_raise_naming_them_before_any_update(options, error, match):
    case = make_case((5, 3, 4), 1, np.float32, "clipped", seed=8)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    with pytest.raises(error, match=match):
        cbn.batch_norm(case["x"], None, None, rm, rv, **{"renorm": True, **options})
    np.testing.assert_array_equal(rm, case["running_mean"])
    np.testing.assert_array_equal(rv, case["running_var"])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("axis,shape", [(1, (7, 3, 4)), (-1, (7, 2, 3))], ids=str)
@pytest.mark.parametrize("regime", ["clipped", "unclipped"])
def test_ghost_batches_renormalize_each_chunk_against_the_running_statistics(
    axis, shape, regime, backend
):
    """Chunks of 3, 3 and 1 samples: each chunk is the float64 renorm of those samples against
    the running statistics before the call; the running statistics are those of ghost batches
    without renorm (one update per call)."""
    case = make_case(shape, axis, np.float64, regime, seed=8)
    rmax, dmax = (1.25, 0.25) if regime == "clipped" else (3.0, 5.0)
    got, _ = run(case, axis, backend, rmax, dmax, virtual_batch=3)
    plain = dict(case)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    cbn.batch_norm(case["x"], None, None, rm, rv, True, MOMENTUM, EPS, axis, virtual_batch=3)
    np.testing.assert_allclose(got["rm"], rm, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(got["rv"], rv, rtol=1e-14, atol=1e-14)
    for start in range(0, shape[0], 3):
        rows = slice(start, start + 3)
        chunk = {k: (v[rows] if k in ("x", "dy") else v) for k, v in plain.items()}
        want = reference_of(chunk, axis, rmax, dmax)
        for key in ("y", "dx"):
            assert relative_error(got[key][rows], want[key]) < 1e-9, key  # chunk of 1: tiny dx
    sums = [reference_of({k: (v[s : s + 3] if k in ("x", "dy") else v) for k, v in plain.items()},
                         axis, rmax, dmax) for s in range(0, shape[0], 3)]  # fmt: skip
    for key in ("dweight", "dbias"):
        assert relative_error(got[key], sum(w[key] for w in sums)) < 1e-12, key


def test_ghost_renorm_errors_come_before_any_update():
    case = make_case((6, 3, 4), 1, np.float32, "clipped", seed=8)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    rv[1] = np.nan
    with pytest.raises(ValueError, match="running_var must be finite for renorm"):
        cbn.batch_norm(case["x"], None, None, rm, rv, renorm=True, virtual_batch=2)
    with pytest.raises(ValueError, match="rmax must be a finite number >= 1"):
        cbn.batch_norm(case["x"], None, None, rm, rv, renorm=True, rmax=0.5, virtual_batch=2)
    np.testing.assert_array_equal(rm, case["running_mean"])
    layer = cbn.BatchNorm1d(3, renorm=True, virtual_batch=4)  # accepted
    assert "virtual_batch=4, renorm=True" in repr(layer)


def test_renorm_needs_running_statistics():
    x = np.random.default_rng(0).standard_normal((5, 3))
    with pytest.raises(ValueError, match="renorm=True needs running statistics"):
        cbn.batch_norm(x, renorm=True)
    with pytest.raises(ValueError, match="renorm=True needs running statistics"):
        cbn.BatchNorm1d(3, track_running_stats=False, renorm=True)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    "name,value,match",
    [("running_var", np.nan, "running_var must be finite for renorm, got NaN or Inf in "
      "channel\\(s\\) 1"), ("running_mean", np.inf, "running_mean must be finite"),
     ("running_var", -1.0, "running_var must be >= 0 for renorm")],
)  # fmt: skip
def test_bad_running_statistics_raise_before_any_update(name, value, match, backend):
    case = make_case((5, 3, 4), 1, np.float32, "clipped", seed=8)
    running = {"running_mean": case["running_mean"].copy(), "running_var": case["running_var"]}
    running["running_var"] = running["running_var"].copy()
    running[name][1] = value
    before = {k: v.copy() for k, v in running.items()}
    with pytest.raises(ValueError, match=match):
        cbn.batch_norm(case["x"], None, None, **running, backend=backend, renorm=True)
    for k, v in running.items():
        np.testing.assert_array_equal(v, before[k])


# -- layers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
def test_layer_steps_follow_the_reference_and_attribute_changes_take_effect(axis, shape, backend):
    rng = np.random.default_rng(10)
    c = shape[axis]
    bn = cbn.BatchNorm2d(
        c, momentum=MOMENTUM, channel_axis=axis, dtype=np.float64, backend=backend,
        renorm=True, rmax=1.0, dmax=0.0,
    )  # fmt: skip
    bn.params["weight"][:] = rng.uniform(0.5, 1.5, c)
    bn.params["bias"][:] = rng.standard_normal(c)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    schedule = [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]  # a warm-up ramp
    for step, (rmax, dmax) in enumerate(schedule):
        bn.rmax, bn.dmax = rmax, dmax
        x = rng.normal(3.0, 2.0, shape)
        dy = rng.standard_normal(shape)
        y = bn(x)
        dx = bn.backward(dy)
        want = renorm_reference(x, bn.weight, bn.bias, rm, rv, dy, rmax, dmax, axis)
        np.testing.assert_allclose(y, want["y"], atol=1e-12, err_msg=f"step {step}")
        np.testing.assert_allclose(dx, want["dx"], atol=1e-12, err_msg=f"step {step}")
        np.testing.assert_allclose(bn.grads["weight"], want["dweight"], atol=1e-11)
        np.testing.assert_allclose(bn.grads["bias"], want["dbias"], atol=1e-11)
        np.testing.assert_allclose(bn.running_mean, want["rm"], rtol=1e-13)
        np.testing.assert_allclose(bn.running_var, want["rv"], rtol=1e-13)
        if step:  # the bounds changed the result: the plain batch norm of this step differs
            plain = renorm_reference(x, bn.weight, bn.bias, rm, rv, dy, 1.0, 0.0, axis)
            assert np.max(np.abs(plain["y"] - want["y"])) > 0.1
        rm, rv = want["rm"], want["rv"]
    assert bn.num_batches_tracked == len(schedule)
    assert sorted(bn.state_dict()) == [
        "bias", "num_batches_tracked", "running_mean", "running_var", "weight",
    ]  # fmt: skip
    bn.eval()
    x = rng.normal(3.0, 2.0, shape)
    np.testing.assert_allclose(
        bn(x), ref.forward(x, bn.weight, bn.bias, EPS, axis, bn.running_mean, bn.running_var),
        atol=1e-12,
    )  # fmt: skip


def test_layer_attribute_errors_leave_the_state_alone():
    bn = cbn.BatchNorm1d(3, renorm=True)
    x = np.random.default_rng(11).standard_normal((8, 3)).astype(np.float32)
    bn(x)
    state = bn.state_dict()
    bn.rmax = 0.9
    with pytest.raises(ValueError, match="rmax must be a finite number >= 1, got 0.9"):
        bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    with pytest.raises(ValueError, match="dmax must be a finite number >= 0"):
        cbn.BatchNorm2d(3, renorm=True, dmax=-1)
    assert "renorm=True, rmax=0.9, dmax=5.0" in repr(bn)
    assert "renorm" not in repr(cbn.BatchNorm1d(3))


# -- double backward -----------------------------------------------------------------------------
def _fixed_corrections_backward(case, axis, saved0, x, weight, dy):
    """`batch_norm_backward` at `(x, weight, dy)` with the r and d of `saved0`."""
    _, saved = cbn.batch_norm(
        x, weight, case["bias"], case["running_mean"].copy(), case["running_var"].copy(),
        True, MOMENTUM, EPS, axis, renorm=True,
    )  # fmt: skip
    return cbn.batch_norm_backward(dy, dataclasses.replace(saved, renorm=saved0.renorm))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("axis,shape", [(1, (3, 2, 4)), (-1, (5, 2))], ids=["NCS", "MC"])
def test_double_backward_matches_differences_of_the_backward(axis, shape, regime, backend):
    case = make_case(shape, axis, np.float64, regime, seed=12)
    rmax, dmax = REGIMES[regime]
    rng = np.random.default_rng(13)
    ddx, ddw, ddb = rng.standard_normal(shape), rng.standard_normal(2), rng.standard_normal(2)
    _, saved = run(case, axis, backend, rmax, dmax)
    gx, gw, gdy = cbn.batch_norm_double_backward(ddx, ddw, ddb, case["dy"], saved)
    x, w, dy = case["x"], case["weight"], case["dy"]

    def loss(x_, w_, dy_):
        dx, dweight, dbias = _fixed_corrections_backward(case, axis, saved, x_, w_, dy_)
        return np.sum(ddx * dx) + np.sum(ddw * dweight) + np.sum(ddb * dbias)

    for got, at, f in (
        (gx, x, lambda v: loss(v, w, dy)),
        (gw, w, lambda v: loss(x, v, dy)),
        (gdy, dy, lambda v: loss(x, w, v)),
    ):
        numeric = ref.numeric_gradient(f, at, 1.0)
        np.testing.assert_allclose(got, numeric, rtol=1e-5, atol=1e-7)


def test_double_backward_with_rmax_1_dmax_0_is_batch_norms():
    case = make_case((4, 3, 5), 1, np.float64, "clipped", seed=14)
    rng = np.random.default_rng(15)
    ddx, ddw, ddb = rng.standard_normal((4, 3, 5)), rng.standard_normal(3), rng.standard_normal(3)
    _, saved = run(case, 1, rmax=1.0, dmax=0.0)
    _, plain = cbn.batch_norm(case["x"], case["weight"], case["bias"], backend="numpy")
    for got, want in zip(
        cbn.batch_norm_double_backward(ddx, ddw, ddb, case["dy"], saved),
        cbn.batch_norm_double_backward(ddx, ddw, ddb, case["dy"], plain),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layer", [cbn.BatchNorm1d, cbn.BatchNorm3d])
def test_every_layer_class_takes_the_options(layer):
    rng = np.random.default_rng(17)
    shape = (6, 3, 4) if layer is cbn.BatchNorm1d else (2, 3, 2, 3, 2)
    bn = layer(3, dtype=np.float64, momentum=MOMENTUM, renorm=True, rmax=1.25, dmax=0.25)
    bn.buffers["running_mean"][:] = [4.0, -4.0, 0.5]
    bn.buffers["running_var"][:] = [0.1, 9.0, 1.0]
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    want = renorm_reference(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, dy,
                            1.25, 0.25, 1)  # fmt: skip
    np.testing.assert_allclose(bn(x), want["y"], atol=1e-12)
    np.testing.assert_allclose(bn.backward(dy), want["dx"], atol=1e-12)
    np.testing.assert_allclose(bn.grads["weight"], want["dweight"], atol=1e-12)


# -- sync batch norm -----------------------------------------------------------------------------
def test_sync_functional_form_and_double_backward_are_those_of_the_concatenated_batch():
    sizes, axis = [3, 0, 4], 1
    case = make_case((sum(sizes), 3, 5), axis, np.float64, "clipped", seed=18)
    rng = np.random.default_rng(19)
    ddx, ddw, ddb = rng.standard_normal(case["x"].shape), *rng.standard_normal((2, 3))
    bounds = np.cumsum([0, *sizes])
    rmax, dmax = REGIMES["clipped"]

    def work(comm):
        rank = slice(bounds[comm.rank], bounds[comm.rank + 1])
        rm, rv = case["running_mean"].copy(), case["running_var"].copy()
        y, saved = cbn.sync_batch_norm(
            case["x"][rank], case["weight"], case["bias"], rm, rv, True, MOMENTUM, EPS,
            comm=comm, renorm=True, rmax=rmax, dmax=dmax,
        )  # fmt: skip
        dx, dw, _ = cbn.batch_norm_backward(case["dy"][rank], saved)
        second = cbn.batch_norm_double_backward(ddx[rank], ddw, ddb, case["dy"][rank], saved)
        return y, dx, dw, second

    results = run_group(len(sizes), work)
    want = reference_of(case, axis, rmax, dmax)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), want["y"], atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), want["dx"], atol=1e-12)
    np.testing.assert_allclose(sum(r[2] for r in results), want["dweight"], atol=1e-11)
    # every rank's ddweight is the same: the cotangent of the summed dweight is ddweight, and
    # the local ddbias of each share of dbias sums to the whole batch's
    _, whole = run(case, axis, "numpy", rmax, dmax)
    gx, gw, gdy = cbn.batch_norm_double_backward(ddx, ddw, ddb, case["dy"], whole)
    np.testing.assert_allclose(np.concatenate([r[3][0] for r in results]), gx, atol=1e-10)
    np.testing.assert_allclose(sum(r[3][1] for r in results), gw, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([r[3][2] for r in results]), gdy, atol=1e-10)


@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
def test_sync_batch_norm_equals_renorm_of_the_concatenated_batch(axis, shape):
    sizes = [2, 0, 3, 1]
    case = make_case((sum(sizes), *shape[1:]), axis, np.float64, "clipped", seed=16)
    bounds = np.cumsum([0, *sizes])
    rmax, dmax = REGIMES["clipped"]

    def part(a, rank):
        return a[bounds[rank] : bounds[rank + 1]]

    def work(comm):
        bn = cbn.SyncBatchNorm(
            shape[axis], momentum=MOMENTUM, channel_axis=axis, dtype=np.float64, comm=comm,
            renorm=True, rmax=rmax, dmax=dmax,
        )  # fmt: skip
        bn.params["weight"][:] = case["weight"]
        bn.params["bias"][:] = case["bias"]
        bn.buffers["running_mean"][:] = case["running_mean"]
        bn.buffers["running_var"][:] = case["running_var"]
        y = bn(part(case["x"], comm.rank))
        dx = bn.backward(part(case["dy"], comm.rank))
        return y, dx, bn.grads["weight"].copy(), bn.grads["bias"].copy(), bn.state_dict()

    results = run_group(len(sizes), work)
    want = reference_of(case, axis, rmax, dmax)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), want["y"], atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), want["dx"], atol=1e-12)
    np.testing.assert_allclose(sum(r[2] for r in results), want["dweight"], atol=1e-11)
    np.testing.assert_allclose(sum(r[3] for r in results), want["dbias"], atol=1e-11)
    for r in results:
        np.testing.assert_allclose(r[4]["running_mean"], want["rm"], rtol=1e-13)
        np.testing.assert_allclose(r[4]["running_var"], want["rv"], rtol=1e-13)


def test_convert_sync_batchnorm_keeps_the_renorm_options():
    from fake_comm import ThreadComm, _Group

    bn = cbn.BatchNorm2d(3, renorm=True, rmax=2.0, dmax=1.0)
    sync = cbn.convert_sync_batchnorm(bn, ThreadComm(_Group(1, 1.0), 0))
    assert (sync.renorm, sync.rmax, sync.dmax) == (True, 2.0, 1.0)


def test_a_bad_bound_on_one_process_changes_nothing_anywhere():
    """A process whose rmax is refused raises its own error, the others RemoteFailure, before
    the statistics all-reduce; no process's state changes."""
    x = np.random.default_rng(20).standard_normal((4, 3, 2))

    def work(comm):
        bn = cbn.SyncBatchNorm(3, dtype=np.float64, comm=comm, renorm=True)
        state = bn.state_dict()
        if comm.rank == 1:
            bn.rmax = 0.5
        try:
            bn(x)
        except Exception as exc:  # each process's own outcome, checked below
            outcome = exc
        else:
            outcome = None
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)
        return outcome

    outcomes = run_group(3, work)
    assert isinstance(outcomes[1], ValueError) and "rmax must be" in str(outcomes[1])
    for rank in (0, 2):
        assert isinstance(outcomes[rank], cbn.RemoteFailure) and outcomes[rank].ranks == [1]


@pytest.mark.parametrize("backend", _backends())
def test_float16_layer_state(backend):
    """A float16 layer: float16 parameters and running statistics, r and d in float32 from
    the running statistics as stored."""
    rng = np.random.default_rng(21)
    bn = cbn.BatchNorm2d(3, channel_axis=-1, dtype=np.float16, backend=backend, renorm=True,
                         rmax=1.25, dmax=0.25, momentum=MOMENTUM)  # fmt: skip
    bn.buffers["running_mean"][:] = [1.0, -1.0, 0.25]
    bn.buffers["running_var"][:] = [0.2, 6.0, 1.5]
    bn.params["weight"][:] = [0.5, -1.5, 1.0]
    x = rng.normal(0.5, 1.5, (4, 3, 5, 3)).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    want = renorm_reference(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, dy,
                            1.25, 0.25, -1)  # fmt: skip
    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == dx.dtype == bn.grads["weight"].dtype == np.float16
    for name, got in (("y", y), ("dx", dx), ("dweight", bn.grads["weight"])):
        assert relative_error(got, want[name]) < TOLERANCE["float16"], name
    for name, got in (("rm", bn.running_mean), ("rv", bn.running_var)):  # float16 storage
        assert relative_error(got, want[name]) < 1e-3, name


@pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")
def test_a_backend_that_defers_its_checks_reads_no_running_statistics_back():
    """The CUDA backend's deferred checks (`cupy_bn.deferred`), in the simulator: renorm adds no
    read-back to the forward, so a NaN running variance gives NaN in its channel only; with
    deferral off the same call raises before any update. The results agree otherwise."""
    from cupy_bn import deferred
    from cupy_bn.backends.cuda_backend import CudaBackend

    backend = CudaBackend.for_simulator(defers_checks=True)
    case = make_case((5, 3, 4), 1, np.float32, "clipped", seed=22)
    rv = case["running_var"].copy()
    rv[1] = np.nan
    previous = deferred.set_deferred_checks(True)
    try:
        rm = case["running_mean"].copy()
        y, _ = cbn.batch_norm(case["x"], None, None, rm, rv.copy(), backend=backend, renorm=True)
        assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
        want = reference_of(dict(case, weight=None, bias=None), 1, 3.0, 5.0)["y"]
        assert relative_error(y[:, [0, 2]], want[:, [0, 2]]) < TOLERANCE["float32"]
        deferred.set_deferred_checks(False)
        rm, bad = case["running_mean"].copy(), rv.copy()
        with pytest.raises(ValueError, match="running_var must be finite for renorm"):
            cbn.batch_norm(case["x"], None, None, rm, bad, backend=backend, renorm=True)
        np.testing.assert_array_equal(rm, case["running_mean"])
    finally:
        deferred.set_deferred_checks(previous)
        deferred.check_errors()
