"""Sample text from a moeforge checkpoint: prompt in, text out.

    .venv/bin/python -m tools.generate runs/local --prompt "def main(" --max-new-tokens 200
    .venv/bin/python -m tools.generate runs/local/checkpoints/step_00000300 --prompt "import " --temperature 0.8 --top-p 0.95 --seed 1
    .venv/bin/python -m tools.generate runs/mixtral_cpt --prompt "Once upon a time" --tokenizer path/to/tokenizer.json

The first argument is anything ``launch.pretrained.load_pretrained`` reads (a checkpoint, a run
directory, an import folder). Greedy by default (``--temperature 0``); ``--temperature T`` samples
from softmax(logits / T), ``--top-p p`` from its nucleus (launch/generation.py), with a KV cache
(``--no-cache`` recomputes the whole sequence each step); only ids the tokenizer has are sampled
(a model's vocabulary may be padded beyond it). The tokenizer is the run's: bytes for the
stdlib corpus, or the one ``meta.json`` beside ``data.path`` names (launch/tokenizer.py);
``--tokenizer`` (``bytes``, ``tiktoken:<encoding>``, a tokenizer.json) or ``data.*`` overrides
(anywhere on the line) choose another. Prints the prompt and its continuation on stdout; exit status
0, or 2 with one ``moeforge: error:`` line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from launch.generation import generate
from launch.pretrained import load_pretrained
from launch.tokenizer import TextCodec, codec_for_data, codec_from_spec
from moe.errors import ConfigError
from tools.cli import DTYPES, cli_status, parse_with_overrides


def data_config(config: object, overrides: list[str]) -> object:
    """The run's ``data`` group with ``data.*`` overrides applied (other keys are refused, naming them)."""
    other = [o for o in overrides if not o.lstrip("+~").startswith("data.")]
    if other:
        raise ConfigError(f"only data.* overrides apply here (to find the tokenizer); got {' '.join(other)}")
    data = OmegaConf.create(OmegaConf.to_container(config.data))  # type: ignore[attr-defined]
    return OmegaConf.merge(data, OmegaConf.from_dotlist([o.lstrip("+").removeprefix("data.") for o in overrides]))


def run(path: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int, tokenizer: str | None,
        device: str, dtype: str, use_cache: bool, overrides: list[str]) -> str:
    """Load, encode, sample, decode; returns the text (prompt + continuation)."""
    pre = load_pretrained(path, device, DTYPES[dtype])
    codec: TextCodec = codec_from_spec(tokenizer) if tokenizer else codec_for_data(data_config(pre.config, overrides))
    if codec.vocab_size > pre.model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer {codec.name} has {codec.vocab_size} ids but the model only {pre.model.cfg.vocab_size}")
    ids = codec.encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty: give at least one character")
    x = torch.tensor([ids], dtype=torch.long, device=pre.model.embed.weight.device)
    t0 = time.perf_counter()
    out = generate(pre.model, x, max_new_tokens, temperature, top_p, torch.Generator(device=x.device).manual_seed(seed), use_cache,
                   vocab_limit=codec.vocab_size)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - x.shape[1]
    cached = "KV cache" if use_cache and pre.model.kv_cache_refusal() is None else "no cache"
    print(f"moeforge: {pre.checkpoint} (step {pre.step}), tokenizer {codec.name}: {new} tokens in {seconds:.2f}s ({cached})",
          file=sys.stderr)
    return codec.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="a checkpoint, run directory or import folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="bytes | tiktoken:<encoding> | path/to/tokenizer.json (default: the run's data)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    a, overrides = parse_with_overrides(p, argv)

    def act() -> None:
        try:
            text = run(a.path, a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.tokenizer, a.device, a.dtype,
                       not a.no_cache, overrides)
        except ValueError as err:  # the sampler's own checks (temperature, top-p, lengths)
            raise ConfigError(str(err)) from None
        print(text)

    return cli_status(act)


if __name__ == "__main__":
    sys.exit(main())
