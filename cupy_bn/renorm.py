"""Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

Training output, per channel:

    y = gamma * ((x - mean_B) / sigma_B * r + d) + beta
    sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1 / rmax, rmax)
    d = clip((mean_B - running_mean) / sigma, -dmax, dmax)

`mean_B` and `var_B` are the batch statistics (biased variance; those of the global batch under
sync batch norm), `running_mean` and `running_var` the running statistics as they were before
the call updated them. `r` and `d` are computed in the accumulation dtype (float32, float64 for
float64 input) and are constants of the backward, as in the paper. The running statistics are
updated as in plain batch norm (PyTorch's momentum, unbiased variance); inference is plain
batch norm with the running statistics. `rmax=1, dmax=0` gives `r = 1`, `d = 0`: batch norm
bit for bit. With ghost batches (`virtual_batch`, `cupy_bn.ghost`) each chunk is
renormalized with its own statistics against the running statistics as they were before the
call (one `RenormPrior` for all chunks), and the running statistics are updated once, by
ghost batches' rule.

Composition: renorm is batch norm with the effective weight `gamma * r` and bias
`beta + gamma * d`, so the forward is the primitive `apply` with
`scale = gamma * r * invstd`, `shift = beta + gamma * (d - r * mean * invstd)`; the backward of
`x` is batch norm's (`backward_reduce`, `backward_apply`) with `gamma * r` in place of `gamma`;
`dgamma = r * sum(dy * xhat) + d * sum(dy)`, `dbeta = sum(dy)`. The backward's outputs are
those of batch norm at `gamma' = gamma * r` with `dgamma = r * dgamma' + d * dbeta`, so the
double backward is batch norm's at `gamma'` with the cotangents `ddgamma' = r * ddgamma`,
`ddbeta' = ddbeta + d * ddgamma`, and `ggamma = r * ggamma'`.

Defaults `rmax=3`, `dmax=5` are the values the paper ramps to and trains with after its
warm-up. Chainer's `BatchRenormalization` has no defaults (both are required); Keras's
`renorm_clipping=None` leaves `r` and `d` unclipped, which lets the first steps, whose running
statistics are still the initial 0 and 1, rescale the batch by any factor. The paper's warm-up
(`rmax=1, dmax=0`, batch norm, for the first steps, then a ramp) is the caller's: the layers'
`rmax` and `dmax` attributes may be changed between steps. As in the paper and Chainer, `r`
and `d` use the layer's one pair of running statistics (Keras keeps a second pair for them,
with its own `renorm_momentum`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from cupy_bn.arrays import array_module, to_host
from cupy_bn.validation import type_name

Array = Any

__all__ = [
    "DEFAULT_DMAX",
    "DEFAULT_RMAX",
    "PLAIN",
    "RenormCorrection",
    "RenormPrior",
    "check_renorm_options",
    "renorm_prior",
]

#: The paper's values after its warm-up (see the module docstring).
DEFAULT_RMAX = 3.0
DEFAULT_DMAX = 5.0
#: The options `(renorm, rmax, dmax)` of plain batch norm with the default bounds: a caller
#: that passes this very tuple skips their checks (the common call, kept cheap).
PLAIN = (False, DEFAULT_RMAX, DEFAULT_DMAX)


def _check_bound(name: str, value: object, low: float) -> float:
    """`value` as a float when it is a real number, finite and `>= low`."""
    if type(value) is float and low <= value < math.inf:  # the common case
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type_name(value)}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


def check_renorm_options(
    renorm: object, rmax: object, dmax: object, has_running_stats: bool = True
) -> tuple[bool, float, float]:
    """`(renorm, rmax, dmax)` checked: `renorm` a bool, `rmax` finite and >= 1, `dmax` finite
    and >= 0, and, when `renorm`, running statistics present (`has_running_stats`)."""
    if not isinstance(renorm, (bool, np.bool_)):
        raise TypeError(f"renorm must be a bool, got {type_name(renorm)}")
    rmax = _check_bound("rmax", rmax, 1.0)
    dmax = _check_bound("dmax", dmax, 0.0)
    if renorm and not has_running_stats:
        raise ValueError(
            "renorm=True needs running statistics (running_mean and running_var, "
            "track_running_stats=True): r and d are computed from them"
        )
    return bool(renorm), rmax, dmax


@dataclass(frozen=True, slots=True)
class RenormCorrection:
    """`r` and `d` of one training forward: `(C,)` vectors in the accumulation dtype."""

    r: Array
    d: Array

    def effective_affine(
        self, weight: Array | None, bias: Array | None, acc: Any
    ) -> tuple[Array, Array]:
        """`(gamma * r, beta + gamma * d)` in `acc` (gamma 1 and beta 0 when absent)."""
        if weight is None:
            gamma_r, gamma_d = self.r, self.d
        else:
            gamma = weight.astype(acc, copy=False)
            gamma_r, gamma_d = gamma * self.r, gamma * self.d
        return gamma_r, gamma_d if bias is None else bias.astype(acc, copy=False) + gamma_d

    def backward_gamma(self, gamma: Array) -> Array:
        """The weight batch norm's backward of `x` takes: `gamma * r`."""
        return gamma * self.r

    def weight_gradient(self, sum_dy: Array, sum_dy_xmu: Array, invstd: Array) -> Array:
        """`dgamma = r * sum(dy * xhat) + d * sum(dy)`, `xhat = (x - mean) * invstd`."""
        return self.r * (sum_dy_xmu * invstd) + self.d * sum_dy

    def double_backward_terms(
        self, gamma: Array, ddgamma: Array, ddbeta: Array
    ) -> tuple[Array, Array, Array]:
        """Batch norm's double-backward arguments `(gamma * r, r * ddgamma,
        ddbeta + d * ddgamma)` from renorm's (float64 vectors)."""
        r, d = self.r.astype(np.float64), self.d.astype(np.float64)
        return gamma * r, r * ddgamma, ddbeta + d * ddgamma

    def weight_double_gradient(self, ggamma: Array) -> Array:
        """Renorm's `ggamma` from batch norm's at `gamma * r`: `r * ggamma`."""
        return self.r.astype(np.float64) * ggamma


@dataclass(frozen=True, slots=True)
class RenormPrior:
    """The running statistics before a training forward's update (copies in the accumulation
    dtype) and the clipping bounds: what `r` and `d` are computed from."""

    running_mean: Array
    running_var: Array
    rmax: float
    dmax: float

    def correction(self, mean: Array, var: Array, eps: float) -> RenormCorrection:
        """`r` and `d` for the batch statistics `mean`, `var` (biased), in their dtype."""
        xp = array_module(mean)
        sigma = xp.sqrt(self.running_var + eps)
        r = xp.clip(xp.sqrt(var + eps) / sigma, 1.0 / self.rmax, self.rmax)
        d = xp.clip((mean - self.running_mean) / sigma, -self.dmax, self.dmax)
        return RenormCorrection(r.astype(mean.dtype, copy=False), d.astype(mean.dtype, copy=False))


def renorm_prior(
    options: tuple[object, object, object],
    training: bool,
    running_mean: Array | None,
    running_var: Array | None,
    acc: Any,
    check_values: bool = True,
) -> RenormPrior | None:
    """The `RenormPrior` of a training forward with `options = (renorm, rmax, dmax)`; None
    without renorm or in inference mode (plain batch norm). Raises naming the argument before
    any state changes: bad options, no running statistics, and, when `check_values`, running
    statistics that are not finite or a negative running variance. That check reads device
    values back, so a backend that defers its checks so as not to wait for the device
    (`cupy_bn.deferred`, the CUDA backend) skips it: there, non-finite running statistics (or
    a negative running variance) give non-finite outputs and gradients in their channels, as
    they do in inference mode."""
    renorm, rmax, dmax = check_renorm_options(*options, running_mean is not None)
    if not renorm or not training:
        return None
    mean, var = running_mean.astype(acc), running_var.astype(acc)  # copies: updated later
    if not check_values:
        return RenormPrior(mean, var, rmax, dmax)
    xp = array_module(mean)
    for name, v in (("running_mean", mean), ("running_var", var)):
        if not bool(xp.isfinite(v).all()):
            bad = (~to_host(xp.isfinite(v))).nonzero()[0]
            raise ValueError(
                f"{name} must be finite for renorm, got NaN or Inf in channel(s) "
                + ", ".join(str(int(c)) for c in bad[:10])
            )
    if bool((var < 0).any()):
        raise ValueError("running_var must be >= 0 for renorm, got a negative value")
    return RenormPrior(mean, var, rmax, dmax)
