"""BatchNorm1d/2d/3d: modes, running statistics, parameters and state dicts."""

import numpy as np
import pytest
import reference as ref

import cupy_bn as cbn


def test_layer_training_step_matches_reference_and_updates_state():
    rng = np.random.default_rng(0)
    bn = cbn.BatchNorm2d(3, dtype=np.float64)
    bn.params["weight"][:] = [1.0, 2.0, 0.5]
    bn.params["bias"][:] = [0.0, -1.0, 3.0]
    x = rng.normal(1, 2, (4, 3, 5, 5))
    y = bn(x)
    np.testing.assert_allclose(y, ref.forward(x, bn.weight, bn.bias), atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1))
    assert bn.num_batches_tracked == 1
    dy = rng.normal(size=x.shape)
    dx = bn.backward(dy)
    rdx, rdw, rdb = ref.backward(x, dy, bn.weight)
    np.testing.assert_allclose(dx, rdx, atol=1e-11)
    np.testing.assert_allclose(bn.grads["weight"], rdw, atol=1e-11)
    np.testing.assert_allclose(bn.grads["bias"], rdb, atol=1e-11)


def test_params_and_grads_are_the_live_arrays():
    bn = cbn.BatchNorm1d(4)
    x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    bn(x)
    bn.backward(np.ones_like(x) + x)
    w = bn.weight
    before = w.copy()
    for k in bn.params:
        bn.params[k] -= 0.1 * bn.grads[k]
    assert bn.weight is w and not np.allclose(before, bn.weight)


def test_momentum_none_is_a_cumulative_average():
    rng = np.random.default_rng(2)
    bn = cbn.BatchNorm1d(3, momentum=None, dtype=np.float64)
    batches = [rng.normal(i, 1 + i, (10, 3)) for i in range(5)]
    for x in batches:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([b.mean(0) for b in batches], 0))
    np.testing.assert_allclose(bn.running_var, np.mean([b.var(0, ddof=1) for b in batches], 0))
    assert bn.num_batches_tracked == 5


def test_eval_mode_uses_running_stats_and_leaves_them_alone():
    rng = np.random.default_rng(3)
    bn = cbn.BatchNorm3d(2, dtype=np.float64)
    for _ in range(3):
        bn(rng.normal(2, 3, (2, 2, 3, 3, 3)))
    state = bn.state_dict()
    bn.eval()
    x = rng.normal(size=(1, 2, 2, 2, 2))  # a single sample is fine in eval mode
    y = bn(x)
    np.testing.assert_allclose(
        y, ref.forward(x, bn.weight, bn.bias, mean=bn.running_mean, var=bn.running_var), atol=1e-12
    )
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    dy = rng.normal(size=x.shape)
    cs = (1, 2, 1, 1, 1)
    np.testing.assert_allclose(
        bn.backward(dy), dy * (bn.weight / np.sqrt(bn.running_var + bn.eps)).reshape(cs)
    )


def test_without_running_stats_eval_uses_batch_statistics():
    rng = np.random.default_rng(4)
    bn = cbn.BatchNorm1d(3, track_running_stats=False, affine=False, dtype=np.float64).eval()
    x = rng.normal(5, 2, (6, 3, 4))
    np.testing.assert_allclose(bn(x), ref.forward(x), atol=1e-12)
    assert bn.running_mean is None and bn.state_dict() == {}
    assert bn.params == {} and bn.grads == {}


def test_channels_last_layer():
    rng = np.random.default_rng(5)
    bn = cbn.BatchNorm2d(3, channel_axis=-1, dtype=np.float64)
    x = rng.normal(size=(2, 4, 4, 3))
    np.testing.assert_allclose(bn(x), ref.forward(x, channel_axis=-1), atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(axis=(0, 1, 2)))


def test_state_dict_round_trip_uses_pytorch_names():
    rng = np.random.default_rng(6)
    a = cbn.BatchNorm2d(3)
    a(rng.normal(size=(4, 3, 2, 2)).astype(np.float32))
    state = a.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert state["num_batches_tracked"].dtype == np.int64
    b = cbn.BatchNorm2d(3)
    b.load_state_dict(state)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    state["weight"][:] = 7  # a copy: the layer is not aliased to the dict it returned
    assert not np.any(a.weight == 7)


def test_matches_pytorch_layer_over_several_steps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    ours = cbn.BatchNorm2d(4, momentum=0.3, dtype=np.float64)
    theirs = torch.nn.BatchNorm2d(4, momentum=0.3).double()
    for _ in range(3):
        x = rng.normal(1, 2, (3, 4, 5, 5))
        dy = rng.normal(size=x.shape)
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(dy))
        np.testing.assert_allclose(ours(x), ty.detach().numpy(), atol=1e-10)
        np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(ours.grads["weight"], theirs.weight.grad.numpy(), atol=1e-10)
        theirs.weight.grad = None
        theirs.bias.grad = None
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), rtol=1e-12)


def test_repr_states_options():
    assert repr(cbn.BatchNorm1d(5, momentum=None)) == (
        "BatchNorm1d(5, eps=1e-05, momentum=None, affine=True, track_running_stats=True, "
        "channel_axis=1)"
    )
