"""moeforge's model package: routers, dispatch, experts, the MoE layer, the transformer, stats.

moeforge's import names (``moe``, ``kernels``, ``parallel``, ``launch``, ``tools``) are also the
names of unrelated packages on the public index. Install moeforge in its own virtual environment;
importing ``moe`` checks that the sibling ``kernels`` package is ours and fails loudly if not.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _check_sibling(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return
    origin = Path(spec.origin).resolve()
    if _ROOT not in origin.parents:
        raise ImportError(
            f"the package '{name}' imported from {origin} is not moeforge's own ({_ROOT / name}); "
            f"a foreign '{name}' package shadows it. Install moeforge in its own virtual environment "
            f"(pip uninstall {name}) or put moeforge's root first on sys.path."
        )


_check_sibling("kernels")
