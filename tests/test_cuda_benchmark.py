"""`cupy-bn bench --suite gpu` (and `benchmarks/gpu.py`, its wrapper): one clear refusal without
a GPU, the case set's rows with one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cupy_bn.backends import cupy_usable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(cupy_usable(), reason="a GPU is usable here: the case set would run")
@pytest.mark.parametrize(
    "command",
    [["-m", "cupy_bn", "bench", "--suite", "gpu"], [str(ROOT / "benchmarks" / "gpu.py")]],
    ids=["cupy-bn bench", "benchmarks/gpu.py"],
)
def test_gpu_suite_explains_missing_gpu(command):
    result = subprocess.run(
        [sys.executable, *command, "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "case set 'gpu' needs a GPU" in lines[0], result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_usable(), reason="no usable CuPy GPU here")
def test_gpu_suite_times_kernels_against_the_gpu_peers():
    from click.testing import CliRunner

    from cupy_bn import bench
    from cupy_bn.cli import main

    args = ["bench", "--suite", "gpu", "--shape", "8,64,28,28", "--repeat", "3", "--warmup", "1"]
    result = CliRunner().invoke(main, [*args, "--copy-mb", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["errors"] == []
    timed = {entry["params"]["implementation"] for entry in payload["benchmarks"]}
    wanted = set(bench.SUITES["gpu"].implementations)
    skipped = {note.split(" skipped")[0] for note in payload["notes"]}
    assert timed | skipped == wanted and {"cupy_bn.cuda", "cupy_bn.cuda.kernels"} <= timed
    numel, itemsize = 8 * 64 * 28 * 28, 4
    for entry in payload["benchmarks"]:
        extra, phase = entry["extra_info"], entry["params"]["phase"]
        assert entry["options"]["timer"] == "cupyx.profiler.benchmark"
        assert extra["minimal_bytes"] == bench.traffic.minimal_bytes(phase, numel, itemsize)
        assert extra["bandwidth_limit"] == payload["machine_info"]["gpus"][0]["peak_bandwidth"]
        if extra["ours"]:
            assert extra["moved_bytes"] == bench.traffic.moved_bytes(phase, numel, itemsize)
            assert 0 < extra["moved_percent_of_bandwidth"] < 100
        else:
            assert extra["moved_bytes"] is None
