"""`cupy-bn --version` and `cupy-bn info`."""

import json
import sys
import types

import numpy as np
from click.testing import CliRunner

import cupy_bn
from cupy_bn.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert cupy_bn.__version__ in result.output


def table_rows(output: str) -> dict[str, str]:
    """The rows of `cupy-bn info`'s table: label -> value (the title line is no row)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("\u2502")]
        if len(cells) == 4:
            rows[cells[1]] = cells[2]
    return rows


def test_info_reports_versions_and_backends():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    facts = json.loads(CliRunner().invoke(main, ["info", "--json"]).output)
    assert rows["cupy-bn"] == cupy_bn.__version__
    assert rows["numpy"] == np.__version__
    assert rows["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert rows["cupy"] == facts["cupy"]["state"]
    assert rows["backends"] == ", ".join(facts["backends"])
    assert "numpy" in facts["backends"]


# ---------------------------------------------------------------------------------------------
# JSON types, not reprs


def _info_json() -> dict:
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_info_json_gives_the_toolchain_as_json_values(monkeypatch):
    from cupy_bn.sim.toolchain import Toolchain

    toolchain = Toolchain(
        cxx="/usr/bin/g++",
        cxx_version="12.2.0",
        cuda_include="/opt/cuda/include",
        include_dirs=("/opt/cuda/include", "/opt/cccl/include"),
        header_source="CUDA toolkit",
        cuda_version=13000,
    )
    fake = types.SimpleNamespace(find_toolchain=lambda: toolchain, is_available=lambda: True)
    monkeypatch.setitem(sys.modules, "cupy_bn.sim", fake)
    facts = _info_json()
    assert facts["simulator"]["toolchain"]["include_dirs"] == [
        "/opt/cuda/include",
        "/opt/cccl/include",
    ]
    assert facts["simulator"]["toolchain"]["cuda_version"] == 13000
    human = CliRunner().invoke(main, ["info"]).stdout
    assert "/opt/cuda/include, /opt/cccl/include" in human and "('" not in human


def test_info_json_has_no_reprs():
    for text in _strings(_info_json()):
        assert not (text[:1] in "([{" and text[-1:] in ")]}"), text


def test_info_json_describes_each_gpu(monkeypatch):
    import cupy_bn.environment as environment
    import cupy_bn.machine as machine

    gpu = {
        "id": 0,
        "name": "NVIDIA H200",
        "compute_capability": "9.0",
        "memory_bytes": 141 * 2**30,
        "peak_bandwidth": 4.8e12,
    }
    monkeypatch.setattr(environment, "cupy_usable", lambda: True)
    monkeypatch.setattr(machine, "gpu_devices", lambda: [gpu])
    assert _info_json()["gpus"] == [gpu]
    human = CliRunner().invoke(main, ["info"]).stdout
    assert "NVIDIA H200 (sm 9.0, 141 GiB, peak 4800 GB/s)" in human

    def broken():
        raise RuntimeError("driver went away")

    monkeypatch.setattr(machine, "gpu_devices", broken)
    (failed,) = _info_json()["gpus"]
    assert failed == {
        "id": 0,
        "name": "error: driver went away",
        "compute_capability": None,
        "memory_bytes": None,
        "peak_bandwidth": None,
    }
    human = CliRunner().invoke(main, ["info"]).stdout
    assert "sm unknown, memory unknown, peak bandwidth unknown" in human
