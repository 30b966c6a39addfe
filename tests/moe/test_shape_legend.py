"""Shape suffixes in the ``moe`` package (routers aside) use only the letters its legend defines.

The legend is the list in ``moe/__init__.py``'s docstring (lines ``- ``X`` meaning``); a suffix is
what follows the last ``_`` of a lower-case name when it starts with a capital (``x_TD``,
``w_sigmoid_D1``, ``k_BGPd``). A letter outside the legend means a second legend crept in.
"""

from __future__ import annotations

import re
from pathlib import Path

import moe

ROOT = Path(moe.__file__).parent
SUFFIX = re.compile(r"\b[a-z][a-z0-9_]*_([A-Z][A-Za-z0-9]*)\b")


def legend_letters() -> set[str]:
    letters = set()
    for line in (moe.__doc__ or "").splitlines():
        if line.startswith("- ``"):
            letters |= set(re.findall(r"``([A-Za-z])``", line.split(":")[0]))
    return letters


def test_the_legend_defines_each_letter_once() -> None:
    defined = [re.match(r"- ``([A-Za-z])``", line).group(1) for line in (moe.__doc__ or "").splitlines()
               if re.match(r"- ``[A-Za-z]``", line)]
    assert len(defined) == len(set(defined)) and {"S", "A", "K", "R", "T"} <= set(defined)


def test_every_suffix_letter_is_in_the_legend() -> None:
    allowed = legend_letters() | set("0123456789")
    files = [p for p in ROOT.rglob("*.py") if "routers" not in p.relative_to(ROOT).parts]
    assert len(files) > 10
    stray = sorted({f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in SUFFIX.finditer(p.read_text())
                    if not set(m.group(1)) <= allowed})
    assert not stray, stray
