"""Autoregressive sampling from a moeforge model: greedy, temperature, nucleus (top-p), with a KV cache.

``generate(model, prompt_BS, max_new_tokens, temperature, top_p, generator)`` feeds the prompt once
(prefill) and then one token per step through ``MoETransformer``'s KV cache (moe/model.py), or, for
a model a cache cannot serve (routers that mix tokens, dropping capacity: ``kv_cache_refusal``),
recomputes the whole sequence each step. Both give the same logits up to float rounding (tested).

Sampling a next token from logits z over the vocabulary:

- ``temperature == 0``: greedy, argmax z;
- else the distribution p = softmax(z / temperature), restricted by ``top_p < 1`` to the nucleus
  (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1): the smallest set
  of most probable tokens whose probability sums to at least top_p, renormalised. ``nucleus_reference``
  is the one-row-at-a-time definition the batched ``nucleus_filter`` is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.model import MoETransformer


def nucleus_filter(probs_BV: Tensor, top_p: float) -> Tensor:
    """``probs_BV`` with every token outside each row's nucleus set to 0, renormalised (see the module docstring)."""
    if top_p >= 1.0:
        return probs_BV
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # probability of the more likely tokens
    keep_sorted = before_BV < top_p  # the most likely token always stays (nothing before it)
    keep_BV = torch.zeros_like(keep_sorted).scatter(-1, order_BV, keep_sorted)
    kept = probs_BV * keep_BV
    return kept / kept.sum(dim=-1, keepdim=True)


def nucleus_reference(probs_V: list[float], top_p: float) -> list[float]:
    """One row, by the definition: add tokens from most to least probable until their mass reaches top_p."""
    order = sorted(range(len(probs_V)), key=lambda i: -probs_V[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs_V[i]
    total = sum(probs_V[i] for i in kept)
    return [probs_V[i] / total if i in kept else 0.0 for i in range(len(probs_V))]


def next_tokens(logits_BV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token id per row, int64 [B] (greedy when ``temperature`` is 0)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    probs = nucleus_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MoETransformer, prompt_BS: Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True, eos_id: int | None = None,
             vocab_limit: int | None = None) -> Tensor:
    """``prompt_BS`` followed by up to ``max_new_tokens`` sampled tokens, int64 [B, S + N].

    Stops early once every row has produced ``eos_id`` (later positions of finished rows repeat it).
    ``vocab_limit``: only ids below it are sampled (a tokenizer smaller than the model's padded
    vocabulary cannot decode the rest).
    ``use_cache=False`` recomputes the full sequence every step (the reference the cache is tested
    against; also the path for models a cache cannot serve).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1] (got {temperature}, {top_p})")
    B, S = prompt_BS.shape
    if S == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if S + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len ({model.cfg.max_seq_len})")
    model.eval()
    cache = model.new_kv_cache() if use_cache and model.kv_cache_refusal() is None else None
    tokens = prompt_BS
    feed = prompt_BS
    done = torch.zeros(B, dtype=torch.bool, device=prompt_BS.device)
    for _ in range(max_new_tokens):
        logits = model(feed, cache=cache)[0] if cache is not None else model(tokens)[0]
        last = logits[:, -1]
        if vocab_limit is not None and vocab_limit < last.shape[-1]:
            last = last.clone()
            last[:, vocab_limit:] = float("-inf")
        nxt = next_tokens(last, temperature, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        feed = nxt[:, None]
        if eos_id is not None and bool(done.all()):
            break
    return tokens
