"""Finite-difference checks of batch norm's gradients, in the spirit of `torch.autograd.gradcheck`.

For each case (shape, channel axis, train/eval mode, affine on/off, backend) the input is float64
and the scalar loss is `L = sum(y * g)` for a fixed random `g`. The analytic gradients are
`batch_norm_backward(g, saved)`; the numeric ones are central differences
`(L(t + h) - L(t - h)) / (2h)` of `batch_norm` in float64. A gradient passes when every entry
satisfies `|numeric - analytic| <= atol + rtol * |numeric|` (torch's defaults: `h = 1e-6`,
`atol = 1e-5`, `rtol = 1e-3`). The forward output is also compared, with the same tolerance,
to the float64 formula `(x - mean) / sqrt(var + eps) * weight + bias`.

The relative error reported is the quantity that criterion bounds: per entry
`|numeric - analytic| / (|numeric| + atol / rtol)`, which is at most `rtol` exactly when the
entry passes. So a comparison passes if and only if its `max_rel_error <= rtol`, and the
summary's worst relative error is above `rtol` if and only if some comparison failed.

The random data of a case (input, parameters, statistics, `g`, fast mode's directions) is a
function of the seed and the case without its backend (`case_rng`): every backend is checked
on the same numbers, whichever other cases or backends run beside it.

Channels of batch norm are independent, so one forward evaluation perturbs one element in every
channel at once and reads the loss channel by channel: `2 * (values per channel)` evaluations
give the whole gradient of `x`, and two each give those of `weight` and `bias`. A forward that
leaked between channels would show up as a mismatch here and in the forward comparison.
Fast mode compares, per channel, derivatives along two random directions `u` with
`sum(dx * u)`, as `torch.autograd.gradcheck(fast_mode=True)` does.

Second order (`order=2`, `GradcheckCase.order`): the same central differences, of
`batch_norm_backward` instead of `batch_norm`, check `batch_norm_double_backward`. For fixed
random cotangents `ddx`, `ddweight`, `ddbias` the loss is
`L2 = sum(ddx * dx) + sum(ddweight * dweight) + sum(ddbias * dbias)` of the backward at
`(x, weight, dy)`, and the double backward's `(gx, gweight, gdy)` are compared with its
numeric derivatives with respect to `x` (`"x"`), `weight` (`"weight"`, affine cases) and `dy`
(`"dy"`). `L2` is a sum over channels of per-channel terms too, so the same one-value-per-channel
perturbations apply: `2 * (values per channel)` backward evaluations for each of `x` and `dy`.

Ghost batches (`GradcheckCase.virtual_batch`, `cupy_bn.ghost`): the forward and backward run with
`virtual_batch=G`, and the forward is compared with the same textbook formula applied to each
chunk of `G` samples along axis 0 on its own (`reference_forward`). Chunks are as independent
as channels, so the perturbations above still read every derivative. A shape whose batch does
not divide by `G` checks the shorter last chunk. First order only: the double backward does not
take ghost batches.

Batch renormalization (`GradcheckCase.renorm`, training mode, without ghost batches): the
running statistics are drawn around the batch's so that `r` and `d` (`cupy_bn.renorm`) stay
inside the bounds (`"unclipped"`: `rmax=3, dmax=5`, `r` within 0.8 and 1.25, `|d| <= 0.3`) or
exceed them in every channel (`"clipped"`: `rmax=1.25, dmax=0.25`, `r = 2` or `1/2`,
`|d| >= 1`). `r` and `d` are constants of the backward, so the numeric derivatives are those of
the float64 renorm formula `gamma * ((x - mean_B) / sigma_B * r + d) + beta` with `r` and `d`
held at the values of the unperturbed input (`reference_corrections`); the forward output is
compared with that formula too. Second order: central differences of `batch_norm_backward` with
`r` and `d` held at the unperturbed forward's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import cupy_bn.backends as backend_registry
from cupy_bn import double_backward, functional
from cupy_bn.arrays import to_host
from cupy_bn.jsonable import finite_or_none
from cupy_bn.validation import check_positive_finite, check_seed

#: Default matrix: one small shape per rank (ranks 2 to 5).
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((6, 3), (3, 4, 5), (2, 3, 3, 4), (2, 2, 3, 2, 3))
CHANNEL_AXES: tuple[int, ...] = (1, -1)
#: Random directions per case in fast mode.
FAST_DIRECTIONS = 2
MODES: tuple[str, ...] = ("train", "eval")
#: Derivative orders checked: 1 (`batch_norm_backward`), 2 (`batch_norm_double_backward`).
ORDERS: tuple[int, ...] = (1, 2)
#: Batch renormalization: None (batch norm), or the regime of `r` and `d` with its
#: `(rmax, dmax)` (module docstring).
RENORM_BOUNDS: dict[str, tuple[float, float]] = {"unclipped": (3.0, 5.0), "clipped": (1.25, 0.25)}
RENORMS: tuple[str | None, ...] = (None, *RENORM_BOUNDS)


@dataclass(frozen=True)
class GradcheckCase:
    """One configuration to check."""

    shape: tuple[int, ...]
    channel_axis: int
    mode: str
    """"train" (batch statistics) or "eval" (fixed running statistics)."""
    affine: bool
    backend: str
    order: int = 1
    """1: `batch_norm_backward` against `batch_norm`; 2: `batch_norm_double_backward` against
    `batch_norm_backward`."""
    virtual_batch: int | None = None
    """Ghost batches of this many samples (`cupy_bn.ghost`); None: off."""
    renorm: str | None = None
    """None: batch norm; "clipped" or "unclipped": batch renormalization (train mode) with
    `r` and `d` beyond or inside their bounds."""

    @property
    def name(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return (
            f"{self.backend} {self.mode} {dims} axis={self.channel_axis} "
            f"{'affine' if self.affine else 'no-affine'}"
            + (f" order={self.order}" if self.order != 1 else "")
            + (f" virtual_batch={self.virtual_batch}" if self.virtual_batch is not None else "")
            + (f" renorm={self.renorm}" if self.renorm is not None else "")
        )


@dataclass(frozen=True)
class Comparison:
    """Largest errors of one output (forward `y`) or gradient (`x`, `weight`, `bias`)."""

    max_abs_error: float
    """Largest `|numeric - analytic|`."""
    max_rel_error: float
    """Largest `|numeric - analytic| / (|numeric| + atol / rtol)`; passes when `<= rtol`."""
    passed: bool

    def to_json(self) -> dict[str, Any]:
        """`max_abs_error`, `max_rel_error` (None when not finite) and `passed`."""
        return {
            "max_abs_error": finite_or_none(self.max_abs_error),
            "max_rel_error": finite_or_none(self.max_rel_error),
            "passed": self.passed,
        }


def _worst(values: Iterable[float], default: float) -> float:
    """The largest value; NaN if any is NaN (unlike `max`, whatever the order)."""
    values = list(values)
    if any(np.isnan(v) for v in values):
        return float("nan")
    return max(values, default=default)


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one case: a `Comparison` per checked quantity, or the error it raised."""

    case: GradcheckCase
    comparisons: dict[str, Comparison]
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.comparisons.values())

    @property
    def max_abs_error(self) -> float:
        return _worst((c.max_abs_error for c in self.comparisons.values()), float("nan"))

    @property
    def max_rel_error(self) -> float:
        return _worst((c.max_rel_error for c in self.comparisons.values()), float("nan"))

    def to_json(self) -> dict[str, Any]:
        """The case's fields, the outcome, and each comparison under `checks`."""
        case = self.case
        return {
            "name": case.name,
            "backend": case.backend,
            "shape": list(case.shape),
            "channel_axis": case.channel_axis,
            "mode": case.mode,
            "affine": case.affine,
            "order": case.order,
            "virtual_batch": case.virtual_batch,
            "renorm": case.renorm,
            "passed": self.passed,
            "error": self.error,
            "max_abs_error": finite_or_none(self.max_abs_error),
            "max_rel_error": finite_or_none(self.max_rel_error),
            "checks": {name: c.to_json() for name, c in self.comparisons.items()},
        }


@dataclass
class GradcheckResult:
    """All cases of a `gradcheck` run. Truthy when every case passed."""

    cases: list[CaseResult] = field(default_factory=list)
    step: float = 1e-6
    atol: float = 1e-5
    rtol: float = 1e-3
    eps: float = 1e-5
    seed: int = 0
    fast: bool = False

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    @property
    def max_rel_error(self) -> float:
        """Worst relative error of the cases that ran (0 when none did): at most `rtol`
        exactly when each of them passed."""
        return _worst((c.max_rel_error for c in self.cases if c.error is None), 0.0)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        failed = len(self.failures)
        state = "passed" if self.passed else "FAILED"
        return (
            f"gradcheck {state}: {len(self.cases) - failed}/{len(self.cases)} cases passed, "
            f"worst relative error {self.max_rel_error:.2e} (atol={self.atol:g}, "
            f"rtol={self.rtol:g}, h={self.step:g})"
        )

    def to_json(self) -> dict[str, Any]:
        """`ok`, `summary`, the options of the run and every case (`CaseResult.to_json`)."""
        return {
            "ok": self.passed,
            "summary": self.summary(),
            "step": self.step,
            "atol": self.atol,
            "rtol": self.rtol,
            "eps": self.eps,
            "seed": self.seed,
            "fast": self.fast,
            "cases": [c.to_json() for c in self.cases],
        }


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, (str, bool, int)) or value is None:
        return (value,)
    return tuple(value)


def build_cases(
    shapes: Iterable[Sequence[int]] | None = None,
    channel_axes: int | Iterable[int] = CHANNEL_AXES,
    modes: str | Iterable[str] = MODES,
    affine: bool | Iterable[bool] = (True, False),
    backends: str | Iterable[str] = ("numpy",),
    order: int | Iterable[int] = 1,
    virtual_batch: int | None | Iterable[int | None] = None,
    renorm: str | None | Iterable[str | None] = None,
) -> list[GradcheckCase]:
    """The cross product of the options, validated (`ValueError` naming the option).

    Every backend must be one that can run here (`cupy_bn.backends.available_backends()`);
    `order` is 1, 2 or several of them; `virtual_batch` None (plain batch norm), a ghost-batch
    size, or several of them (first order only; in training mode every chunk of every shape
    needs two values per channel).
    `renorm` is None, "clipped", "unclipped" or several of them, the last two in mode "train"
    and without ghost batches only (other combinations are left out).
    """
    shape_list = [tuple(int(d) for d in s) for s in (DEFAULT_SHAPES if shapes is None else shapes)]
    axes, mode_list = _as_tuple(channel_axes), _as_tuple(modes)
    affine_list, backend_list = _as_tuple(affine), _as_tuple(backends)
    order_list, renorm_list = _as_tuple(order), _as_tuple(renorm)
    ghost_list = _as_tuple(virtual_batch)
    for name, values in (
        ("shapes", shape_list),
        ("channel_axes", axes),
        ("modes", mode_list),
        ("affine", affine_list),
        ("backends", backend_list),
        ("order", order_list),
        ("virtual_batch", ghost_list),
        ("renorm", renorm_list),
    ):
        if not values:
            raise ValueError(f"{name}: expected at least one value")
    for mode in mode_list:
        if mode not in MODES:
            raise ValueError(f"modes: expected 'train' or 'eval', got {mode!r}")
    for value in order_list:
        if isinstance(value, bool) or value not in ORDERS:
            raise ValueError(f"order: expected 1 or 2, got {value!r}")
    for value in ghost_list:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"virtual_batch: expected None or an int >= 1, got {value!r}")
        if value is not None and 2 in order_list:
            raise ValueError("virtual_batch: the double backward (order 2) takes no ghost batches")
    for value in renorm_list:
        if value not in RENORMS:
            raise ValueError(f"renorm: expected None, 'clipped' or 'unclipped', got {value!r}")
    if None not in renorm_list and ("train" not in mode_list or None not in ghost_list):
        raise ValueError(
            "renorm: batch renormalization is checked in mode 'train' without virtual_batch only"
        )
    usable = backend_registry.available_backends()
    for backend in backend_list:
        if backend not in usable:
            raise ValueError(
                f"backends: {backend!r} cannot run on this machine "
                f"(available: {', '.join(usable) or 'none'})"
            )
    cases = []
    for shape, axis, mode in itertools.product(shape_list, axes, mode_list):
        if not 2 <= len(shape) <= 5 or min(shape) < 1:
            raise ValueError(f"shapes: expected rank 2 to 5 with positive sizes, got {shape}")
        if (
            isinstance(axis, bool)
            or not isinstance(axis, int)
            or not -len(shape) <= axis < len(shape)
        ):
            raise ValueError(f"channel_axes: {axis!r} is not an axis of shape {shape}")
        if mode == "train" and np.prod(shape) // shape[axis] < 2:
            raise ValueError(
                f"shapes: {shape} has one value per channel (axis {axis}); training needs two"
            )
        for ghost in ghost_list:
            _check_ghost_shape(ghost, shape, axis % len(shape), mode)
    for value, ghost, renormalized, shape, axis, mode, aff, backend in itertools.product(
        order_list, ghost_list, renorm_list, shape_list, axes, mode_list, affine_list, backend_list
    ):
        if renormalized is None or (mode == "train" and ghost is None):
            case = GradcheckCase(shape, axis, mode, bool(aff), str(backend), int(value), ghost)
            cases.append(dataclasses.replace(case, renorm=renormalized))
    return cases


def _check_ghost_shape(ghost: int | None, shape: tuple[int, ...], axis: int, mode: str) -> None:
    """Ghost batches split axis 0: it must not hold the channels, and in training mode the
    last (smallest) chunk needs two values per channel."""
    if ghost is None:
        return
    if axis == 0:
        raise ValueError(f"virtual_batch: splits axis 0, the channel axis of shape {shape}")
    last = shape[0] - (-(-shape[0] // ghost) - 1) * ghost
    if mode == "train" and last * int(np.prod(shape[1:])) // shape[axis] < 2:
        raise ValueError(
            f"virtual_batch: {ghost} leaves a last chunk of {last} sample(s) of shape {shape} "
            "with one value per channel; training needs two"
        )


def case_rng(case: GradcheckCase, seed: int) -> np.random.Generator:
    """The generator of `case`'s random data: a function of `seed` and of the case without
    its backend (shape, channel axis, mode, affine, order, ghost batches, renorm), so every
    backend gets the same data."""
    rank = len(case.shape)
    key = [
        seed,
        rank,
        *case.shape,
        case.channel_axis % rank,
        MODES.index(case.mode),
        int(case.affine),
        *([case.order] if case.order != 1 else []),
        *([0, case.virtual_batch] if case.virtual_batch is not None else []),
        *([1, RENORMS.index(case.renorm)] if case.renorm is not None else []),
    ]
    return np.random.default_rng(key)


def _check_options(step: float, atol: float, rtol: float, eps: float, seed: int) -> None:
    for name, value in (("step", step), ("atol", atol), ("rtol", rtol), ("eps", eps)):
        check_positive_finite(name, value)
    check_seed(seed)


def run_cases(
    cases: Iterable[GradcheckCase],
    *,
    step: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    eps: float = 1e-5,
    seed: int = 0,
    fast: bool = False,
    progress: Callable[[CaseResult], None] | None = None,
) -> GradcheckResult:
    """Check each case (from `build_cases`) on its data from `case_rng(case, seed)`.

    `step`, `atol`, `rtol`, `eps` must be positive finite numbers and `seed` a non-negative
    integer (`ValueError` naming the option). `progress` is called after each case. An
    exception raised by a backend is recorded as a failed case, not raised.
    """
    _check_options(step, atol, rtol, eps, seed)
    result = GradcheckResult(
        step=float(step),
        atol=float(atol),
        rtol=float(rtol),
        eps=float(eps),
        seed=int(seed),
        fast=bool(fast),
    )
    for case in cases:
        try:
            outcome = check_case(
                case, case_rng(case, seed), step=step, atol=atol, rtol=rtol, eps=eps, fast=fast
            )
        except Exception as e:  # a backend failing is a failed check, reported with its reason
            outcome = CaseResult(case, {}, error=f"{type(e).__name__}: {e}")
        result.cases.append(outcome)
        if progress is not None:
            progress(outcome)
    return result


def gradcheck(
    shapes: Iterable[Sequence[int]] | None = None,
    *,
    channel_axes: int | Iterable[int] = CHANNEL_AXES,
    modes: str | Iterable[str] = MODES,
    affine: bool | Iterable[bool] = (True, False),
    backends: str | Iterable[str] = ("numpy",),
    step: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    eps: float = 1e-5,
    seed: int = 0,
    fast: bool = False,
    order: int | Iterable[int] = 1,
    virtual_batch: int | None | Iterable[int | None] = None,
    renorm: str | None | Iterable[str | None] = None,
    progress: Callable[[CaseResult], None] | None = None,
) -> GradcheckResult:
    """Check `batch_norm_backward` against central differences of `batch_norm` (`order=1`),
    and `batch_norm_double_backward` against central differences of `batch_norm_backward`
    (`order=2`; `order=(1, 2)` for both).

    Runs the cross product of `order`, `shapes` (default: `DEFAULT_SHAPES`, ranks 2-5),
    `channel_axes` (1: channels-first, -1: channels-last), `modes` ("train", "eval"),
    `affine` (with or without weight and bias) and `backends` (names of backends that can
    run here; "cuda" runs on CuPy arrays, the others on NumPy arrays). `fast=True` checks the
    gradient of `x` along random directions instead of entry by entry (as torch's
    `fast_mode`): 4 forward evaluations instead of `2 * (values per channel)`, for slow
    backends such as the simulator; it catches errors that affect the whole gradient, but can
    miss a small error confined to one entry, which the default entry-by-entry check cannot.
    `virtual_batch` (a size, None, or several) runs the cases with ghost batches of that many
    samples (first order; a batch that `G` does not divide checks the shorter last chunk).
    `renorm` adds batch-renormalization cases in mode "train" ("clipped", "unclipped"; None
    is batch norm; module docstring).
    Each case's data depends on `seed` and the case only (`case_rng`), not on the backend.
    `progress` is called after each case.
    Returns a `GradcheckResult` (truthy when all passed); invalid options raise `ValueError`
    naming the option (`build_cases`, `run_cases`); an exception raised by a backend is
    recorded as a failed case, not raised.
    """
    cases = build_cases(shapes, channel_axes, modes, affine, backends, order, virtual_batch, renorm)
    return run_cases(
        cases, step=step, atol=atol, rtol=rtol, eps=eps, seed=seed, fast=fast, progress=progress
    )


class _Device:
    """Moves float64 host arrays to the backend's array module and back."""

    def __init__(self, backend: str) -> None:
        if backend == "cuda":
            import cupy

            self.to = cupy.asarray
        else:
            self.to = np.asarray
        self.back = to_host


def _compare(numeric: np.ndarray, analytic: Any, atol: float, rtol: float) -> Comparison:
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"gradient has shape {analytic.shape}, expected {numeric.shape}")
    diff = np.abs(numeric - analytic)
    if diff.size == 0:
        return Comparison(0.0, 0.0, True)
    # diff <= atol + rtol * |numeric|  <=>  diff / (|numeric| + atol / rtol) <= rtol
    rel = float(np.max(diff / (np.abs(numeric) + atol / rtol)))
    return Comparison(float(np.max(diff)), rel, bool(rel <= rtol))  # False for NaN


def reference_forward(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    training: bool,
    eps: float,
    channel_axis: int,
    virtual_batch: int | None = None,
    corrections: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Float64 batch norm by the textbook formula (two-pass statistics); with `virtual_batch`
    in training mode, the formula on each chunk of that many samples along axis 0; with
    `corrections` `(r, d)`, batch renormalization's `xhat * r + d` before the weight and bias."""
    if training and virtual_batch is not None:
        chunks = [x[i : i + virtual_batch] for i in range(0, x.shape[0], virtual_batch)]
        args = (weight, bias, running_mean, running_var, training, eps, channel_axis)
        return np.concatenate([reference_forward(c, *args) for c in chunks])
    axis = channel_axis % x.ndim
    others = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if training:
        mean = x.mean(axis=others, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=others, keepdims=True)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    y = (x - mean) / np.sqrt(var + eps)
    if corrections is not None:
        y = y * corrections[0].reshape(shape) + corrections[1].reshape(shape)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def reference_corrections(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    rmax: float,
    dmax: float,
    eps: float,
    channel_axis: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch renormalization's `(r, d)` of `x` in float64: `r = clip(sigma_B / sigma, 1/rmax,
    rmax)`, `d = clip((mean_B - running_mean) / sigma, -dmax, dmax)`."""
    others = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    mean, var = x.mean(axis=others), x.var(axis=others)
    sigma = np.sqrt(running_var + eps)
    r = np.clip(np.sqrt(var + eps) / sigma, 1 / rmax, rmax)
    return r, np.clip((mean - running_mean) / sigma, -dmax, dmax)


def _renorm_statistics(
    regime: str, x: np.ndarray, channel_axis: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Running statistics that put `x`'s `r` and `d` inside or beyond the bounds of `regime`
    (module docstring), with a random sign per channel."""
    others = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    mean, std = x.mean(axis=others), x.std(axis=others)
    sign = rng.choice([-1.0, 1.0], mean.size)
    if regime == "unclipped":
        running_var = (std * rng.uniform(0.8, 1.25, mean.size)) ** 2
        offset = rng.uniform(0.05, 0.3, mean.size)
    else:
        running_var = (std * 2.0**sign) ** 2
        offset = rng.uniform(1.0, 2.0, mean.size)
    return mean - sign * offset * np.sqrt(running_var), running_var


def _elementwise_check(x, dx, axis, channels, channel_loss, weight, bias, step, atol, rtol):
    """Every entry of dx: perturb the j-th value of every channel at once."""
    moved_shape = np.moveaxis(x, axis, -1).shape
    rows = np.moveaxis(x, axis, -1).reshape(-1, channels)
    numeric_rows = np.empty_like(rows)
    for j in range(rows.shape[0]):
        plus, minus = rows.copy(), rows.copy()
        plus[j] += step
        minus[j] -= step
        loss_plus = channel_loss(np.moveaxis(plus.reshape(moved_shape), -1, axis), weight, bias)
        loss_minus = channel_loss(np.moveaxis(minus.reshape(moved_shape), -1, axis), weight, bias)
        numeric_rows[j] = (loss_plus - loss_minus) / (2 * step)
    numeric_dx = np.moveaxis(numeric_rows.reshape(moved_shape), -1, axis)
    return _compare(numeric_dx, dx, atol, rtol)


def _directional_check(x, dx, axis, channels, channel_loss, weight, bias, rng, step, atol, rtol):
    """Per channel, the derivative along random directions u: numeric vs `sum(dx * u)`."""
    numeric, analytic = [], []
    for _ in range(FAST_DIRECTIONS):
        u = rng.standard_normal(x.shape)
        plus = channel_loss(x + step * u, weight, bias)
        minus = channel_loss(x - step * u, weight, bias)
        numeric.append((plus - minus) / (2 * step))
        analytic.append(np.moveaxis(np.asarray(dx) * u, axis, -1).reshape(-1, channels).sum(0))
    return _compare(np.concatenate(numeric), np.concatenate(analytic), atol, rtol)


def check_case(
    case: GradcheckCase,
    rng: np.random.Generator,
    *,
    step: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    eps: float = 1e-5,
    fast: bool = False,
) -> CaseResult:
    """Run one case (see the module docstring); exceptions from the backend propagate."""
    shape, axis = case.shape, case.channel_axis % len(case.shape)
    channels = shape[axis]
    training = case.mode == "train"
    device = _Device(case.backend)
    channel_shape = [1] * len(shape)
    channel_shape[axis] = channels
    # Per-channel offsets and scales, so that centring and scaling both matter.
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, channel_shape) + rng.uniform(
        -2.0, 2.0, channel_shape
    )
    weight = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    bias = rng.standard_normal(channels)
    running_mean = rng.uniform(-1.0, 1.0, channels)
    running_var = rng.uniform(0.5, 2.0, channels)
    grad_out = rng.standard_normal(shape)
    renorm = case.renorm is not None
    rmax, dmax = RENORM_BOUNDS.get(case.renorm, (1.0, 0.0))
    if renorm:
        running_mean, running_var = _renorm_statistics(case.renorm, x, axis, rng)
    corrections = (
        reference_corrections(x, running_mean, running_var, rmax, dmax, eps, axis)
        if renorm
        else None
    )
    with_running = renorm or not training

    def forward(x_: np.ndarray, w_: np.ndarray, b_: np.ndarray) -> tuple[Any, Any]:
        return functional.batch_norm(
            device.to(x_),
            device.to(w_) if case.affine else None,
            device.to(b_) if case.affine else None,
            device.to(running_mean.copy()) if with_running else None,  # updated by renorm
            device.to(running_var.copy()) if with_running else None,
            training=training,
            eps=eps,
            channel_axis=case.channel_axis,
            backend=case.backend,
            virtual_batch=case.virtual_batch,
            renorm=renorm,
            rmax=rmax,
            dmax=dmax,
        )

    def channel_loss(x_: np.ndarray, w_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        if renorm:  # the formula with r and d held constant
            affine = (w_, b_) if case.affine else (None, None)
            y = reference_forward(x_, *affine, None, None, True, eps, axis, corrections=corrections)
        else:
            y = np.asarray(device.back(forward(x_, w_, b_)[0]), dtype=np.float64)
        return np.moveaxis(y * grad_out, axis, -1).reshape(-1, channels).sum(axis=0)

    if case.order == 2:
        held = forward(x, weight, bias)[1].renorm if renorm else None

        def forward_held(x_: np.ndarray, w_: np.ndarray, b_: np.ndarray) -> tuple[Any, Any]:
            y, saved = forward(x_, w_, b_)
            return y, (dataclasses.replace(saved, renorm=held) if renorm else saved)

        checks = (case, device, forward_held, x, weight, bias, grad_out, step, atol, rtol)
        return CaseResult(case, _second_order_comparisons(*checks, rng, fast))

    y, saved = forward(x, weight, bias)
    dx, dweight, dbias = functional.batch_norm_backward(device.to(grad_out), saved)
    comparisons = {
        "y": _compare(
            reference_forward(
                x,
                weight if case.affine else None,
                bias if case.affine else None,
                running_mean,
                running_var,
                training,
                eps,
                axis,
                case.virtual_batch,
                corrections,
            ),
            device.back(y),
            atol,
            rtol,
        )
    }

    if fast:
        comparisons["x"] = _directional_check(
            x, device.back(dx), axis, channels, channel_loss, weight, bias, rng, step, atol, rtol
        )
    else:
        comparisons["x"] = _elementwise_check(
            x, device.back(dx), axis, channels, channel_loss, weight, bias, step, atol, rtol
        )

    if case.affine:
        for name, analytic in (("weight", dweight), ("bias", dbias)):
            if analytic is None:
                raise ValueError(f"batch_norm_backward returned no gradient for {name}")
            numeric = (
                channel_loss(x, weight + step, bias) - channel_loss(x, weight - step, bias)
                if name == "weight"
                else channel_loss(x, weight, bias + step) - channel_loss(x, weight, bias - step)
            ) / (2 * step)
            comparisons[name] = _compare(numeric, device.back(analytic), atol, rtol)
    elif dweight is not None or dbias is not None:
        raise ValueError("batch_norm_backward returned weight/bias gradients without affine")
    return CaseResult(case, comparisons)


def _second_order_comparisons(
    case: GradcheckCase,
    device: _Device,
    forward: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, Any]],
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    grad_out: np.ndarray,
    step: float,
    atol: float,
    rtol: float,
    rng: np.random.Generator,
    fast: bool,
) -> dict[str, Comparison]:
    """`batch_norm_double_backward` against central differences of `batch_norm_backward`
    (module docstring): comparisons "x", "weight" (affine) and "dy"."""
    axis = case.channel_axis % len(case.shape)
    channels = case.shape[axis]
    ddx = rng.standard_normal(x.shape)
    ddweight = rng.standard_normal(channels)
    ddbias = rng.standard_normal(channels)

    def channel_loss(x_: np.ndarray, w_: np.ndarray, dy_: np.ndarray) -> np.ndarray:
        """Per channel, `sum(ddx * dx) + ddweight * dweight + ddbias * dbias`."""
        _, saved = forward(x_, w_, bias)
        dx, dweight, dbias = functional.batch_norm_backward(device.to(dy_), saved)
        dx = np.asarray(device.back(dx), dtype=np.float64)
        terms = np.moveaxis(dx * ddx, axis, -1).reshape(-1, channels).sum(axis=0)
        if case.affine:
            terms = terms + ddweight * device.back(dweight) + ddbias * device.back(dbias)
        return terms

    _, saved = forward(x, weight, bias)
    gx, gweight, gdy = double_backward.batch_norm_double_backward(
        device.to(ddx),
        device.to(ddweight) if case.affine else None,
        device.to(ddbias) if case.affine else None,
        device.to(grad_out),
        saved,
    )
    losses = {
        "x": (x, gx, lambda x_, w_, _: channel_loss(x_, w_, grad_out)),
        "dy": (grad_out, gdy, lambda dy_, w_, _: channel_loss(x, w_, dy_)),
    }
    comparisons = {}
    for name, (at, analytic, loss) in losses.items():
        analytic = device.back(analytic)
        if fast:
            checks = (at, analytic, axis, channels, loss, weight, bias, rng, step, atol, rtol)
            comparisons[name] = _directional_check(*checks)
        else:
            checks = (at, analytic, axis, channels, loss, weight, bias, step, atol, rtol)
            comparisons[name] = _elementwise_check(*checks)
    if case.affine:
        if gweight is None:
            raise ValueError("batch_norm_double_backward returned no gradient for weight")
        numeric = (
            channel_loss(x, weight + step, grad_out) - channel_loss(x, weight - step, grad_out)
        ) / (2 * step)
        comparisons["weight"] = _compare(numeric, device.back(gweight), atol, rtol)
    elif gweight is not None:
        raise ValueError("batch_norm_double_backward returned a weight gradient without affine")
    return comparisons
