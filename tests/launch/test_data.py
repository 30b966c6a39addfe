"""Data: the stdlib corpus split, memmap shard checks, addressed batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data import DOC_SEPARATOR, BatchSampler, memmap_corpus, stdlib_corpus
from moe.errors import DataError


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_stdlib_corpus_fixed_order_and_skips(tmp_path: Path) -> None:
    make_tree(tmp_path, {"b.py": b"bbb", "a.py": b"aaa", "pkg/c.py": b"ccc", "site-packages/x.py": b"xxx",
                         "test/t.py": b"ttt", "notes.txt": b"nnn"})
    splits = stdlib_corpus(0.01, 100_000, root=tmp_path)
    text = bytes(np.concatenate([splits.train, splits.val]))
    sep = bytes([DOC_SEPARATOR])
    assert sorted(text.split(sep)[:-1]) == [b"aaa", b"bbb", b"ccc"]
    assert splits.train.size + splits.val.size == 12


def test_stdlib_corpus_real_split_is_disjoint_and_stable() -> None:
    a = stdlib_corpus(0.05, 300_000)
    b = stdlib_corpus(0.05, 300_000)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.size >= 300_000 and a.val.size > 5_000
    # A validation file never appears in training: its first 200 bytes are not a training substring.
    first_val_doc = bytes(a.val[: 200])
    assert first_val_doc not in bytes(a.train)


def test_memmap_reads_shards_in_order_and_holds_out_tail(tmp_path: Path) -> None:
    np.arange(0, 1000, dtype=np.uint16).tofile(tmp_path / "00.bin")
    np.arange(1000, 2000, dtype=np.uint16).tofile(tmp_path / "01.bin")
    splits = memmap_corpus(str(tmp_path), "uint16", 0.1, vocab_size=5000)
    assert splits.train.size == 1800 and splits.val.size == 200
    assert splits.train[0] == 0 and splits.val[0] == 1800 and splits.val[-1] == 1999


def test_memmap_refuses_bad_shards(tmp_path: Path) -> None:
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="odd.bin has 3 bytes"):
        memmap_corpus(str(tmp_path / "odd.bin"), "uint16", 0.1, vocab_size=5000)
    np.array([1, 2, 70000], dtype=np.uint32).tofile(tmp_path / "big.bin")
    with pytest.raises(DataError, match="token id 70000 >= model.vocab_size"):
        memmap_corpus(str(tmp_path / "big.bin"), "uint32", 0.1, vocab_size=50000)
    with pytest.raises(DataError, match="no .bin shards"):
        memmap_corpus(str(tmp_path / "nothing_here"), "uint16", 0.1, vocab_size=5000)


def test_batches_are_addressed_and_ranks_split_the_global_batch() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    whole = BatchSampler(tokens, 16, 8, seed=3)
    x, y = whole.batch(5)
    x2, _ = BatchSampler(tokens, 16, 8, seed=3).batch(5)
    assert torch.equal(x, x2)
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive ids in this corpus
    assert not torch.equal(whole.batch(6)[0], x)
    parts = [BatchSampler(tokens, 16, 8, seed=3, rank=r, world_size=2).batch(5)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), x)


def test_too_small_corpus_is_refused_naming_the_split() -> None:
    with pytest.raises(DataError, match=r"the training split has 10 tokens, fewer than train.seq_len \+ 2 \(18\); lower"):
        BatchSampler(np.arange(10, dtype=np.uint16), 16, 2, seed=0)
    with pytest.raises(DataError, match=r"the validation split has 10 tokens, .* raise data.val_fraction or lower train.seq_len"):
        BatchSampler(np.arange(10, dtype=np.uint16), 16, 2, seed=0, split_id=1, split="validation")


def test_uint32_ids_read_as_uint16_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, 20_000).clip(0, 50_000).astype(np.uint32)  # every id < 65536: the uint16 view passes the vocab check
    ids.tofile(tmp_path / "ids.bin")
    with pytest.raises(DataError, match=r"ids.bin looks like uint32 token ids read with data.dtype=uint16: 100% of its odd-position "
                                         r"values are 0 against 0% of the even ones; set data.dtype=uint32"):
        memmap_corpus(str(tmp_path / "ids.bin"), "uint16", 0.1, vocab_size=50_304)
    assert memmap_corpus(str(tmp_path / "ids.bin"), "uint32", 0.1, vocab_size=50_304).train.size == 18_000


def test_real_uint16_streams_with_many_zeros_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids = np.where(rng.random(50_000) < 0.4, 0, rng.integers(1, 50_000, 50_000)).astype(np.uint16)  # token 0 is 40% of the text
    ids.tofile(tmp_path / "zeros.bin")
    assert memmap_corpus(str(tmp_path / "zeros.bin"), "uint16", 0.1, vocab_size=50_304).train.size == 45_000


def test_token_counts_whole_and_windowed() -> None:
    from launch.data import token_counts

    tokens = np.array([0, 1, 1, 2, 2, 2, 4], dtype=np.uint16)
    assert token_counts(tokens, 6, 100).tolist() == [1, 2, 3, 0, 1, 0]
    # 1000 tokens, 4 windows of 25 over a ramp of ids 0..999: windows start at 0, 325, 650, 975.
    ramp = np.arange(1000, dtype=np.uint16)
    counts = token_counts(ramp, 1000, 100, windows=4)
    assert int(counts.sum()) == 100
    assert [int(i) for i in torch.nonzero(counts).flatten()[[0, 25, 50, 75]]] == [0, 325, 650, 975]
    with pytest.raises(DataError, match=r"model.vocab_size=3"):
        token_counts(tokens, 3, 100)
