"""kernels/ is the bottom package: no module in it imports moeforge's moe, parallel, launch or tools
(read with ``ast``, so imports inside functions count too), and its refusals are still the
project's ``ConfigError``, caught by ``except moe.errors.ConfigError`` with the message unchanged."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kernels.layout import BlockSizes
from moe.errors import ConfigError, MoeforgeError

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
ABOVE = {"moe", "parallel", "launch", "tools"}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in ``path``, wherever the import sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_in_kernels_imports_a_package_above_it() -> None:
    paths = sorted(KERNELS.rglob("*.py"))
    assert {p.relative_to(KERNELS).as_posix() for p in paths} >= {"layout.py", "errors.py", "triton/moe_experts.py"}
    upward = {p.relative_to(KERNELS).as_posix(): sorted(imported_packages(p) & ABOVE) for p in paths}
    assert {name: pkgs for name, pkgs in upward.items() if pkgs} == {}


def test_a_bad_block_size_is_the_projects_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^kernels\.block_m \(48\) must be a power of two >= 16 \(tl\.dot's minimum\)$") as err:
        BlockSizes(block_m=48)
    assert isinstance(err.value, MoeforgeError) and isinstance(err.value, ValueError)
