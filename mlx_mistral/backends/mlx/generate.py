"""Generation on MLX: chunked prefill into a KV cache (rotating for sliding-window models), then sampling.

Samplers (core/generation.py's `Sampling`, in transformers' order): repetition penalty, then greedy
(`temp=0`) or temperature, top-k, top-p, min-p and a seeded draw; each filter is checked against
transformers' own logits processors on the same logits. `stream_generate` yields token ids as they come and
fills a `GenerationStats`. The prompt is prefilled in chunks of `prefill_chunk` tokens (core/generation.py),
so a long prompt never materialises a full (L, L) score matrix and an SWA model's cache never exceeds its
window.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from ...core.generation import GenerationStats, Sampling, check_args, prefill_spans
from .model import Model, make_cache


def apply_repetition_penalty(logits: mx.array, history: list[int], penalty: float) -> mx.array:
    """(B, vocab) logits with each token of `history` made less likely: divided by `penalty` where positive,
    multiplied where negative (the CTRL paper's rule, as transformers applies it)."""
    if not history or penalty == 1.0:
        return logits
    ids = mx.array(sorted(set(history)))  # (H,)
    seen = logits[:, ids]  # (B, H)
    logits = mx.array(logits)
    logits[:, ids] = mx.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """-inf below the k-th largest logit of each row (ties with it kept); k 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[:, -k][:, None]  # (B, 1)
    return mx.where(logits < kth, -mx.inf, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """-inf outside the smallest set of most likely tokens whose probability reaches `p` (the top one always)."""
    if p >= 1:
        return logits
    probs = mx.softmax(logits, axis=-1)  # (B, vocab)
    order = mx.argsort(-probs, axis=-1)  # (B, vocab) most likely first
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    keep_sorted = (mx.cumsum(sorted_p, axis=-1) - sorted_p) < p  # (B, vocab)
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """-inf where a token's probability is below `min_p` times the most likely token's; 0 is off."""
    if min_p <= 0:
        return logits
    probs = mx.softmax(logits, axis=-1)  # (B, vocab)
    return mx.where(probs < min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)


def process_logits(logits: mx.array, sampling: Sampling, history: list[int] = ()) -> mx.array:
    """(B, vocab) fp32 logits as the draw sees them: repetition penalty, then (unless greedy) temperature,
    top-k, top-p and min-p, -inf where a token is ruled out; `history`: the tokens so far."""
    logits = apply_repetition_penalty(logits.astype(mx.float32), sampling.history(history),
                                      sampling.repetition_penalty)
    if sampling.temp == 0:
        return logits
    logits = logits / sampling.temp
    return apply_min_p(apply_top_p(apply_top_k(logits, sampling.top_k), sampling.top_p), sampling.min_p)


def sample(logits: mx.array, sampling: Sampling, key: mx.array, history: list[int] = ()) -> mx.array:
    """Next token ids (B,) from the last-position logits (B, vocab): the argmax when greedy, else a draw."""
    logits = process_logits(logits, sampling, history)
    if sampling.temp == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(logits, key=key)


def stream_generate(model: Model, prompt: list[int], max_tokens: int = 100, temp: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, prefill_chunk: int = 512,
                    stop_ids: set[int] | None = None, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, repetition_context: int = 64,
                    stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt`, stopping after a token in `stop_ids`;
    `stats` (optional) gets the speeds, the stop reason and the peak memory when the generation ends."""
    sampling = check_args(prompt, temp, top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                          repetition_context=repetition_context, seed=seed)
    stats = stats if stats is not None else GenerationStats()
    mx.reset_peak_memory()
    stats.start(len(prompt))
    cache = make_cache(model)
    key = mx.random.key(seed)
    history = list(prompt)
    tokens = mx.array(prompt)[None]  # (1, P)
    for start, end in prefill_spans(len(prompt), prefill_chunk):
        model(tokens[:, start:end], cache=cache)
        mx.eval([c.keys for c in cache])
    y = tokens[:, -1:]
    reason = "max_tokens"
    for _ in range(max_tokens):
        logits = model(y, cache=cache)[:, -1]  # (1, vocab)
        key, sub = mx.random.split(key)
        y = sample(logits, sampling, sub, history)[:, None]  # (1, 1)
        tok = y.item()
        history.append(tok)
        stats.token()
        if stop_ids and tok in stop_ids:
            reason = "eos"
        stats.stop(reason, mx.get_peak_memory(), "MLX peak")
        yield tok
        if reason == "eos":
            return


def generate(model: Model, prompt: list[int], max_tokens: int = 100, **kw) -> list[int]:
    """The new token ids after `prompt` (see `stream_generate`)."""
    return list(stream_generate(model, prompt, max_tokens, **kw))
