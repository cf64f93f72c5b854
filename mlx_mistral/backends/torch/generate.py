"""Generation on torch: chunked prefill into a windowed KV cache, then one token at a time.

The same steps as the MLX backend's generate.py (argument checks and prefill chunks from
core/generation.py); greedy output equals it, sampled output uses torch's RNG.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ...core.generation import check_args, prefill_spans
from .model import make_cache


def sample(logits, temp: float, top_p: float, generator):
    """Next token ids (B,) from last-position logits (B, vocab): greedy at temp 0, else temperature and top-p."""
    if temp == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temp, dim=-1)  # (B, vocab)
    if 0 < top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def stream_generate(model, prompt: list[int], max_tokens: int = 100, temp: float = 0.0, top_p: float = 1.0,
                    seed: int = 0, prefill_chunk: int = 512, stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt`, stopping after a token in `stop_ids`."""
    check_args(prompt, temp, top_p)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = make_cache(model)
    tokens = torch.tensor([prompt], device=device)  # (1, P)
    with torch.inference_mode():
        for start, end in prefill_spans(len(prompt), prefill_chunk):
            model(tokens[:, start:end], cache=cache)
        y = tokens[:, -1:]
        for _ in range(max_tokens):
            logits = model(y, cache=cache)[:, -1]  # (1, vocab)
            y = sample(logits, temp, top_p, gen)[:, None]  # (1, 1)
            tok = int(y.item())
            yield tok
            if stop_ids and tok in stop_ids:
                return


def generate(model, prompt: list[int], max_tokens: int = 100, **kw) -> list[int]:
    """The new token ids after `prompt` (see `stream_generate`)."""
    return list(stream_generate(model, prompt, max_tokens, **kw))
