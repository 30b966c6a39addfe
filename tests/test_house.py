"""The shape of the code itself: the import graph, private names and function length.

Packages stack ``kernels < moe < parallel < launch < tools``: a module may import its own
package and the ones below it, never one above (kernels know nothing of models, the model
nothing of parallelism, the trainer nothing of the tools). Every import counts, also one made
inside a function to dodge a cycle at import time. Each test first proves on a small made-up
tree that it catches what it looks for, then runs on the repository.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass, field

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "moe", "parallel", "launch", "tools")
"""Lowest first: a module may import from its own package and those before it."""
MAX_FUNCTION_LINES = 60
SHORT_FUNCTION_PACKAGES = ("launch", "moe", "parallel")


@dataclass
class Tree:
    """The project modules under ``root`` and what each imports."""

    modules: dict[str, ast.Module] = field(default_factory=dict)
    paths: dict[str, pathlib.Path] = field(default_factory=dict)

    @classmethod
    def read(cls, root: pathlib.Path) -> Tree:
        tree = cls()
        for package in LAYERS:
            for path in sorted((root / package).rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                tree.modules[name] = ast.parse(path.read_text(), filename=str(path))
                tree.paths[name] = path
        return tree

    def _absolute(self, module: str, node: ast.ImportFrom) -> str | None:
        """The absolute module an ``ImportFrom`` names (relative imports resolved), if a project one."""
        if node.level:
            is_package = self.paths[module].name == "__init__.py"
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        return target if target.split(".")[0] in LAYERS else None

    def imports(self, module: str) -> list[tuple[str, list[str], int]]:
        """``(target module, names taken from it, line)`` for every project import in ``module``.

        ``from a.b import c`` where ``a.b.c`` is a module is an import of ``a.b.c``."""
        out: list[tuple[str, list[str], int]] = []
        for node in ast.walk(self.modules[module]):
            if isinstance(node, ast.Import):
                out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in LAYERS]
            elif isinstance(node, ast.ImportFrom):
                target = self._absolute(module, node)
                if target is None:
                    continue
                names = []
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in self.modules:
                        out.append((sub, [], node.lineno))
                    else:
                        names.append(alias.name)
                if names:
                    out.append((target, names, node.lineno))
        return out

    def edges(self) -> dict[str, set[str]]:
        return {m: {t for t, _, _ in self.imports(m) if t in self.modules and t != m} for m in self.modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan 1972), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward_imports(tree: Tree) -> list[str]:
    rank = {p: i for i, p in enumerate(LAYERS)}
    return [f"{m}:{line} imports {t}"
            for m in tree.modules for t, _, line in tree.imports(m)
            if rank[t.split(".")[0]] > rank[m.split(".")[0]]]


def private_imports(tree: Tree) -> list[str]:
    """``from other import _name`` across modules (a module's own privates and dunders are fine)."""
    return [f"{m}:{line} takes {name} from {t}"
            for m in tree.modules for t, names, line in tree.imports(m) if t != m
            for name in names if name.startswith("_") and not name.startswith("__")]


def long_functions(tree: Tree, packages: tuple[str, ...], limit: int) -> list[str]:
    out = []
    for m, module in tree.modules.items():
        if m.split(".")[0] not in packages:
            continue
        for node in ast.walk(module):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{m}.{node.name} (line {node.lineno}): {length} lines")
    return out


@pytest.fixture(scope="module")
def repo() -> Tree:
    return Tree.read(ROOT)


def _write(root: pathlib.Path, files: dict[str, str]) -> Tree:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in LAYERS:
        (root / package).mkdir(exist_ok=True)
    return Tree.read(root)


def test_checks_catch_what_they_look_for(tmp_path: pathlib.Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = _write(tmp_path, {
        "moe/__init__.py": "",
        "moe/a.py": "from moe.b import thing\n",
        "moe/b.py": "def f():\n    from moe import a\n    from parallel.c import _hidden\n",
        "parallel/__init__.py": "",
        "parallel/c.py": "from . import d\n_hidden = 1\n",
        "parallel/d.py": f"def long():\n{body}\n",
    })
    assert tree.edges()["parallel.c"] == {"parallel.d"}  # a relative import resolves to its module
    assert cycles(tree.edges()) == [["moe.a", "moe.b"]]  # a function-local import still closes a cycle
    assert upward_imports(tree) == ["moe.b:3 imports parallel.c"]
    assert private_imports(tree) == ["moe.b:3 takes _hidden from parallel.c"]
    assert long_functions(tree, ("parallel",), MAX_FUNCTION_LINES) == [f"parallel.d.long (line 1): {MAX_FUNCTION_LINES + 1} lines"]


def test_no_import_cycle(repo: Tree) -> None:
    assert cycles(repo.edges()) == []


def test_no_package_imports_one_above_it(repo: Tree) -> None:
    assert upward_imports(repo) == []


def test_no_module_imports_another_modules_private_names(repo: Tree) -> None:
    assert private_imports(repo) == []


def test_no_function_over_sixty_lines_in_launch_moe_parallel(repo: Tree) -> None:
    assert long_functions(repo, SHORT_FUNCTION_PACKAGES, MAX_FUNCTION_LINES) == []
