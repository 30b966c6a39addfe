"""Training data: the embedded stdlib byte corpus and memmap token shards, with exact resume.

Shape legend: B batch (sequences), S sequence length.

Batches are addressed, not streamed: batch ``i`` of split ``train`` is a deterministic function of
``(seed, i)`` (window offsets drawn from a generator seeded with both), so the loader's whole
position is the next batch index. A resumed run that restores that index sees exactly the batches
it would have seen. Each rank takes its contiguous share of the global batch.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import Tensor

from moe.errors import DataError

DOC_SEPARATOR = 0
"""Byte written between source files of the stdlib corpus (NUL never occurs in .py source)."""


@dataclass
class TokenSplits:
    train: Tokens
    val: Tokens
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


SAMPLE_WINDOWS = 64
"""Start-up check: evenly spaced windows read from the whole token range (see ``ShardedTokens.sample``)."""
SAMPLE_WIDTH = 4096
"""Start-up check: tokens per sample window (even, so uint16 positions keep their parity)."""


class ShardedTokens:
    """Token ids ``[start, stop)`` of the concatenation of ``.bin`` shards, read lazily.

    Shard lengths come from file sizes, so opening any number of shards reads no token; a shard is
    memory-mapped the first time a read touches it. ``tokens[a:b]`` returns a numpy array (a view
    into one shard's memmap, or a copy when the range straddles shards) and ``tokens[i]`` one id,
    so code written for a plain array (``size``, slicing) works unchanged. ``view`` gives a
    sub-range sharing the open memmaps: the train and validation splits of one corpus.
    ``windows`` is the checked read of a batch: every id against ``vocab_size``, naming the shard
    and offset of the first bad one.
    """

    def __init__(self, paths: list[Path], dtype: str, vocab_size: int) -> None:
        self.paths = list(paths)
        self.dtype = np.dtype(dtype).newbyteorder("<")  # shards are little-endian on every host
        self.vocab_size = vocab_size
        sizes = [p.stat().st_size for p in self.paths]
        for path, size in zip(self.paths, sizes):
            if size == 0 or size % self.dtype.itemsize:
                raise DataError(f"data.path shard {path} has {size} bytes, not a positive multiple of "
                                f"{self.dtype.itemsize} (data.dtype={dtype})")
        self.offsets = np.cumsum([0] + [s // self.dtype.itemsize for s in sizes], dtype=np.int64)
        self._maps: list[np.memmap | None] = [None] * len(self.paths)
        self.start, self.stop = 0, int(self.offsets[-1])

    @property
    def size(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return self.size

    def view(self, start: int, stop: int) -> ShardedTokens:
        """Tokens ``[start, stop)`` of this range, sharing its open memmaps."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"view [{start}, {stop}) outside a range of {self.size} tokens")
        out = object.__new__(ShardedTokens)
        out.__dict__.update(self.__dict__)
        out.start, out.stop = self.start + start, self.start + stop
        return out

    def __getitem__(self, key: int | slice) -> np.ndarray | np.integer:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.size)
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            return self._read(self.start + lo, self.start + max(lo, hi))
        index = int(key) + (self.size if int(key) < 0 else 0)
        if not 0 <= index < self.size:
            raise IndexError(f"token {key} outside a range of {self.size} tokens")
        return self._read(self.start + index, self.start + index + 1)[0]

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, offset in that shard) of global token ``position`` (this range's ``start`` included)."""
        shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return shard, position - int(self.offsets[shard])

    def shard(self, index: int) -> np.memmap:
        """Shard ``index``'s memmap, opened on first use."""
        arr = self._maps[index]
        if arr is None:
            arr = self._maps[index] = np.memmap(self.paths[index], dtype=self.dtype, mode="r")
        return arr

    def _piece(self, index: int, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` of shard ``index``: every read of token data goes through here."""
        return np.asarray(self.shard(index)[lo:hi])

    def _read(self, lo: int, hi: int) -> np.ndarray:
        """Global tokens ``[lo, hi)``: a view when they lie in one shard, else a concatenated copy."""
        pieces = []
        while lo < hi:
            index, offset = self.locate(lo)
            take = min(hi - lo, int(self.offsets[index + 1]) - lo)
            pieces.append(self._piece(index, offset, offset + take))
            lo += take
        if not pieces:
            return np.empty(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, starts: list[int], width: int) -> np.ndarray:
        """int64 [len(starts), width]: tokens ``[s, s + width)`` of this range for each start, ids checked.

        One comparison of the batch's maximum against ``vocab_size`` in the common case; the
        first bad id is located only when there is one, and named by shard file and offset.
        """
        first = np.asarray(starts, dtype=np.int64) + self.start
        if first.size and (first.min() < self.start or first.max() + width > self.stop):
            raise IndexError(f"windows of {width} tokens at {starts} leave a range of {self.size} tokens")
        shard_of = np.searchsorted(self.offsets, first, side="right") - 1
        inside = first + width <= self.offsets[shard_of + 1]
        out = np.empty((first.size, width), dtype=np.int64)
        for row, (pos, index, whole) in enumerate(zip(first.tolist(), shard_of.tolist(), inside.tolist())):
            lo = pos - int(self.offsets[index])
            out[row] = self._piece(index, lo, lo + width) if whole else self._read(pos, pos + width)
        if out.size and int(out.max()) >= self.vocab_size:
            row, col = (int(i[0]) for i in np.nonzero(out >= self.vocab_size))
            self._bad_id(self.start + starts[row] + col, int(out[row, col]))
        return out

    def _bad_id(self, position: int, value: int) -> NoReturn:
        index, offset = self.locate(position)
        raise DataError(f"data.path shard {self.paths[index]} holds token id {value} >= model.vocab_size ({self.vocab_size}) "
                        f"at token {offset:,} (byte {offset * self.dtype.itemsize:,}); wrong data.dtype, vocab or tokenizer?")

    def sample(self, windows: int = SAMPLE_WINDOWS, width: int = SAMPLE_WIDTH) -> list[tuple[int, int, np.ndarray]]:
        """(shard index, offset, ids) for ``windows`` evenly spaced windows of up to ``width`` tokens.

        Each window starts at an even offset of one shard and is cut at that shard's end (so a
        shard's odd/even positions stay aligned for ``uint32_as_uint16``); together they read at
        most ``windows * width`` tokens, whatever the corpus size.
        """
        out = []
        for pos in np.linspace(self.start, max(self.start, self.stop - width), windows).astype(np.int64).tolist():
            index, offset = self.locate(pos)
            offset -= offset % 2
            end = min(offset + width, int(self.offsets[index + 1]) - int(self.offsets[index]))
            out.append((index, offset, self._piece(index, offset, end)))
        return out

    def check_sample(self) -> None:
        """Start-up check on ``sample()``: ids below ``vocab_size`` and, for uint16, not uint32 ids."""
        by_shard: dict[int, list[np.ndarray]] = {}
        for index, offset, ids in self.sample():
            if ids.size and int(ids.max()) >= self.vocab_size:
                col = int(np.argmax(ids >= self.vocab_size))
                self._bad_id(int(self.offsets[index]) + offset + col, int(ids[col]))
            by_shard.setdefault(index, []).append(ids[: ids.size // 2 * 2])
        if self.dtype.itemsize != 2:
            return
        for index, parts in sorted(by_shard.items()):
            zeros = uint32_as_uint16(np.concatenate(parts))
            if zeros is not None:
                raise DataError(
                    f"data.path shard {self.paths[index]} looks like uint32 token ids read with data.dtype=uint16: {zeros[0]:.0%} of its "
                    f"odd-position values are 0 against {zeros[1]:.0%} of the even ones; set data.dtype=uint32"
                )


Tokens = np.ndarray | ShardedTokens
"""A split's token ids: a plain array (stdlib corpus) or a lazy range over shards (memmap)."""


def memmap_corpus(path: str, dtype: str, val_fraction: float, vocab_size: int) -> TokenSplits:
    """Pre-tokenized shards: ``path`` is a ``.bin`` file or a folder of ``.bin`` files of ``dtype``.

    Shards are read in sorted name order as one token range (``ShardedTokens``: nothing is loaded
    or scanned at start); the last ``val_fraction`` of tokens is validation. At start every shard's
    size must be a positive multiple of the item size, and a bounded sample (``ShardedTokens.sample``)
    must hold ids below ``vocab_size`` and, for ``uint16``, not look like ``uint32`` ids
    (``uint32_as_uint16``), whose ids would all pass the vocabulary check. Every batch is checked
    against ``vocab_size`` when it is read. A folder written by ``tools.prepare_data`` also has a
    ``meta.json``: its dtype, vocabulary and shard list must agree with the config and the files.
    """
    p = Path(path)
    shards = sorted(p.glob("*.bin")) if p.is_dir() else [p]
    if not shards or not all(s.is_file() for s in shards):
        raise DataError(f"data.path ({path!r}) has no .bin shards")
    if p.is_dir() and (p / META_FILE).is_file():
        check_meta(p / META_FILE, shards, dtype, vocab_size)
    tokens = ShardedTokens(shards, dtype, vocab_size)
    tokens.check_sample()
    n_val = max(1, int(tokens.size * val_fraction))
    train, val = tokens.view(0, tokens.size - n_val), tokens.view(tokens.size - n_val, tokens.size)
    return TokenSplits(train, val, f"memmap {len(shards)} shard(s) at {path}: {train.size:,} train / {val.size:,} val tokens")


META_FILE = "meta.json"
"""Written by ``tools.prepare_data`` beside its shards, last, so its presence means a finished run."""


def check_meta(meta_path: Path, shards: list[Path], dtype: str, vocab_size: int) -> None:
    """Refuse a config or folder that disagrees with ``meta.json``, naming the key to change."""
    try:
        meta = json.loads(meta_path.read_text())
        meta_dtype, meta_vocab = str(meta["dtype"]), int(meta["vocab_size"])
        listed = {str(s["file"]): int(s["tokens"]) for s in meta["shards"]}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is not a prepare_data meta.json ({type(err).__name__}: {err})") from err
    if meta_dtype != dtype:
        raise DataError(f"{meta_path} says the shards are {meta_dtype} but data.dtype={dtype}; set data.dtype={meta_dtype}")
    if meta_vocab > vocab_size:
        raise DataError(f"{meta_path} says the tokenizer has {meta_vocab} ids but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size={meta_vocab} (or more)")
    found = {s.name: s for s in shards}
    if set(found) != set(listed):
        missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
        raise DataError(f"data.path {meta_path.parent} does not match its meta.json: missing shards {missing}, unlisted shards {extra}")
    itemsize = np.dtype(dtype).itemsize
    for name, count in sorted(listed.items()):
        size = found[name].stat().st_size
        if size != count * itemsize:
            raise DataError(f"data.path shard {found[name]} has {size} bytes but meta.json records {count} tokens "
                            f"({count * itemsize} bytes); the shard was truncated or replaced")


def uint32_as_uint16(values: np.ndarray) -> tuple[float, float] | None:
    """(share of zeros at odd positions, at even positions) when ``values`` look like uint32 ids seen as uint16.

    Read as uint16, little-endian uint32 ids below 65536 alternate (id, 0): every odd position is
    0. In a real token stream the position's parity means nothing, so both shares are about the
    frequency of token 0. ``values`` are even-aligned runs of one shard (``ShardedTokens.sample``).
    Flagged when the odd share exceeds the even one by more than 0.5; None otherwise, or when
    there are fewer than 64 values to judge by.
    """
    if values.size < 64:
        return None
    odd, even = float((values[1::2] == 0).mean()), float((values[0::2] == 0).mean())
    return (odd, even) if odd - even > 0.5 else None


def token_counts(tokens: Tokens, vocab_size: int, max_tokens: int, windows: int = 64) -> Tensor:
    """int64 [vocab_size] counts of token ids over at most ``max_tokens`` tokens of ``tokens``.

    The whole array when it is short enough; otherwise ``windows`` evenly spaced contiguous
    windows of ``max_tokens // windows`` tokens, so a memmap is read in a few sequential runs and
    the sample spans the whole split. Deterministic: every rank gets the same counts.
    """
    if tokens.size <= max_tokens:
        parts = [tokens[0 : tokens.size]]
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

    def __init__(self, tokens: Tokens, seq_len: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, split_id: int = 0,
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
        w = torch.from_numpy(read_windows(self.tokens, starts.tolist(), self.seq_len + 1))
        return w[:, :-1], w[:, 1:]


def read_windows(tokens: Tokens, starts: list[int], width: int) -> np.ndarray:
    """int64 [len(starts), width]: ``tokens[s : s + width]`` per start; shard ranges check their ids (``ShardedTokens.windows``)."""
    if isinstance(tokens, ShardedTokens):
        return tokens.windows(starts, width)
    return np.stack([np.asarray(tokens[s : s + width], dtype=np.int64) for s in starts])
