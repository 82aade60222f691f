"""Modules and the names a package exports are distinct: `pkg.name` is the module `pkg.name`
whenever `pkg/name.py` exists, never a function or command that hides it."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

import cupy_bn


def _packages() -> list[str]:
    names = ["cupy_bn"]
    for info in pkgutil.walk_packages(cupy_bn.__path__, "cupy_bn.", onerror=lambda _: None):
        if info.ispkg:
            names.append(info.name)
    return names


@pytest.mark.parametrize("package_name", _packages())
def test_no_exported_name_hides_a_module(package_name):
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        attribute = getattr(package, info.name, None)
        if attribute is None:
            continue
        assert isinstance(attribute, types.ModuleType), (
            f"{package_name}.{info.name} is a {type(attribute).__name__}, not the module"
        )
        assert attribute.__name__ == f"{package_name}.{info.name}"


def test_the_cli_commands_live_in_their_modules():
    import cupy_bn.cli as cli

    for name in ("info", "gradcheck", "fold", "bench"):
        module = importlib.import_module(f"cupy_bn.cli.{name}")
        assert getattr(cli, name) is module
        assert cli.main.commands[name] is getattr(module, name)
