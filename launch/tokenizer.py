"""Text <-> token ids for a run's data: the byte corpus, or the tokenizer ``tools.prepare_data`` recorded.

- ``data=stdlib_bytes``: a token is a byte (ids 0-255); text is UTF-8 (undecodable bytes print as U+FFFD).
- ``data=memmap``: ``meta.json`` beside the shards (written by ``tools.prepare_data``) names the
  tokenizer: ``tiktoken:<encoding>`` or the path of a Hugging Face ``tokenizer.json`` (a relative
  path is tried as written, then relative to the data folder). ``--tokenizer`` of the tools that
  use this overrides it.

tiktoken downloads an encoding's BPE files on first use (into ``$TIKTOKEN_CACHE_DIR``, else
``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``: tiktoken/load.py); without network that
fails, and ``load_tiktoken`` says so in one line with the way out.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moe.errors import DataError


class TokenizerError(DataError):
    """No usable tokenizer; the message names what is missing and what to do."""


@dataclass
class TextCodec:
    """Encode text to ids and decode ids to text."""

    name: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int | None = None


def byte_codec() -> TextCodec:
    """UTF-8 bytes as tokens (the stdlib byte corpus)."""
    return TextCodec("bytes", 256, lambda text: list(text.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace"))


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps downloaded encodings (the order of tiktoken/load.py)."""
    import os

    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "data-gym-cache")


def load_tiktoken(name: str, option: str = "--tokenizer") -> Any:
    """``tiktoken.get_encoding(name)``, with one-line errors for a missing package, unknown name or no network."""
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError(f'{option} tiktoken:{name} needs the tiktoken package: pip install -e ".[data]"') from None
    try:
        return tiktoken.get_encoding(name)
    except ValueError as err:
        raise TokenizerError(f"{option} tiktoken:{name}: {err}") from None
    except OSError as err:  # requests' ConnectionError and friends are OSErrors
        raise TokenizerError(
            f"{option} tiktoken:{name}: tiktoken downloads its encoding files on first use and could not "
            f"({type(err).__name__}: no network?); copy them from a machine with network into a folder and set "
            f"TIKTOKEN_CACHE_DIR to it (now {tiktoken_cache_dir()}), or use a tokenizer.json ({option} path/to/tokenizer.json)"
        ) from None


def load_tokenizer_json(path: Path, option: str = "--tokenizer") -> Any:
    """A Hugging Face ``tokenizers.Tokenizer`` from ``tokenizer.json``."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise TokenizerError(f'{option} {path} (a tokenizer.json) needs the tokenizers package: pip install -e ".[data]"') from None
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception for a malformed file
        raise TokenizerError(f"{option} {path} is not a readable tokenizer.json: {err}") from None


def codec_from_spec(spec: str, base: Path | None = None, option: str = "--tokenizer") -> TextCodec:
    """``tiktoken:<encoding>``, ``bytes``, or the path of a ``tokenizer.json`` (relative: as written, then under ``base``)."""
    if spec == "bytes":
        return byte_codec()
    if spec.startswith("tiktoken:"):
        enc = load_tiktoken(spec.removeprefix("tiktoken:"), option)
        eos = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
        return TextCodec(spec, enc.n_vocab, enc.encode_ordinary, enc.decode, eos)
    path = Path(spec)
    if not path.is_file() and base is not None and (base / spec).is_file():
        path = base / spec
    if not path.is_file():
        raise TokenizerError(f"{option} {spec!r} is neither bytes, tiktoken:<encoding> nor an existing tokenizer.json file")
    tok = load_tokenizer_json(path, option)
    return TextCodec(str(path), tok.get_vocab_size(with_added_tokens=True),
                     lambda text: tok.encode(text, add_special_tokens=False).ids, lambda ids: tok.decode(ids))


def codec_for_data(data: Any) -> TextCodec:
    """The codec of a run's data config (``config.data``): bytes, or what ``meta.json`` records."""
    if data.get("name") == "stdlib_bytes":
        return byte_codec()
    path = Path(str(data.get("path")))
    folder = path if path.is_dir() else path.parent
    meta = folder / "meta.json"
    if not meta.is_file():
        raise TokenizerError(f"data.path {path} has no meta.json naming its tokenizer (tools.prepare_data writes one); "
                             f"pass --tokenizer tiktoken:<encoding> or --tokenizer path/to/tokenizer.json")
    spec = json.loads(meta.read_text()).get("tokenizer")
    if not spec:
        raise TokenizerError(f"{meta} names no tokenizer; pass --tokenizer")
    return codec_from_spec(str(spec), folder, option=f"{meta}'s tokenizer")
