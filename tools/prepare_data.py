"""Tokenize a text corpus into the token shards that ``data=memmap`` trains on.

    python -m tools.prepare_data --input corpus/ --format text --tokenizer tiktoken:gpt2 --out data/gpt2
    python -m tools.prepare_data --input a.jsonl b.jsonl --format jsonl --tokenizer tok/tokenizer.json --out data/mine
    python -m tools.prepare_data --input saved_dataset/ --format hf_disk --split train --tokenizer tiktoken:cl100k_base --out data/hf

Inputs (a folder stands for every file under it, in sorted path order, hidden files skipped):

- ``text``: each file is one document (UTF-8).
- ``jsonl``: each non-blank line is a JSON object; its ``--text-key`` string is one document.
- ``hf_disk``: a ``datasets`` dataset saved with ``save_to_disk``; each row's ``--text-key`` column is
  one document (a ``DatasetDict`` needs ``--split``).

Documents are encoded as plain text (no special tokens added by the tokenizer) and each is followed
by the end-of-document id: the tokenizer's own (``<|endoftext|>``, ``</s>``, ...) with ``--eos auto``,
or the id given. Empty documents are skipped. Tokens go, in input order, into ``shard_00000.bin``,
``shard_00001.bin``, ... of exactly ``--shard-tokens`` ids each (the last one fewer; a document may
continue into the next shard), as little-endian uint16 when every id fits (vocabulary <= 65536)
or uint32. ``meta.json`` (tokenizer, vocabulary size, dtype, eos id, and per shard the token and
document counts and a sha256) is written last, so a folder without it is an unfinished run. Every
file is written to a ``.tmp`` name and renamed when complete: an interrupted run never leaves a
truncated shard under a final name. Training reads the folder lazily (``launch.data.ShardedTokens``)
and holds out the last ``data.val_fraction`` of the tokens for validation.

Tokenizers: ``tiktoken:<encoding>`` (needs ``tiktoken``, which downloads the encoding's BPE file on
first use) or the path of a Hugging Face ``tokenizer.json`` (needs ``tokenizers``); ``hf_disk``
needs ``datasets``. ``pip install -e ".[data]"`` installs all three.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from launch.data import META_FILE
from launch.tokenizer import load_tiktoken, load_tokenizer_json
from moe.errors import DataError

FORMATS = ("text", "jsonl", "hf_disk")
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")
"""End-of-document tokens looked for, in this order, by ``--eos auto`` in a ``tokenizer.json``."""
ENCODE_BATCH_CHARS = 1 << 20
"""Documents are encoded in batches of about this many characters (both libraries encode a batch in parallel)."""


@dataclass
class Tokenizer:
    """What preparing needs from a tokenizer, whichever library provides it."""

    name: str
    vocab_size: int
    eos_id: int | None
    encode_batch: Callable[[list[str]], list[list[int]]]
    extra: dict[str, Any]
    """Recorded in meta.json (e.g. the sha256 of a tokenizer.json)."""


def load_tokenizer(spec: str) -> Tokenizer:
    """``tiktoken:<encoding>`` or the path of a Hugging Face ``tokenizer.json``."""
    if spec.startswith("tiktoken:"):
        return _tiktoken(spec.removeprefix("tiktoken:"))
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--tokenizer {spec!r} is neither tiktoken:<encoding> nor an existing tokenizer.json file")
    return _hf_tokenizer(path)


def _tiktoken(name: str) -> Tokenizer:
    enc = load_tiktoken(name)  # one line when offline: tiktoken downloads its encodings (launch/tokenizer.py)
    eos = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    return Tokenizer(f"tiktoken:{name}", enc.n_vocab, eos, lambda texts: enc.encode_ordinary_batch(texts), {})


def _hf_tokenizer(path: Path) -> Tokenizer:
    tok = load_tokenizer_json(path)
    eos = next((tok.token_to_id(t) for t in EOS_NAMES if tok.token_to_id(t) is not None), None)
    tok.encode_special_tokens = True  # a literal "</s>" in the text is text, not a document end

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Tokenizer(str(path), tok.get_vocab_size(with_added_tokens=True), eos, encode_batch, {"tokenizer_sha256": sha})


@dataclass
class Document:
    text: str | None
    """None for input that holds no document (a blank JSONL line); "" for an empty document (skipped, counted)."""
    where: str
    """Where it came from, for error messages: ``file``, ``file:line`` or ``dataset row i``."""
    advance: int
    """Progress units (bytes of input, or rows) consumed up to and including this document."""


def input_files(paths: list[str]) -> list[Path]:
    """Files named, with each folder replaced by its files in sorted path order (hidden ones skipped)."""
    files = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"--input {name} does not exist")
    if not files:
        raise DataError(f"--input {' '.join(paths)} holds no files")
    return files


def text_documents(files: list[Path]) -> Iterator[Document]:
    for path in files:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
        yield Document(text, str(path), len(data))


def jsonl_documents(files: list[Path], key: str) -> Iterator[Document]:
    for path in files:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{path}:{number}"
                if not raw.strip():
                    yield Document(None, where, len(raw))
                    continue
                try:
                    row = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise DataError(f"{where}: not a JSON line ({err})") from err
                if not isinstance(row, dict) or key not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{where}: no {key!r} key (found {keys}); set --text-key")
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: {key!r} is a {type(row[key]).__name__}, not a string")
                yield Document(row[key], where, len(raw))


def hf_documents(paths: list[str], key: str, split: str | None) -> tuple[Iterator[Document], int]:
    """(documents, row count) of each saved dataset in turn."""
    try:
        import datasets
    except ImportError as err:
        raise DataError('--format hf_disk needs the datasets package: pip install -e ".[data]"') from err
    loaded = []
    for name in paths:
        try:
            ds = datasets.load_from_disk(name)
        except FileNotFoundError as err:
            raise DataError(f"--input {name} is not a dataset saved with save_to_disk ({err})") from err
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"--input {name} is a DatasetDict with splits {sorted(ds)}; choose one with --split")
            ds = ds[split]
        if key not in ds.column_names:
            raise DataError(f"--input {name} has no column {key!r} (columns {ds.column_names}); set --text-key")
        loaded.append((name, ds))

    def rows() -> Iterator[Document]:
        for name, ds in loaded:
            i = 0
            for block in ds.select_columns([key]).iter(batch_size=1000):
                for text in block[key]:
                    if not isinstance(text, str):
                        raise DataError(f"{name} row {i}: {key!r} is a {type(text).__name__}, not a string")
                    yield Document(text, f"{name} row {i}", 1)
                    i += 1

    return rows(), sum(len(ds) for _, ds in loaded)


class ShardWriter:
    """Writes ids into ``shard_NNNNN.bin`` files of ``shard_tokens`` ids, each via a ``.tmp`` name and a rename."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int) -> None:
        self.out, self.dtype, self.shard_tokens = out, np.dtype(dtype).newbyteorder("<"), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None

    def add(self, ids: np.ndarray, ends: np.ndarray) -> None:
        """Append ``ids``, splitting at shard ends; ``ends`` (ascending) are the positions just past each document's last id."""
        data = ids.astype(self.dtype)
        pos = 0
        while pos < data.size:
            if self._file is None:
                self._open()
            take = min(data.size - pos, self.shard_tokens - self._tokens)
            chunk = data[pos : pos + take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._documents += int(np.searchsorted(ends, pos + take, side="right") - np.searchsorted(ends, pos, side="right"))
            self._tokens += take
            pos += take
            if self._tokens == self.shard_tokens:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards

    def _open(self) -> None:
        self._name = f"shard_{len(self.shards):05d}.bin"
        self._file = (self.out / (self._name + ".tmp")).open("wb")
        self._hash, self._tokens, self._documents = hashlib.sha256(), 0, 0

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.out / (self._name + ".tmp"), self.out / self._name)
        self.shards.append({"file": self._name, "tokens": self._tokens, "documents": self._documents, "sha256": self._hash.hexdigest()})


class Progress:
    """A one-line progress report on ``stream``: redrawn in place on a terminal, a line every 30 s otherwise."""

    def __init__(self, total: int, unit: str, stream: TextIO = sys.stderr) -> None:
        self.total, self.unit, self.stream = total, unit, stream
        self.done = self.documents = self.tokens = 0
        self.tty = stream.isatty()
        self.began = self.shown = time.monotonic()

    def update(self, advance: int, documents: int, tokens: int) -> None:
        self.done += advance
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        if now - self.shown >= (0.2 if self.tty else 30.0):
            self.shown = now
            self._show(end="\r" if self.tty else "\n")

    def close(self) -> None:
        self._show(end="\n")

    def _show(self, end: str) -> None:
        share = self.done / self.total if self.total else 1.0
        rate = self.tokens / max(time.monotonic() - self.began, 1e-9)
        width = 30
        bar = "#" * int(share * width) + "-" * (width - int(share * width))
        self.stream.write(f"prepare_data [{bar}] {share:6.1%} of {self.total:,} {self.unit}: {self.documents:,} documents, "
                          f"{self.tokens:,} tokens ({rate:,.0f} tokens/s){end}")
        self.stream.flush()


def choose_dtype(requested: str, vocab_size: int) -> str:
    """``uint16`` when every id fits (vocabulary <= 65536), else ``uint32``; an explicit choice is checked."""
    fits16 = vocab_size <= 1 << 16
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested == "uint16" and not fits16:
        raise DataError(f"--dtype uint16 cannot hold the ids of a {vocab_size:,}-id vocabulary; use --dtype uint32 or auto")
    return requested


def choose_eos(requested: str, tok: Tokenizer) -> int:
    if requested == "auto":
        if tok.eos_id is None:
            raise DataError(f"--tokenizer {tok.name} has no end-of-document token (looked for {', '.join(EOS_NAMES)}); pass --eos ID")
        return tok.eos_id
    try:
        eos = int(requested)
    except ValueError as err:
        raise DataError(f"--eos {requested!r} must be an integer id or auto") from err
    if not 0 <= eos < tok.vocab_size:
        raise DataError(f"--eos {eos} is outside the tokenizer's ids [0, {tok.vocab_size})")
    return eos


def prepare(inputs: list[str], fmt: str, tokenizer: str, out: str, *, text_key: str = "text", split: str | None = None,
            shard_tokens: int = 100_000_000, dtype: str = "auto", eos: str = "auto", progress: TextIO = sys.stderr) -> dict[str, Any]:
    """Tokenize ``inputs`` into shards and ``meta.json`` under ``out``; returns the meta.json contents."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} must be one of {list(FORMATS)}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens ({shard_tokens}) must be >= 1")
    tok = load_tokenizer(tokenizer)
    dtype = choose_dtype(dtype, tok.vocab_size)
    eos_id = choose_eos(eos, tok)
    if fmt == "hf_disk":
        docs, total = hf_documents(inputs, text_key, split)
        unit = "rows"
    else:
        files = input_files(inputs)
        docs = text_documents(files) if fmt == "text" else jsonl_documents(files, text_key)
        total, unit = sum(f.stat().st_size for f in files), "bytes"
    out_dir = _fresh_out_dir(Path(out))

    writer = ShardWriter(out_dir, dtype, shard_tokens)
    bar = Progress(total, unit, progress)
    skipped = 0
    eos_1 = np.array([eos_id], dtype=np.int64)
    for batch in _batches(docs):
        texts = [d.text for d in batch if d.text]
        skipped += sum(1 for d in batch if d.text == "")
        if texts:
            encoded = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]
            flat = np.concatenate([part for ids in encoded for part in (ids, eos_1)])
            writer.add(flat, np.cumsum([ids.size + 1 for ids in encoded]))
            bar.update(sum(d.advance for d in batch), len(texts), flat.size)
        else:
            bar.update(sum(d.advance for d in batch), 0, 0)
    bar.close()
    shards = writer.finish()
    if not shards:
        raise DataError(f"--input {' '.join(inputs)} holds no non-empty documents")
    meta = {"tokenizer": tok.name, **tok.extra, "vocab_size": tok.vocab_size, "dtype": dtype, "byte_order": "little",
            "eos_id": eos_id, "format": fmt, "inputs": [str(i) for i in inputs],
            "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
            "empty_documents_skipped": skipped, "shards": shards}
    tmp = out_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out_dir / META_FILE)
    return meta


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    """Documents grouped into lists of about ``ENCODE_BATCH_CHARS`` characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text or "")
        if chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _fresh_out_dir(out: Path) -> Path:
    """Create ``out``; refuse one that already holds shards or a meta.json, and drop stale ``.tmp`` files."""
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p.name for p in out.iterdir() if p.suffix == ".bin" or p.name == META_FILE)
    if old:
        raise DataError(f"--out {out} already holds {', '.join(old[:3])}{' ...' if len(old) > 3 else ''}; "
                        f"choose another --out or delete them")
    for stale in out.glob("*.tmp"):
        stale.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.prepare_data", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="files or folders (text, jsonl), or saved datasets (hf_disk)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--text-key", default="text", help="jsonl key / dataset column holding the text (default: text)")
    ap.add_argument("--split", default=None, help="hf_disk: the split of a saved DatasetDict")
    ap.add_argument("--tokenizer", required=True, help="tiktoken:<encoding> (e.g. tiktoken:gpt2) or path/to/tokenizer.json")
    ap.add_argument("--out", required=True, help="folder for shard_*.bin and meta.json")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 100,000,000)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"))
    ap.add_argument("--eos", default="auto", help="end-of-document id, or auto: the tokenizer's own (default: auto)")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.input, args.format, args.tokenizer, args.out, text_key=args.text_key, split=args.split,
                       shard_tokens=args.shard_tokens, dtype=args.dtype, eos=args.eos)
    except DataError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(f"prepare_data: {meta['documents']:,} documents, {meta['tokens']:,} tokens in {len(meta['shards'])} shard(s) of "
          f"{meta['dtype']} under {args.out}\ntrain on them with: .venv/bin/python -m launch.train data=memmap data.path={args.out} "
          f"data.dtype={meta['dtype']} data.doc_separator={meta['eos_id']} model.vocab_size={meta['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
