"""Toolchain discovery, clear errors when parts are missing, and the compile cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from sim_helpers import needs_simulator

from cupy_bn import sim
from cupy_bn.kernels import toolchain as kernel_toolchain
from cupy_bn.sim import build, toolchain


@pytest.fixture
def fresh_toolchain():
    """Forget the cached discovery before and after a test that changes the environment."""
    forget()
    yield
    forget()


def forget():
    try:
        toolchain.find_toolchain(refresh=True)
    except sim.ToolchainError:
        pass  # failed lookups are not cached


@needs_simulator
def test_toolchain_is_found_and_described():
    tc = sim.find_toolchain()
    assert os.access(tc.cxx, os.X_OK)
    assert Path(tc.cuda_include, "cuda_fp16.h").is_file()
    assert tc.include_dirs[0] == tc.cuda_include
    assert any(Path(d, "nv", "target").is_file() for d in tc.include_dirs)
    info = tc.describe()
    assert set(info) == {"compiler", "cuda headers", "cuda version", "platform"}
    assert tc.cxx_version in info["compiler"]
    assert sim.is_available()


def test_missing_compiler_names_what_to_install(fresh_toolchain, monkeypatch):
    monkeypatch.setenv("CUPY_BN_SIM_CXX", "no-such-g++")
    forget()
    with pytest.raises(sim.ToolchainError, match=r"`no-such-g\+\+` was not found.*install g\+\+"):
        sim.find_toolchain()
    assert not sim.is_available()


@needs_simulator
def test_simulator_takes_the_headers_the_kernels_package_finds(
    fresh_toolchain, monkeypatch, tmp_path
):
    """No header search of its own: the folder cupy_bn.kernels.toolchain finds is the one the
    simulator compiles with."""
    for name in (*kernel_toolchain.REQUIRED_HEADERS, "nv/target"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    monkeypatch.setattr(kernel_toolchain, "_header_candidates", lambda: [(tmp_path, "fake")])
    tc = sim.find_toolchain(refresh=True)
    assert (tc.cuda_include, tc.include_dirs, tc.header_source) == (
        str(tmp_path),
        (str(tmp_path),),
        "fake",
    )


@needs_simulator
def test_refresh_looks_for_the_headers_again(fresh_toolchain, monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_toolchain, "_header_candidates", lambda: [(tmp_path, "test")])
    with pytest.raises(sim.ToolchainError, match="CUDA headers"):
        sim.find_toolchain(refresh=True)
    assert not sim.is_available()


def test_cache_folder_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_BN_SIM_CACHE", str(tmp_path / "c"))
    assert build.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CUPY_BN_SIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert build.cache_dir() == tmp_path / "x" / "cupy-bn" / "sim"


def unique_kernel(value: int) -> str:
    token = uuid.uuid4().hex
    return f'// {token}\nextern "C" __global__ void k(int* x) {{ *x = {value}; }}\n'


@needs_simulator
def test_modules_are_cached_on_disk_and_reloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_BN_SIM_CACHE", str(tmp_path))
    src = unique_kernel(5)
    x = np.zeros(1, np.int32)
    sim.RawModule(code=src).get_function("k")(1, 1, (x,))
    assert x[0] == 5
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".so"]  # no temporary files left behind

    # a new process-level lookup finds the file without running the compiler
    monkeypatch.setattr(build, "_built", {})
    monkeypatch.setattr(build, "_compile", lambda *a, **k: pytest.fail("compiled again"))
    art = build.build(_module_source_for(src), flags=())
    assert art.path.parent == tmp_path and art.path.suffix == ".so"


def _module_source_for(src: str) -> str:
    from cupy_bn.sim.raw import _module_source

    return _module_source(src, ("k",), "kernel.cu", False)


@needs_simulator
def test_changed_include_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_BN_SIM_CACHE", str(tmp_path / "cache"))
    header = tmp_path / "value.cuh"
    header.write_text("#define VALUE 1\n")
    src = (
        f'// {uuid.uuid4().hex}\n#include "value.cuh"\n'
        'extern "C" __global__ void k(int* x) { *x = VALUE; }\n'
    )
    x = np.zeros(1, np.int32)
    sim.RawModule(code=src, options=(f"-I{tmp_path}",)).get_function("k")(1, 1, (x,))
    assert x[0] == 1
    header.write_text("#define VALUE 2\n")
    monkeypatch.setattr(build, "_built", {})
    monkeypatch.setattr("cupy_bn.sim.raw._compiled", {})
    sim.RawModule(code=src, options=(f"-I{tmp_path}",)).get_function("k")(1, 1, (x,))
    assert x[0] == 2


@needs_simulator
def test_concurrent_processes_share_the_cache(tmp_path):
    src = unique_kernel(9)
    script = textwrap.dedent(f"""
        import numpy as np
        from cupy_bn import sim
        x = np.zeros(1, np.int32)
        sim.RawModule(code={src!r}).get_function("k")(1, 1, (x,))
        assert x[0] == 9
    """)
    env = dict(os.environ, CUPY_BN_SIM_CACHE=str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, cwd=root, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert len(list(tmp_path.glob("*.so"))) == 1
    assert not list(tmp_path.glob(".build-*"))


@needs_simulator
def test_portable_context_switch_runs_kernels():
    """The ucontext fallback (non-x86-64 machines) schedules threads like the fast path."""
    src = r"""
    extern "C" __global__ void block_reverse(const int* x, int* y) {
        __shared__ int buf[256];
        buf[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
        __syncthreads();
        y[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
    }
    """
    x = np.arange(256, dtype=np.int32)
    for options in ((), ("-DEMU_UCONTEXT",)):
        y = np.zeros(256, np.int32)
        sim.RawModule(code=src, options=options).get_function("block_reverse")(
            1, 256, (x, y), schedule="random", seed=4
        )
        np.testing.assert_array_equal(y, (x ^ 1)[::-1])


@needs_simulator
def test_compile_errors_show_the_kernel_line():
    with pytest.raises(sim.SimulationError, match=r"kernel\.cu:2:.*error"):
        sim.RawModule(
            code='extern "C" __global__ void k(int* x) {\n  *x = missing;\n}\n'
        ).get_function("k")
