"""moeforge's model package: routers, dispatch, experts, the MoE layer, the transformer, stats.

Shape legend. A tensor's name ends in one letter per dimension, so ``x_TD`` is ``[T, D]``; a digit
is a literal size (``w_sigmoid_D1`` is ``[D, 1]``) and ``E1`` is E + 1 entries (an offset table).
Every module of this package uses these letters with these meanings; ``moe/routers/`` keeps its
own legend (``moe/routers/interface.py``), and ``kernels/`` and ``parallel/`` theirs (``kernels/``
writes the slots ``S``).

- ``B`` batch: sequences in one forward.
- ``S`` sequence: positions in one forward (the new positions when a KV cache holds earlier ones).
- ``P`` cached positions: every position a KV cache holds, earlier ones and the ``S`` new ones.
- ``T`` tokens: ``B*S`` flattened.
- ``D`` model dim; ``d`` head dim (``D / H``).
- ``H`` query heads; ``G`` key/value heads (grouped-query attention; ``G = H`` without it). RoPE
  takes either kind, and names them ``H``.
- ``V`` vocabulary.
- ``C`` tokens in one chunk of the output head's chunked loss.
- ``E`` experts.
- ``F`` hidden width of an FFN (an expert's ``d_ff``; the dense FFN's and the shared experts' own).
- ``K`` slots per token: the routing choices one token may use (top-k).
- ``A`` slots of the forward: ``T*K`` (token, choice) pairs, numbered token-major (``a = t*K + j``).
- ``R`` routed rows: the kept slots, sorted by expert.

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
