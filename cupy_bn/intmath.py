"""Integer arithmetic of block, grid and buffer sizes."""

from __future__ import annotations

__all__ = ["ceil_div", "round_up"]


def ceil_div(a: int, b: int) -> int:
    """`ceil(a / b)` for integers, `b > 0`: exact at any size (no float division)."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The least multiple of `multiple` (> 0) that is >= `a`."""
    return ceil_div(a, multiple) * multiple
