"""The properties the batch-norm literature states, checked on generated inputs."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cupy_bn as cbn

settings.register_profile("cupy_bn", deadline=None, max_examples=40)
settings.load_profile("cupy_bn")

shapes = st.one_of(
    st.tuples(st.integers(2, 9), st.integers(1, 5)),
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 6)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(2, 5)),
)


def sample(shape, seed, loc=0.0, scale=1.0, channel_axis=1):
    assume(np.prod(shape) // shape[channel_axis % len(shape)] >= 2)  # a valid training batch
    return np.random.default_rng(seed).normal(loc, scale, shape)


def channel_moments(y, channel_axis):
    axes = tuple(a for a in range(y.ndim) if a != channel_axis % y.ndim)
    return y.mean(axis=axes), y.var(axis=axes)


@given(
    shapes,
    st.sampled_from([1, -1]),
    st.integers(0, 2**31),
    st.floats(-1e3, 1e3),
    st.floats(1e-2, 1e2),
)
def test_training_output_has_zero_mean_unit_variance(shape, channel_axis, seed, loc, scale):
    x = sample(shape, seed, loc, scale, channel_axis)
    eps = 1e-5
    y, _ = cbn.batch_norm(x, eps=eps, channel_axis=channel_axis)
    mean, var = channel_moments(y, channel_axis)
    xvar = channel_moments(x, channel_axis)[1]
    np.testing.assert_allclose(mean, 0, atol=1e-9)
    np.testing.assert_allclose(var, xvar / (xvar + eps), rtol=1e-9)  # 1 up to eps


@given(
    st.integers(2, 12),
    st.integers(1, 4),
    st.integers(1, 5),
    st.floats(0.01, 100.0),
    st.integers(0, 2**31),
)
def test_invariant_to_scaling_the_preceding_weights(batch, n_in, n_out, alpha, seed):
    rng = np.random.default_rng(seed)
    a, w, dy = (
        rng.normal(size=(batch, n_in)),
        rng.normal(size=(n_in, n_out)),
        rng.normal(size=(batch, n_out)),
    )
    eps = 1e-30  # negligible next to any variance here, so the invariance holds to rounding

    def forward_backward(weights):
        y, saved = cbn.batch_norm(a @ weights, eps=eps)
        dz, _, _ = cbn.batch_norm_backward(dy, saved)
        return y, a.T @ dz  # gradient w.r.t. the preceding weights

    y1, g1 = forward_backward(w)
    y2, g2 = forward_backward(alpha * w)
    z = a @ w
    ok = z.std(axis=0) > 1e-6 * np.abs(z).max(initial=1.0)
    np.testing.assert_allclose(y2[:, ok], y1[:, ok], atol=1e-6)
    # gradient scale: |a| * |dy| * batch / std(z); rounding noise is relative to it
    unit = np.abs(a).max() * np.abs(dy).max() * batch / z.std(axis=0)[ok].min()
    np.testing.assert_allclose(g2[:, ok], g1[:, ok] / alpha, atol=1e-9 * unit / alpha)


@given(shapes, st.sampled_from([1, -1]), st.integers(0, 2**31))
def test_a_bias_before_batch_norm_cancels(shape, channel_axis, seed):
    x = sample(shape, seed, channel_axis=channel_axis)
    c = shape[channel_axis % len(shape)]
    shift = np.random.default_rng(seed + 1).normal(0, 10, c)
    cs = [1] * len(shape)
    cs[channel_axis % len(shape)] = c
    y1, _ = cbn.batch_norm(x, channel_axis=channel_axis)
    y2, _ = cbn.batch_norm(x + shift.reshape(cs), channel_axis=channel_axis)
    np.testing.assert_allclose(y2, y1, atol=1e-7)


@given(shapes, st.sampled_from([1, -1]), st.integers(0, 2**31))
def test_gamma_sqrt_var_beta_mean_recovers_the_input(shape, channel_axis, seed):
    x = sample(shape, seed, 3.0, 2.0, channel_axis)
    eps = 1e-5
    mean, var = channel_moments(x, channel_axis)
    y, _ = cbn.batch_norm(x, np.sqrt(var + eps), mean, eps=eps, channel_axis=channel_axis)
    np.testing.assert_allclose(y, x, atol=1e-9)
