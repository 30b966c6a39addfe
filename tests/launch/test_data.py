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


# --- Lazy shards: equal to the concatenation, bit-identical batches, sampled start-up checks ---

def write_shards(root: Path, lengths: list[int], seed: int = 0, vocab: int = 5000, dtype: str = "uint16") -> np.ndarray:
    """Random shards ``root/shard_0000i.bin`` of the given lengths; returns their concatenation, read back with np.fromfile."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        rng.integers(0, vocab, n).astype(dtype).tofile(root / f"shard_{i:05d}.bin")
    return np.concatenate([np.fromfile(root / f"shard_{i:05d}.bin", dtype=dtype) for i in range(len(lengths))])


def reference_batch(tokens: np.ndarray, seq_len: int, batch: int, seed: int, split_id: int, index: int) -> torch.Tensor:
    """The addressing rule written out: window starts from a generator seeded by (seed, split, index), over a plain array."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + split_id) * 1_000_000_007 + index)
    starts = torch.randint(0, tokens.size - seq_len - 1, (batch,), generator=g).tolist()
    return torch.tensor(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts]))


def test_sharded_tokens_equal_the_concatenation_on_random_and_straddling_windows(tmp_path: Path) -> None:
    from launch.data import ShardedTokens

    lengths = [1000, 7, 2500, 1]
    ref = write_shards(tmp_path, lengths)
    tokens = ShardedTokens(sorted(tmp_path.glob("*.bin")), "uint16", 5000)
    assert tokens.size == len(tokens) == sum(lengths) == ref.size
    rng = np.random.default_rng(1)
    ends = [1000, 1007, 3507]
    cases = [(e - 3, e + 3) for e in ends] + [(990, 1010), (0, ref.size), (1003, 1004), (5, 5)]
    cases += [tuple(sorted(rng.integers(0, ref.size + 1, 2).tolist())) for _ in range(200)]
    for a, b in cases:
        assert np.array_equal(tokens[a:b], ref[a:b]), (a, b)
    assert [int(tokens[i]) for i in (0, 1006, 1007, -1, -2)] == [int(ref[i]) for i in (0, 1006, 1007, -1, -2)]
    view = tokens.view(995, 1500)
    assert view.size == 505 and np.array_equal(view[0:505], ref[995:1500]) and np.array_equal(view[-10:], ref[1490:1500])
    windows = view.windows([0, 8, 400], 100)
    assert windows.dtype == np.int64 and np.array_equal(windows, np.stack([ref[995 + s : 1095 + s] for s in (0, 8, 400)]))
    with pytest.raises(IndexError):
        tokens[ref.size]
    with pytest.raises(IndexError):
        view.windows([406], 100)  # would run past the view's end into tokens it does not own


@pytest.mark.parametrize("lengths", [[30_000], [9_000, 13, 4_000, 11_000]], ids=["one_bin", "four_shards"])
def test_memmap_batches_are_bit_identical_to_the_concatenated_reference(tmp_path: Path, lengths: list[int]) -> None:
    from launch.data import token_counts

    ref = write_shards(tmp_path, lengths, seed=len(lengths))
    path = tmp_path / "shard_00000.bin" if len(lengths) == 1 else tmp_path
    splits = memmap_corpus(str(path), "uint16", 0.1, vocab_size=5000)
    n_val = int(ref.size * 0.1)
    ref_train, ref_val = ref[:-n_val], ref[-n_val:]
    assert splits.train.size == ref_train.size and splits.val.size == ref_val.size
    for split_id, tokens, reference in ((0, splits.train, ref_train), (1, splits.val, ref_val)):
        sampler = BatchSampler(tokens, 32, 16, seed=7, split_id=split_id)
        for index in (0, 1, 99):
            x, y = sampler.batch(index)
            want = reference_batch(reference, 32, 16, 7, split_id, index)
            assert torch.equal(x, want[:, :-1]) and torch.equal(y, want[:, 1:])
    assert torch.equal(token_counts(splits.train, 5000, 10**9), torch.from_numpy(np.bincount(ref_train, minlength=5000)))
    starts = np.linspace(0, ref_train.size - 50, 64).astype(np.int64)
    windowed = np.bincount(np.concatenate([ref_train[s : s + 50] for s in starts]), minlength=5000)
    assert torch.equal(token_counts(splits.train, 5000, 3200), torch.from_numpy(windowed))


def test_stdlib_batches_follow_the_addressing_rule() -> None:
    splits = stdlib_corpus(0.05, 200_000)
    for split_id, tokens in ((0, splits.train), (1, splits.val)):
        x, y = BatchSampler(tokens, 64, 8, seed=2, split_id=split_id).batch(3)
        want = reference_batch(tokens, 64, 8, 2, split_id, 3)
        assert torch.equal(x, want[:, :-1]) and torch.equal(y, want[:, 1:])


def spans_read(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Record every (shard, lo, hi) of token data that ``ShardedTokens`` reads from now on."""
    from launch.data import ShardedTokens

    spans: list[tuple[int, int, int]] = []
    original = ShardedTokens._piece

    def spy(self: ShardedTokens, index: int, lo: int, hi: int) -> np.ndarray:
        spans.append((index, lo, hi))
        return original(self, index, lo, hi)

    monkeypatch.setattr(ShardedTokens, "_piece", spy)
    return spans


def test_opening_shards_reads_only_a_bounded_sample_and_batches_catch_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.data import SAMPLE_WIDTH, SAMPLE_WINDOWS

    lengths = [400_000, 400_000, 400_000]
    write_shards(tmp_path, lengths, vocab=1000)
    spans = spans_read(monkeypatch)
    memmap_corpus(str(tmp_path), "uint16", 0.05, vocab_size=1000)
    assert sum(hi - lo for _, lo, hi in spans) <= SAMPLE_WINDOWS * SAMPLE_WIDTH < sum(lengths) // 4
    # Plant an out-of-vocabulary id in shard 1 where the start-up sample did not read.
    read = sorted((lo, hi) for index, lo, hi in spans if index == 1)
    gap = next(lo_next - 1 for (_, hi), (lo_next, _) in zip(read, read[1:]) if lo_next - hi > 100)
    ids = np.fromfile(tmp_path / "shard_00001.bin", dtype=np.uint16)
    ids[gap] = 4321
    ids.tofile(tmp_path / "shard_00001.bin")
    splits = memmap_corpus(str(tmp_path), "uint16", 0.05, vocab_size=1000)  # the sample misses it
    message = rf"shard_00001.bin holds token id 4321 >= model.vocab_size \(1000\) at token {gap:,} "
    with pytest.raises(DataError, match=message):
        splits.train.windows([400_000 + gap - 10], 64)
    sampler = BatchSampler(splits.train, 64, 64, seed=0)
    with pytest.raises(DataError, match=message):
        for index in range(2000):  # deterministic: the first batch whose windows cover the planted id
            sampler.batch(index)


def test_meta_json_must_agree_with_config_and_files(tmp_path: Path) -> None:
    import json

    write_shards(tmp_path, [3000, 2000], vocab=300)
    meta = {"dtype": "uint16", "vocab_size": 300,
            "shards": [{"file": "shard_00000.bin", "tokens": 3000}, {"file": "shard_00001.bin", "tokens": 2000}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert memmap_corpus(str(tmp_path), "uint16", 0.1, vocab_size=320).train.size == 4500
    with pytest.raises(DataError, match="says the shards are uint16 but data.dtype=uint32; set data.dtype=uint16"):
        memmap_corpus(str(tmp_path), "uint32", 0.1, vocab_size=320)
    with pytest.raises(DataError, match="says the tokenizer has 300 ids but model.vocab_size=256; set model.vocab_size=300"):
        memmap_corpus(str(tmp_path), "uint16", 0.1, vocab_size=256)
    np.zeros(1999, dtype=np.uint16).tofile(tmp_path / "shard_00001.bin")
    with pytest.raises(DataError, match="shard_00001.bin has 3998 bytes but meta.json records 2000 tokens"):
        memmap_corpus(str(tmp_path), "uint16", 0.1, vocab_size=320)
    (tmp_path / "shard_00001.bin").unlink()
    with pytest.raises(DataError, match=r"missing shards \['shard_00001.bin'\], unlisted shards \[\]"):
        memmap_corpus(str(tmp_path), "uint16", 0.1, vocab_size=320)
