"""The parallel-mode registry: each mode's facts, its YAML, and no mode name compared outside ``parallel/modes``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from parallel import ParallelConfig
from parallel.modes import MODES, check_config, names_where, parallel_mode

REPO = Path(__file__).resolve().parents[2]

# name: (distributed, replicates_parameters, splits_experts, gathers_parameters, places_dense, group_size_key, CUDA-graph capturable)
FACTS = {
    "none": (False, True, False, False, False, None, True),
    "ddp": (True, True, False, False, True, None, True),
    "fsdp": (True, False, False, True, True, None, False),
    "ep": (True, False, True, False, False, "parallel.ep_size", False),
    "fssdp": (True, False, True, True, False, "parallel.fssdp.shard_size", False),
}


def test_each_mode_states_its_facts() -> None:
    assert all(mode.name == name for name, mode in MODES.items())
    for name, want in FACTS.items():
        mode = MODES[name]
        facts = (mode.distributed, mode.replicates_parameters, mode.splits_experts, mode.gathers_parameters, mode.places_dense,
                 mode.group_size_key, mode.capture_refusal is None)
        assert facts == want, name
    assert [n for n in names_where(lambda m: m.distributed) if n in FACTS] == ["ddp", "fsdp", "ep", "fssdp"]
    assert [n for n in names_where(lambda m: m.places_dense) if n in FACTS] == ["ddp", "fsdp"]


@pytest.mark.parametrize(("mode", "world", "size", "mesh_2d"), [
    (ParallelConfig(mode="ddp"), 4, 4, False),
    (ParallelConfig(mode="fsdp"), 4, 4, False),
    (ParallelConfig(mode="ep"), 4, 4, True),  # EP always has its ("edp", "ep") mesh, even of one group
    (ParallelConfig(mode="ep", ep_size=2), 4, 2, True),
    (ParallelConfig(mode="fssdp"), 4, 4, False),
    (ParallelConfig(mode="fssdp", fssdp=dict(shard_size=2)), 4, 2, True),
])
def test_expert_group_size_and_mesh(mode: ParallelConfig, world: int, size: int, mesh_2d: bool) -> None:
    assert parallel_mode(mode.mode).expert_group_size(mode, world) == size
    assert parallel_mode(mode.mode).needs_expert_mesh(mode, world) is mesh_2d


def test_config_resolves_to_its_registered_mode() -> None:
    assert check_config(ParallelConfig(mode="ep", dense="fsdp")) is MODES["ep"]
    assert parallel_mode("fsdp") is MODES["fsdp"]


def test_every_mode_has_its_yaml_and_every_yaml_a_mode() -> None:
    files = sorted((REPO / "conf" / "parallel").glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(MODES)
    for f in files:
        assert yaml.safe_load(f.read_text())["mode"] == f.stem, f


def _compares_a_name(node: ast.Compare) -> bool:
    """``<x>.mode == "ep"``, ``mode in ("ddp", "ep")``, ``dense != "fsdp"`` ... against a registered name."""
    left = node.left.attr if isinstance(node.left, ast.Attribute) else node.left.id if isinstance(node.left, ast.Name) else ""
    if left not in ("mode", "dense"):
        return False
    for right in node.comparators:
        values = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
        if any(isinstance(v, ast.Constant) and v.value in MODES for v in values):
            return True
    return False


def test_no_mode_name_is_compared_outside_the_registry() -> None:
    found = []
    for folder in ("parallel", "launch", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "modes" in path.relative_to(REPO).parts:
                continue
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Compare) and _compares_a_name(n)]
    assert found == []


def test_parallel_package_has_no_import_cycle() -> None:
    """Every ``import`` in parallel/ (``TYPE_CHECKING`` ones included) forms no cycle: the schema
    (``config``) sits below the mode registry, which sits below the runtime's setup (``layout``)."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in (REPO / "parallel").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        edges[name] = {t for t in targets if t in files and t != name}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name not in done:
            for target in sorted(edges[name]):
                visit(target, path + [name])
            done.add(name)

    for name in sorted(files):
        visit(name, [])
