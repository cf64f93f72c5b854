"""Generation on MLX: chunked prefill into a KV cache (rotating for sliding-window models), then sampling.

Greedy (`temp=0`), temperature and top-p sampling, seeded; `stream_generate` yields token ids as they
come. The prompt is prefilled in chunks of `prefill_chunk` tokens (core/generation.py), so a long prompt
never materialises a full (L, L) score matrix and an SWA model's cache never exceeds its window.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from ...core.generation import check_args, prefill_spans
from .model import Model, make_cache


def sample(logits: mx.array, temp: float, top_p: float, key: mx.array) -> mx.array:
    """Next token ids (B,) from the last-position logits (B, vocab)."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temp
    if 0 < top_p < 1:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)  # (B, vocab) most likely first
        sorted_p = mx.take_along_axis(probs, order, axis=-1)
        keep_sorted = (mx.cumsum(sorted_p, axis=-1) - sorted_p) < top_p  # always keeps the top token
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, -mx.inf)
    return mx.random.categorical(logits, key=key)


def stream_generate(model: Model, prompt: list[int], max_tokens: int = 100, temp: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, prefill_chunk: int = 512,
                    stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt`, stopping after a token in `stop_ids`."""
    check_args(prompt, temp, top_p)
    cache = make_cache(model)
    key = mx.random.key(seed)
    tokens = mx.array(prompt)[None]  # (1, P)
    for start, end in prefill_spans(len(prompt), prefill_chunk):
        model(tokens[:, start:end], cache=cache)
        mx.eval([c.keys for c in cache])
    y = tokens[:, -1:]
    for _ in range(max_tokens):
        logits = model(y, cache=cache)[:, -1]  # (1, vocab)
        key, sub = mx.random.split(key)
        y = sample(logits, temp, top_p, sub)[:, None]  # (1, 1)
        tok = y.item()
        yield tok
        if stop_ids and tok in stop_ids:
            return


def generate(model: Model, prompt: list[int], max_tokens: int = 100, **kw) -> list[int]:
    """The new token ids after `prompt` (see `stream_generate`)."""
    return list(stream_generate(model, prompt, max_tokens, **kw))
