"""Training data: the embedded stdlib byte corpus and memmap token shards, with exact resume.

Shape legend: B batch (sequences), S sequence length.

Batches are addressed, not streamed: batch ``i`` of split ``train`` is a deterministic function of
``(seed, i)`` (window offsets drawn from a generator seeded with both), so the loader's whole
position is the next batch index. A resumed run that restores that index sees exactly the batches
it would have seen. Each rank takes its contiguous share of the global batch.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe.errors import DataError

DOC_SEPARATOR = 0
"""Byte written between source files of the stdlib corpus (NUL never occurs in .py source)."""


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    description: str


def stdlib_corpus(val_fraction: float, max_bytes: int, root: Path | None = None) -> TokenSplits:
    """Bytes of the running Python's standard library ``.py`` files, in sorted path order.

    ``site-packages`` and the ``test``/``tests`` packages are skipped (they vary between installs).
    A file goes to validation when ``crc32(relative path) % 1000 < 1000 * val_fraction``, so the
    split never depends on file order or on ``max_bytes``. Files are joined with ``DOC_SEPARATOR``.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = _python_files(root)
    if not files:
        raise DataError(f"data=stdlib_bytes: no .py files found under the standard library at {root}")
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    train_size = val_size = 0
    val_cap = int(max_bytes * val_fraction / (1 - val_fraction))
    for path in files:
        rel = path.relative_to(root).as_posix()
        is_val = zlib.crc32(rel.encode()) % 1000 < 1000 * val_fraction
        if (is_val and val_size >= val_cap) or (not is_val and train_size >= max_bytes):
            continue
        data = path.read_bytes().replace(bytes([DOC_SEPARATOR]), b"") + bytes([DOC_SEPARATOR])
        (val_parts if is_val else train_parts).append(data)
        if is_val:
            val_size += len(data)
        else:
            train_size += len(data)
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    val = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    return TokenSplits(train, val, f"stdlib bytes from {root}: {train.size:,} train / {val.size:,} val bytes")


_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def _python_files(root: Path) -> list[Path]:
    """Sorted ``.py`` files under ``root``, pruning ``_SKIPPED_DIRS`` without descending into them."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def memmap_corpus(path: str, dtype: str, val_fraction: float, vocab_size: int) -> TokenSplits:
    """Pre-tokenized shards: ``path`` is a ``.bin`` file or a folder of ``.bin`` files of ``dtype``.

    Shards are read in sorted name order and concatenated; the last ``val_fraction`` of tokens is
    validation. Every shard is checked before training: size a multiple of the item size, token
    ids below ``vocab_size`` (so a wrong dtype or tokenizer fails here, not in the embedding), and,
    for ``uint16``, that it does not look like ``uint32`` ids (``uint32_as_uint16``), whose ids
    would all pass the vocabulary check.
    """
    p = Path(path)
    shards = sorted(p.glob("*.bin")) if p.is_dir() else [p]
    if not shards or not all(s.is_file() for s in shards):
        raise DataError(f"data.path ({path!r}) has no .bin shards")
    itemsize = np.dtype(dtype).itemsize
    arrays = []
    for shard in shards:
        size = shard.stat().st_size
        if size == 0 or size % itemsize:
            raise DataError(f"data.path shard {shard} has {size} bytes, not a positive multiple of {itemsize} (data.dtype={dtype})")
        arr = np.memmap(shard, dtype=dtype, mode="r")
        top = int(arr.max())
        if top >= vocab_size:
            raise DataError(f"data.path shard {shard} holds token id {top} >= model.vocab_size ({vocab_size}); wrong data.dtype or vocab?")
        zeros = uint32_as_uint16(arr) if dtype == "uint16" else None
        if zeros is not None:
            raise DataError(
                f"data.path shard {shard} looks like uint32 token ids read with data.dtype=uint16: {zeros[0]:.0%} of its "
                f"odd-position values are 0 against {zeros[1]:.0%} of the even ones; set data.dtype=uint32"
            )
        arrays.append(arr)
    tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    n_val = max(1, int(tokens.size * val_fraction))
    train, val = tokens[:-n_val], tokens[-n_val:]
    return TokenSplits(train, val, f"memmap {len(shards)} shard(s) at {path}: {train.size:,} train / {val.size:,} val tokens")


def uint32_as_uint16(tokens: np.ndarray, sample: int = 1 << 20) -> tuple[float, float] | None:
    """(share of zeros at odd positions, at even positions) when ``tokens`` look like uint32 ids seen as uint16.

    Read as uint16, little-endian uint32 ids below 65536 alternate (id, 0): every odd position is
    0. In a real token stream the position's parity means nothing, so both shares are about the
    frequency of token 0. Flagged when the odd share exceeds the even one by more than 0.5, on
    up to ``sample`` values from 16 windows spread over the file; None otherwise.
    """
    n = tokens.size - tokens.size % 2
    if n < 64:
        return None
    width = max(2, min(n, sample) // 16 // 2 * 2)
    starts = np.linspace(0, n - width, 16).astype(np.int64) // 2 * 2
    values = np.concatenate([np.asarray(tokens[s : s + width]) for s in starts])
    odd, even = float((values[1::2] == 0).mean()), float((values[0::2] == 0).mean())
    return (odd, even) if odd - even > 0.5 else None


def token_counts(tokens: np.ndarray, vocab_size: int, max_tokens: int, windows: int = 64) -> Tensor:
    """int64 [vocab_size] counts of token ids over at most ``max_tokens`` tokens of ``tokens``.

    The whole array when it is short enough; otherwise ``windows`` evenly spaced contiguous
    windows of ``max_tokens // windows`` tokens, so a memmap is read in a few sequential runs and
    the sample spans the whole split. Deterministic: every rank gets the same counts.
    """
    if tokens.size <= max_tokens:
        parts = [tokens]
    else:
        width = max(1, max_tokens // windows)
        starts = np.linspace(0, tokens.size - width, windows).astype(np.int64)
        parts = [tokens[s : s + width] for s in starts]
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in parts:
        ids = np.asarray(part, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(f"token ids must be in [0, model.vocab_size={vocab_size}); found {int(ids.min())}..{int(ids.max())}")
        counts += np.bincount(ids, minlength=vocab_size)
    return torch.from_numpy(counts)


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; batch ``i`` depends only on ``(seed, split, i)``."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, split_id: int = 0,
                 split: str = "training") -> None:
        if tokens.size < seq_len + 2:
            hint = "raise data.val_fraction or " if split == "validation" else ""
            raise DataError(f"the {split} split has {tokens.size} tokens, fewer than train.seq_len + 2 ({seq_len + 2}); "
                            f"{hint}lower train.seq_len, or use more data")
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.seed, self.split_id = seed, split_id
        per_rank = global_batch // world_size
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """(inputs_BS, targets_BS) int64 for this rank's rows of global batch ``index``."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.split_id) * 1_000_000_007 + index)
        starts = torch.randint(0, self.tokens.size - self.seq_len - 1, (self.global_batch,), generator=g)[self.rows]
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts.tolist()])
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]
