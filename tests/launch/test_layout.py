"""The shape of launch/, read from its source (the repository-wide import graph, private names and
function length are tests/test_house.py's): an engine registry that is the only place an engine name is looked up, and tools that compose a job
without the trainer.

Imports are read with ``ast`` wherever they sit: module level, inside functions and under
``TYPE_CHECKING`` all count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from launch.config import EngineConfig
from launch.engines import ENGINES, engine_class

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*packages: str) -> dict[str, ast.Module]:
    """Every module of ``packages`` by dotted name, parsed."""
    return {module_name(p): ast.parse(p.read_text(), str(p)) for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` imports anywhere (``from a import b`` is ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found |= {sub} if sub in known else {node.module} & known
    return found


def test_the_config_schemas_import_no_engine_and_the_engines_no_trainer() -> None:
    trees = sources("launch")
    config = imported_modules(trees["launch.config"], set(trees))
    assert not {m for m in config if m.startswith(("launch.engines", "launch.job", "launch.train"))}, config
    for name, tree in trees.items():
        if name.startswith("launch.engines"):
            assert not imported_modules(tree, set(trees)) & {"launch.job", "launch.train", "launch.train_step"}, name


def test_train_imports_the_engine_registry_only() -> None:
    trees = sources("launch")
    engines = {m for m in imported_modules(trees["launch.train"], set(trees)) if m.startswith("launch.engines")}
    assert engines == {"launch.engines"}


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_engine_owns_its_config_and_yaml(name: str) -> None:
    cls = engine_class(name)
    assert issubclass(cls.Config, EngineConfig) and cls.Config is not EngineConfig
    assert {f.name: f.default for f in fields(cls.Config)}["name"] == name
    text = (REPO / "conf" / "engine" / f"{name}.yaml").read_text()
    assert f"/schema/engine/{name}@_here_" in text
    assert sorted(p.stem for p in (REPO / "conf" / "engine").glob("*.yaml")) == sorted(ENGINES)


def test_no_engine_name_is_compared_outside_the_registry() -> None:
    found = []
    for name, tree in sources("launch", "tools").items():
        if name == "launch.engines":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                values = [v for side in [node.left, *node.comparators]
                          for v in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side])]
                if any(isinstance(v, ast.Constant) and v.value in ENGINES for v in values):
                    found.append(f"{name}:{node.lineno}")
    assert not found, found


@pytest.mark.slow
def test_a_tool_composes_a_job_without_importing_the_trainer() -> None:
    code = ("import sys\nfrom tools.hf.checkpoint import compose_job\n"
            "job = compose_job(['logging=none', 'checkpoint.dir=unused', 'engine=deepspeed', 'parallel=ddp'])\n"
            "print(type(job.engine).__name__, job.engine.zero_stage, 'launch.train' in sys.modules, 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["DeepSpeedConfig", "0", "False", "False"]
