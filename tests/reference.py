"""Independent float64 references: the textbook batch-norm formulas, and finite differences."""

from __future__ import annotations

import numpy as np


def reduce_axes(ndim: int, channel_axis: int) -> tuple[int, ...]:
    axis = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != axis)


def channel_shape(ndim: int, channel_axis: int, channels: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[channel_axis % ndim] = channels
    return tuple(shape)


def forward(x, weight=None, bias=None, eps=1e-5, channel_axis=1, mean=None, var=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with batch statistics unless given."""
    x = np.asarray(x, np.float64)
    axes = reduce_axes(x.ndim, channel_axis)
    cs = channel_shape(x.ndim, channel_axis, x.shape[channel_axis % x.ndim])
    if mean is None:
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(cs)) ** 2).mean(axis=axes)
    y = (x - np.reshape(mean, cs)) / np.sqrt(np.reshape(var, cs) + eps)
    if weight is not None:
        y = y * np.reshape(np.asarray(weight, np.float64), cs)
    if bias is not None:
        y = y + np.reshape(np.asarray(bias, np.float64), cs)
    return y


def backward(x, dy, weight=None, eps=1e-5, channel_axis=1):
    """Training-mode gradients from the closed form in Ioffe & Szegedy (2015)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = reduce_axes(x.ndim, channel_axis)
    c = x.shape[channel_axis % x.ndim]
    cs = channel_shape(x.ndim, channel_axis, c)
    m = x.size // c
    mean = x.mean(axis=axes).reshape(cs)
    var = ((x - mean) ** 2).mean(axis=axes).reshape(cs)
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * invstd
    gamma = np.ones(cs) if weight is None else np.reshape(np.asarray(weight, np.float64), cs)
    dxhat = dy * gamma
    dx = (
        invstd
        / m
        * (
            m * dxhat
            - dxhat.sum(axis=axes).reshape(cs)
            - xhat * (dxhat * xhat).sum(axis=axes).reshape(cs)
        )
    )
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def numeric_gradient(f, x, dy, h=1e-6):
    """Central differences of sum(f(x) * dy) with respect to every element of x (float64)."""
    x = np.array(x, np.float64)
    grad = np.empty_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = np.sum(f(x) * dy)
        flat[i] = old - h
        down = np.sum(f(x) * dy)
        flat[i] = old
        g[i] = (up - down) / (2 * h)
    return grad
