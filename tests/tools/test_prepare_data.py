"""tools.prepare_data: documents to token shards and back, on a corpus and a tokenizer the tests make."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch.data import memmap_corpus
from moe.errors import DataError
from tests.launch.test_train import REPO, SMALL, launch, read_metrics
from tools import prepare_data
from tools.prepare_data import prepare

tokenizers = pytest.importorskip("tokenizers")  # in the dev extra; the skip only spares a bare checkout

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nA second line, with digits 0123456789.",
    "Ünïcödé text: naïve café, 東京, emoji \u2603 and tabs\tinside.",
    "A literal <|endoftext|> and </s> in the text are text, not document ends.",
    "short",
    "def f(x):\n    return x * 2  # code is text too\n\n\nwith blank lines inside",
] + [f"Document number {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(i % 40 + 5)) for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with <|endoftext|> trained on DOCS (lossless: decode(encode(text)) == text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def hf(path: Path) -> "tokenizers.Tokenizer":
    return tokenizers.Tokenizer.from_file(str(path))


def read_shards(out: Path, dtype: str) -> list[np.ndarray]:
    return [np.fromfile(p, dtype=np.dtype(dtype).newbyteorder("<")) for p in sorted(out.glob("shard_*.bin"))]


def decoded_documents(out: Path, tokenizer_json: Path) -> list[str]:
    meta = json.loads((out / "meta.json").read_text())
    ids = np.concatenate(read_shards(out, meta["dtype"]))
    ends = np.flatnonzero(ids == meta["eos_id"])
    assert ends.size and ends[-1] == ids.size - 1  # every document, the last included, ends with eos
    starts = np.r_[0, ends[:-1] + 1]
    tok = hf(tokenizer_json)
    return [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends)]


def test_jsonl_round_trip_shards_and_meta(tmp_path: Path, tokenizer_json: Path) -> None:
    src = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)]
    lines.insert(3, "")  # blank lines are not documents
    src.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    meta = prepare([str(src)], "jsonl", str(tokenizer_json), str(out), shard_tokens=500, progress=io.StringIO())

    assert decoded_documents(out, tokenizer_json) == DOCS
    tok = hf(tokenizer_json)
    eos = tok.token_to_id("<|endoftext|>")
    tok.encode_special_tokens = True  # as prepare encodes: a literal <|endoftext|> in a document is text
    expected_tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) for d in DOCS) + len(DOCS)
    shards = read_shards(out, "uint16")
    assert [s.size for s in shards[:-1]] == [500] * (len(shards) - 1) and 0 < shards[-1].size <= 500
    assert sum(s.size for s in shards) == expected_tokens == meta["tokens"] and len(shards) > 3
    assert meta["dtype"] == "uint16" and meta["eos_id"] == eos and meta["vocab_size"] == tok.get_vocab_size()
    assert meta["documents"] == len(DOCS) and meta["empty_documents_skipped"] == 0
    for entry, ids, path in zip(meta["shards"], shards, sorted(out.glob("shard_*.bin"))):
        assert entry["file"] == path.name and entry["tokens"] == ids.size
        assert entry["documents"] == int((ids == eos).sum())
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + [f"shard_{i:05d}.bin" for i in range(len(shards))]


def test_reader_on_prepared_shards_equals_their_concatenation(tmp_path: Path, tokenizer_json: Path) -> None:
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    out = tmp_path / "out"
    meta = prepare([str(src)], "jsonl", str(tokenizer_json), str(out), shard_tokens=700, progress=io.StringIO())
    ref = np.concatenate(read_shards(out, "uint16"))
    splits = memmap_corpus(str(out), "uint16", 0.1, vocab_size=meta["vocab_size"])
    assert splits.train.size + splits.val.size == ref.size == meta["tokens"]
    rng = np.random.default_rng(0)
    starts = [699 - 5, 1399 - 63] + rng.integers(0, splits.train.size - 64, 50).tolist()  # two straddle a shard end
    assert np.array_equal(splits.train.windows(starts, 64), np.stack([ref[s : s + 64] for s in starts]))


def test_text_files_one_document_each_in_sorted_order(tmp_path: Path, tokenizer_json: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:5]):
        (folder / ("sub" if i % 2 else ".") / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (folder / "empty.txt").write_text("")
    (folder / ".hidden").write_text("never read")
    out = tmp_path / "out"
    meta = prepare([str(folder)], "text", str(tokenizer_json), str(out), progress=io.StringIO())
    in_path_order = [DOCS[0], DOCS[2], DOCS[4], DOCS[1], DOCS[3]]  # doc00, doc02, doc04, (empty), sub/doc01, sub/doc03
    assert decoded_documents(out, tokenizer_json) == in_path_order
    assert meta["documents"] == 5 and meta["empty_documents_skipped"] == 1 and len(meta["shards"]) == 1


def test_hf_disk_dataset_and_dataset_dict(tmp_path: Path, tokenizer_json: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    meta = prepare([str(tmp_path / "ds")], "hf_disk", str(tokenizer_json), str(tmp_path / "out"), text_key="body",
                   shard_tokens=1000, progress=io.StringIO())
    assert decoded_documents(tmp_path / "out", tokenizer_json) == DOCS and meta["documents"] == len(DOCS)

    datasets.DatasetDict({"train": ds.select(range(10)), "test": ds.select(range(10, 12))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['test', 'train'\]; choose one with --split"):
        prepare([str(tmp_path / "dd")], "hf_disk", str(tokenizer_json), str(tmp_path / "o2"), text_key="body")
    prepare([str(tmp_path / "dd")], "hf_disk", str(tokenizer_json), str(tmp_path / "o2"), text_key="body", split="test",
            progress=io.StringIO())
    assert decoded_documents(tmp_path / "o2", tokenizer_json) == DOCS[10:12]
    with pytest.raises(DataError, match=r"has no column 'text' \(columns \['body', 'n'\]\); set --text-key"):
        prepare([str(tmp_path / "ds")], "hf_disk", str(tokenizer_json), str(tmp_path / "o3"))


def word_level(tmp_path: Path, size: int) -> Path:
    """A whitespace word-level tokenizer.json of ``size`` ids: w0 .. w{size-2} and </s> last."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / f"wl{size}.json"
    tok.save(str(path))
    return path


def test_dtype_follows_the_vocabulary(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "w1 w65535 w70000 w2"}) + "\n" + json.dumps({"text": "w69999"}) + "\n")
    big = word_level(tmp_path, 70_002)
    meta = prepare([str(src)], "jsonl", str(big), str(tmp_path / "big"), progress=io.StringIO())
    assert meta["dtype"] == "uint32" and meta["eos_id"] == 70_001
    assert read_shards(tmp_path / "big", "uint32")[0].tolist() == [1, 65535, 70000, 2, 70_001, 69999, 70_001]
    with pytest.raises(DataError, match="--dtype uint16 cannot hold the ids of a 70,002-id vocabulary"):
        prepare([str(src)], "jsonl", str(big), str(tmp_path / "x"), dtype="uint16")

    small_src = tmp_path / "s.jsonl"
    small_src.write_text(json.dumps({"text": "w1 w65534 w3"}) + "\n")
    edge = word_level(tmp_path, 65_536)  # ids 0..65535 all fit in uint16
    meta = prepare([str(small_src)], "jsonl", str(edge), str(tmp_path / "edge"), progress=io.StringIO())
    assert meta["dtype"] == "uint16" and read_shards(tmp_path / "edge", "uint16")[0].tolist() == [1, 65534, 3, 65535]
    meta = prepare([str(small_src)], "jsonl", str(edge), str(tmp_path / "wide"), dtype="uint32", eos="7", progress=io.StringIO())
    assert meta["dtype"] == "uint32" and read_shards(tmp_path / "wide", "uint32")[0].tolist() == [1, 65534, 3, 7]
    assert (tmp_path / "wide" / "shard_00000.bin").stat().st_size == 16


def test_tiktoken_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiktoken adapter, on an encoding built here (get_encoding would download its BPE file)."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256, b"the": 257, b" the": 258}
    enc = tiktoken.Encoding("toy", pat_str=r"""\s?\w+|\s?[^\w\s]+|\s+""", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 259})

    def get_encoding(name: str) -> tiktoken.Encoding:
        if name != "toy":
            raise ValueError(f"Unknown encoding {name}")  # what tiktoken raises for a name it does not know
        return enc

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    src = tmp_path / "c.jsonl"
    docs = ["the cat saw the other <|endoftext|> thing", "Ünïcödé the end"]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare([str(src)], "jsonl", "tiktoken:toy", str(tmp_path / "out"), progress=io.StringIO())
    assert meta["tokenizer"] == "tiktoken:toy" and meta["vocab_size"] == 260 and meta["eos_id"] == 259
    ids = read_shards(tmp_path / "out", "uint16")[0]
    ends = np.flatnonzero(ids == 259).tolist()
    assert ends[-1] == ids.size - 1 and len(ends) == 2  # the literal <|endoftext|> in the text is not an end
    assert [enc.decode(part) for part in (ids[: ends[0]].tolist(), ids[ends[0] + 1 : ends[1]].tolist())] == docs
    assert 257 in ids.tolist() and 258 in ids.tolist()  # the merges were used
    with pytest.raises(DataError, match="--tokenizer tiktoken:nope: Unknown encoding nope"):
        prepare([str(src)], "jsonl", "tiktoken:nope", str(tmp_path / "o2"))


BAD_JSONL = [
    ('{"text": "ok"}\n{"text": "ok"\n', r"c.jsonl:2: not a JSON line"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"c.jsonl:3: no 'text' key \(found \['body'\]\); set --text-key"),
    ('{"text": 5}\n', r"c.jsonl:1: 'text' is a int, not a string"),
    ('["text"]\n', r"c.jsonl:1: no 'text' key \(found list\)"),
]


@pytest.mark.parametrize("content,message", BAD_JSONL, ids=["json", "key", "type", "list"])
def test_bad_jsonl_names_the_file_and_line(tmp_path: Path, tokenizer_json: Path, content: str, message: str) -> None:
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        prepare([str(tmp_path / "c.jsonl")], "jsonl", str(tokenizer_json), str(tmp_path / "out"), progress=io.StringIO())
    assert not (tmp_path / "out" / "meta.json").exists()


def test_other_bad_inputs_are_refused_clearly(tmp_path: Path, tokenizer_json: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 3"):
        prepare([str(tmp_path / "latin1.txt")], "text", str(tokenizer_json), str(tmp_path / "o1"))
    with pytest.raises(DataError, match="--input .*missing.txt does not exist"):
        prepare([str(tmp_path / "missing.txt")], "text", str(tokenizer_json), str(tmp_path / "o2"))
    with pytest.raises(DataError, match="neither tiktoken:<encoding> nor an existing tokenizer.json"):
        prepare([str(tmp_path / "latin1.txt")], "text", str(tmp_path / "nope.json"), str(tmp_path / "o3"))
    no_eos = word_level(tmp_path, 100)
    (tmp_path / "w.txt").write_text("w1 w2")
    (tmp_path / "no_eos.json").write_text(no_eos.read_text().replace('"</s>"', '"w99"'))
    with pytest.raises(DataError, match="has no end-of-document token .*; pass --eos ID"):
        prepare([str(tmp_path / "w.txt")], "text", str(tmp_path / "no_eos.json"), str(tmp_path / "o4"))
    with pytest.raises(DataError, match=r"--eos 100 is outside the tokenizer's ids \[0, 100\)"):
        prepare([str(tmp_path / "w.txt")], "text", str(tmp_path / "no_eos.json"), str(tmp_path / "o4"), eos="100")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="holds no non-empty documents"):
        prepare([str(tmp_path / "blank.txt")], "text", str(tokenizer_json), str(tmp_path / "o5"), progress=io.StringIO())


def test_interrupted_run_leaves_only_whole_shards_and_a_rerun_is_refused(tmp_path: Path, tokenizer_json: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 4))
    monkeypatch.setattr(prepare_data, "ENCODE_BATCH_CHARS", 500)  # many small batches
    real = prepare_data._hf_tokenizer
    calls = {"n": 0}

    def dying(path: Path) -> prepare_data.Tokenizer:
        tok = real(path)
        encode = tok.encode_batch

        def encode_batch(texts: list[str]) -> list[list[int]]:
            calls["n"] += 1
            if calls["n"] == 12:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of a shard
            return encode(texts)

        tok.encode_batch = encode_batch
        return tok

    monkeypatch.setattr(prepare_data, "_hf_tokenizer", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], "jsonl", str(tokenizer_json), str(out), shard_tokens=300, progress=io.StringIO())
    finished = sorted(out.glob("*.bin"))
    assert finished and all(p.stat().st_size == 600 for p in finished)  # every shard under its final name is whole
    assert [p.name for p in out.glob("*.tmp")] == [f"shard_{len(finished):05d}.bin.tmp"] and not (out / "meta.json").exists()
    with pytest.raises(DataError, match=r"--out .*out already holds shard_00000.bin"):
        prepare([str(src)], "jsonl", str(tokenizer_json), str(out), shard_tokens=300)


def test_cli_progress_summary_and_errors(tmp_path: Path, tokenizer_json: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cmd = [sys.executable, "-m", "tools.prepare_data", "--input", str(src), "--format", "jsonl", "--tokenizer", str(tokenizer_json)]
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert f"100.0% of {src.stat().st_size:,} bytes: {len(DOCS)} documents, {meta['tokens']:,} tokens" in ok.stderr
    assert (f"data=memmap data.path={tmp_path / 'out'} data.dtype=uint16 data.doc_separator={meta['eos_id']} "
            f"model.vocab_size={meta['vocab_size']}") in ok.stdout
    again = subprocess.run([*cmd, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "prepare_data: error: --out" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_training_runs_on_prepared_shards(tmp_path: Path, tokenizer_json: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 6))
    data = tmp_path / "data"
    meta = prepare([str(src)], "jsonl", str(tokenizer_json), str(data), shard_tokens=2000, progress=io.StringIO())
    assert len(meta["shards"]) >= 3
    run = tmp_path / "run"
    out = launch(run, *SMALL, "data=memmap", f"data.path={data}", f"model.vocab_size={meta['vocab_size']}",
                 f"data.doc_separator={meta['eos_id']}", "train.steps=3", "train.eval_every=3", "train.log_every=1")
    assert out.returncode == 0, out.stderr
    assert f"memmap {len(meta['shards'])} shard(s) at {data}" in out.stderr
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert 0 < metrics[-1]["val_loss"] < 2 * np.log(meta["vocab_size"])
    small = launch(tmp_path / "run2", *SMALL, "data=memmap", f"data.path={data}", "model.vocab_size=256", "train.steps=1")
    assert small.returncode == 2 and f"set model.vocab_size={meta['vocab_size']}" in small.stderr


def test_offline_tiktoken_is_one_line_naming_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Without network tiktoken's first use raises requests' ConnectionError (seen on this machine); the
    tool says what happened and names TIKTOKEN_CACHE_DIR and tokenizer.json instead of a traceback."""
    tiktoken = pytest.importorskip("tiktoken")
    requests = pytest.importorskip("requests")

    def offline(name: str) -> None:
        raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): "
                                                  "Max retries exceeded")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello"}\n')
    assert prepare_data.main(["--input", str(src), "--format", "jsonl", "--tokenizer", "tiktoken:gpt2", "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "tiktoken downloads its encoding files on first use" in lines[0] and "ConnectionError" in lines[0]
    assert f"TIKTOKEN_CACHE_DIR to it (now {tmp_path / 'cache'})" in lines[0] and "tokenizer.json" in lines[0]
    assert not (tmp_path / "o").exists()
