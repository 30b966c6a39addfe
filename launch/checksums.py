"""SHA-256 digests of checkpoint files, and their verification.

A checkpoint's manifest lists every file it is made of with its size and SHA-256 (hashlib); a
checkpoint is only loaded after every listed file is present, has its size and hashes to its
digest. The size is compared first, so a truncated or emptied file is named without reading it.
Each rank hashes a disjoint share of the files (``share``), so hashing a large checkpoint
takes about 1/world of the time it would on one rank.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of ``path``'s bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` hashes: every ``world_size``-th of the sorted names."""
    return sorted(names)[rank::world_size]


def digests(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` for each file ``root / name``."""
    return {name: {"bytes": (root / name).stat().st_size, "sha256": file_sha256(root / name)} for name in names}


def problems(root: Path, listed: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """What is wrong with files ``names`` of checkpoint ``root`` against the manifest's ``listed`` digests.

    Each problem names the file: ``__0_0.distcp is missing``, ``.metadata has 0 bytes, the
    manifest says 1372``, ``__0_0.distcp does not match its SHA-256 (contents changed)``.
    """
    found = []
    for name in names:
        path, want = root / name, listed[name]
        if not path.is_file():
            found.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            found.append(f"{name} has {size} bytes, the manifest says {want['bytes']}")
        elif file_sha256(path) != want["sha256"]:
            found.append(f"{name} does not match its SHA-256 (contents changed)")
    return found
