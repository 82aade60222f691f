"""The shared helpers: array modules and host copies (`cupy_bn.arrays`), sizes (`intmath`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cupy_bn.arrays import array_module, is_cupy, to_host
from cupy_bn.intmath import ceil_div, round_up


class FakeCupyArray:
    """An object whose type comes from the `cupy` package, holding NumPy data behind `get`."""

    __module__ = "cupy._core.core"

    def __init__(self, data):
        self.data = np.asarray(data)
        self.copies = 0

    def get(self):
        self.copies += 1
        return self.data.copy()


def test_cupy_arrays_are_told_by_their_type_module():
    pytest.importorskip("cupy", reason="telling a CuPy array's module imports cupy")
    fake = FakeCupyArray([1.0])
    assert is_cupy(fake) and not is_cupy(np.zeros(1)) and not is_cupy([1.0])
    assert array_module(np.zeros(1)) is np and array_module(3.0) is np
    assert array_module(fake).__name__ == "cupy"


def test_to_host_copies_from_the_gpu_and_passes_host_data_through():
    fake = FakeCupyArray([1.0, 2.0])
    out = to_host(fake)
    assert isinstance(out, np.ndarray) and out.tolist() == [1.0, 2.0] and fake.copies == 1
    host = np.arange(3)
    assert to_host(host) is host
    assert to_host([1, 2]).tolist() == [1, 2]


@pytest.mark.parametrize("a", [0, 1, 7, 8, 9, 255, 256, 257, 10**6 + 1])
@pytest.mark.parametrize("b", [1, 2, 3, 32, 256])
def test_ceil_div_and_round_up_match_their_definitions(a, b):
    assert ceil_div(a, b) == math.ceil(a / b)
    up = round_up(a, b)
    assert up % b == 0 and up >= a and up - a < b


def test_ceil_div_is_exact_beyond_float_precision():
    big = 2**70 + 1
    assert ceil_div(big, 2) == 2**69 + 1  # math.ceil(big / 2) rounds to 2**69
    assert math.ceil(big / 2) != 2**69 + 1
