"""CUDA header discovery of the kernels package (`cupy_bn.kernels.toolchain`), on fake trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from cupy_bn.kernels import toolchain
from cupy_bn.kernels.toolchain import REQUIRED_HEADERS, ToolchainError


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch):
    """No header folder from this machine's environment; the cache forgotten around each test."""
    for var in ("CUPY_BN_CUDA_INCLUDE", "CUDA_PATH", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    toolchain.forget_cuda_headers()
    yield
    monkeypatch.undo()
    toolchain.forget_cuda_headers()


def fake_include(folder: Path, *, nv_target: bool = True, version: int | None = None) -> Path:
    """A folder holding (empty) copies of the headers the lookup requires."""
    for name in REQUIRED_HEADERS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    if nv_target:
        (folder / "nv").mkdir(exist_ok=True)
        (folder / "nv" / "target").write_text("")
    if version is not None:
        (folder / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {version}\n")
    return folder


def only_candidates(monkeypatch, *candidates: tuple[Path, str]) -> None:
    monkeypatch.setattr(toolchain, "_header_candidates", lambda: list(candidates))


def test_explicit_folder_comes_first(monkeypatch, tmp_path):
    explicit = fake_include(tmp_path / "explicit")
    fake_include(tmp_path / "cuda" / "include")
    monkeypatch.setenv("CUPY_BN_CUDA_INCLUDE", str(explicit))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "cuda"))
    found = toolchain.find_cuda_headers()
    assert (found.include, found.source) == (str(explicit), "CUPY_BN_CUDA_INCLUDE")
    assert found.include_dirs == (str(explicit),)


def test_cuda_path_names_a_toolkit_and_its_version(monkeypatch, tmp_path):
    include = fake_include(tmp_path / "cuda" / "include", version=12040)
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "cuda"))
    found = toolchain.find_cuda_headers()
    assert (found.include, found.source, found.cuda_version) == (str(include), "$CUDA_PATH", 12040)
    assert toolchain.format_cuda_version(found.cuda_version) == "12.4"
    assert toolchain.format_cuda_version(0) == "unknown"


def test_candidates_in_lookup_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_BN_CUDA_INCLUDE", str(tmp_path / "e"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "p"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "h"))
    sources = [(str(d), s) for d, s in toolchain._header_candidates()]
    assert sources[:4] == [
        (str(tmp_path / "e"), "CUPY_BN_CUDA_INCLUDE"),
        (str(tmp_path / "p" / "include"), "$CUDA_PATH"),
        (str(tmp_path / "h" / "include"), "$CUDA_HOME"),
        ("/usr/local/cuda/include", "CUDA toolkit"),
    ]
    assert all(s == "pip wheels" for _, s in sources[4:])


def test_a_folder_without_nv_target_is_completed_from_another(monkeypatch, tmp_path):
    include = fake_include(tmp_path / "include", nv_target=False)
    cccl = tmp_path / "cccl"
    (cccl / "nv").mkdir(parents=True)
    (cccl / "nv" / "target").write_text("")
    only_candidates(monkeypatch, (include, "test"))
    monkeypatch.setattr(toolchain, "_nv_target_dirs", lambda d: [d, tmp_path / "none", cccl])
    assert toolchain.find_cuda_headers().include_dirs == (str(include), str(cccl))


def test_an_incomplete_folder_is_passed_over(monkeypatch, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "cuda_fp16.h").write_text("")
    complete = fake_include(tmp_path / "complete")
    only_candidates(monkeypatch, (partial, "first"), (complete, "second"))
    assert toolchain.find_cuda_headers().source == "second"


def test_missing_headers_name_the_folders_and_what_to_install(monkeypatch, tmp_path):
    only_candidates(monkeypatch, (tmp_path / "a", "test"), (tmp_path / "b", "test"))
    with pytest.raises(ToolchainError, match=r"CUDA headers") as info:
        toolchain.find_cuda_headers()
    message = str(info.value)
    assert f"none found in: {tmp_path / 'a'}, {tmp_path / 'b'}" in message
    assert "pip install nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl" in message
    assert toolchain.cuda_include_dirs() == ()  # CuPy then searches on its own


def test_a_failed_lookup_is_not_cached_and_refresh_looks_again(monkeypatch, tmp_path):
    only_candidates(monkeypatch, (tmp_path, "test"))
    with pytest.raises(ToolchainError):
        toolchain.find_cuda_headers()
    fake_include(tmp_path)
    assert toolchain.find_cuda_headers().include == str(tmp_path)
    only_candidates(monkeypatch)
    assert toolchain.find_cuda_headers().include == str(tmp_path)  # cached
    with pytest.raises(ToolchainError):
        toolchain.find_cuda_headers(refresh=True)


def test_the_cupy_loader_compiles_with_the_found_headers(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from cupy_bn.kernels.loader import CupyLoader

    only_candidates(monkeypatch, (fake_include(tmp_path), "test"))
    seen = {}
    loader = CupyLoader.__new__(CupyLoader)  # no GPU needed: CuPy's RawModule is recorded
    loader._cupy = SimpleNamespace(RawModule=lambda **kw: seen.update(kw))
    loader._raw_module("// source", ("k<float>",))
    assert seen["options"] == ("--std=c++17", f"-I{tmp_path}")
    assert seen["name_expressions"] == ("k<float>",)
