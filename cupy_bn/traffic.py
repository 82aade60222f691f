"""The memory traffic and kernel launches of batch norm per phase: one model for every figure.

Batch norm is memory-bound, so its cost is counted in tensor passes (R = one full read of a
tensor of the input's size and dtype, W = one full write); per-channel vectors and cross-block
partials (a few KB) are left out. Two figures per phase:

| phase | minimal | moved by cupy-bn's backends | CUDA launches |
|---|---|---|---|
| `forward_train` | R1 W1 (x; y) | `batch_stats` R1 + `apply` R1 W1 = R2 W1 | 2 |
| `backward` | R2 W1 (x, dy; dx) | `backward_reduce` R2 + `backward_apply` R2 W1 = R4 W1 | 2 |
| `eval` | R1 W1 (x; y) | `apply` R1 W1 | 1 |
| `double_backward` | R3 W2 (x, dy, ddx; gx, gdy) | `double_backward_{reduce,apply}` R6 W2 | 2 |

- **minimal**: the least any implementation must move (a persistent kernel that keeps a channel
  on chip would get there). `cupy-bn bench` divides these bytes by every implementation's time,
  ours and the peers' alike, so its GB/s compare like for like; they are a lower bound on the
  bandwidth an implementation actually draws.
- **moved**: what cupy-bn's backends move, one pass per tensor a primitive reads or writes and
  the primitives of the phase in sequence (`PRIMITIVE_PASSES`, `PHASE_PRIMITIVES`). The CUDA
  backend (and the simulator, which runs the same launch code) launches one tensor kernel per
  primitive; `update_running` and the functional layer's per-channel work are per-channel only
  (the fused `train_statistics` does them inside the statistics launch). The NumPy backend
  makes one blocked pass per primitive; where a channel's |mean| exceeds one standard
  deviation its `batch_stats` reads `x` a second time (centred sums), one read more than the
  model; its double backward is whole-array NumPy with temporaries, which the model does not
  count. `cupy-bn bench`'s "moved" GB/s divide these bytes by our implementations' times: the
  bandwidth our code actually draws, to set against the device's peak.

The fused forms (`batch_norm(..., activation="relu", residual=z)`, `FUSED_PHASES`, not timed
by `cupy-bn bench`) replace `apply` with `apply_activation`, which also reads the residual,
and start the backward with `relu_gradient`, which reads `dy` and the saved output `y` and
writes the masked gradient: the residual's gradient, and the `dy` of the two backward
primitives. Modelled with both a residual and the ReLU:

| phase | minimal | moved by cupy-bn's backends | CUDA launches |
|---|---|---|---|
| `forward_train_fused` | R2 W1 (x, z; y) | `batch_stats` R1 + `apply_activation` R2 W1 | 2 |
| `backward_fused` | R3 W2 (x, dy, y; dx, dz) | `relu_gradient` R2 W1 + R4 W1 = R6 W2 | 3 |
| `eval_fused` | R2 W1 (x, z; y) | `apply_activation` R2 W1 | 1 |

Without a residual `apply_activation` reads `x` alone (R1 W1, as `apply`); without the ReLU
the backward is the plain one (the residual's gradient is `dy` itself). A residual of another
dtype than `x` is converted first, one pass more. The NumPy backend's fused backward
(`FusedBackward`) runs on the masked gradient as it does on `dy`.

`PHASES` are the phases `cupy-bn bench` times; `ALL_PHASES` adds `double_backward`, modelled
for training mode with `ddx` given (without `ddx` the reduction is `backward_reduce`'s R2 and
the apply reads two tensors; in inference mode the reduction runs only for a weight's
gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALL_PHASES",
    "FUSED_PHASES",
    "MINIMAL_PASSES",
    "PHASES",
    "PHASE_PRIMITIVES",
    "PRIMITIVE_PASSES",
    "Passes",
    "launches",
    "minimal_bytes",
    "minimal_passes",
    "moved_bytes",
    "moved_passes",
]

PHASES: tuple[str, ...] = ("forward_train", "backward", "eval")
ALL_PHASES: tuple[str, ...] = (*PHASES, "double_backward")
FUSED_PHASES: tuple[str, ...] = ("forward_train_fused", "backward_fused", "eval_fused")


@dataclass(frozen=True)
class Passes:
    """Full reads and writes of a tensor."""

    reads: int
    writes: int

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.reads + other.reads, self.writes + other.writes)

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def bytes(self, numel: int, itemsize: int) -> int:
        """Bytes these passes move over a tensor of `numel` elements of `itemsize` bytes."""
        return self.total * numel * itemsize

    def __str__(self) -> str:
        return f"R{self.reads} W{self.writes}"


#: The least a phase must move, whatever the implementation.
MINIMAL_PASSES: dict[str, Passes] = {
    "forward_train": Passes(1, 1),
    "backward": Passes(2, 1),
    "eval": Passes(1, 1),
    "double_backward": Passes(3, 2),
    "forward_train_fused": Passes(2, 1),
    "backward_fused": Passes(3, 2),
    "eval_fused": Passes(2, 1),
}

#: Passes of each primitive that streams a tensor, as both backends implement it.
PRIMITIVE_PASSES: dict[str, Passes] = {
    "batch_stats": Passes(1, 0),
    "apply": Passes(1, 1),
    "backward_reduce": Passes(2, 0),
    "backward_apply": Passes(2, 1),
    "double_backward_reduce": Passes(3, 0),
    "double_backward_apply": Passes(3, 2),
    "apply_activation": Passes(2, 1),  # with a residual; R1 W1 without
    "relu_gradient": Passes(2, 1),
}

#: The tensor-streaming primitives a phase runs, in order (one CUDA launch each).
PHASE_PRIMITIVES: dict[str, tuple[str, ...]] = {
    "forward_train": ("batch_stats", "apply"),
    "backward": ("backward_reduce", "backward_apply"),
    "eval": ("apply",),
    "double_backward": ("double_backward_reduce", "double_backward_apply"),
    "forward_train_fused": ("batch_stats", "apply_activation"),
    "backward_fused": ("relu_gradient", "backward_reduce", "backward_apply"),
    "eval_fused": ("apply_activation",),
}


def _check_phase(phase: str) -> None:
    if phase not in ALL_PHASES and phase not in FUSED_PHASES:
        known = ", ".join((*ALL_PHASES, *FUSED_PHASES))
        raise ValueError(f"phase must be one of {known}; got {phase!r}")


def minimal_passes(phase: str) -> Passes:
    """The least `phase` must move (the module docstring's "minimal" column)."""
    _check_phase(phase)
    return MINIMAL_PASSES[phase]


def moved_passes(phase: str) -> Passes:
    """What cupy-bn's backends move for `phase`: the passes of its primitives added up."""
    _check_phase(phase)
    total = Passes(0, 0)
    for primitive in PHASE_PRIMITIVES[phase]:
        total += PRIMITIVE_PASSES[primitive]
    return total


def launches(phase: str) -> int:
    """Tensor kernels the CUDA backend launches for `phase` (per-channel work not counted)."""
    _check_phase(phase)
    return len(PHASE_PRIMITIVES[phase])


def minimal_bytes(phase: str, numel: int, itemsize: int) -> int:
    """Bytes `phase` must move at the least over `numel` elements of `itemsize` bytes."""
    return minimal_passes(phase).bytes(numel, itemsize)


def moved_bytes(phase: str, numel: int, itemsize: int) -> int:
    """Bytes cupy-bn's backends move for `phase` over `numel` elements of `itemsize` bytes."""
    return moved_passes(phase).bytes(numel, itemsize)
