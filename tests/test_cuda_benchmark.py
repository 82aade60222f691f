"""benchmarks/gpu.py without a GPU: one clear line on stderr, status 1, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from cupy_bn.backends import cupy_usable

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.skipif(cupy_usable(), reason="a GPU is usable here: the benchmark would run")
def test_gpu_benchmark_explains_missing_gpu():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeat", "1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # "no usable GPU", or "CuPy is not installed" under the light test extra
    assert len(lines) == 1 and ("GPU" in lines[0] or "CuPy" in lines[0]), result.stderr
