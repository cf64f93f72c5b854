"""Generation on torch: chunked prefill into a windowed KV cache, then one token at a time.

The same steps and samplers as the MLX backend's generate.py (settings, checks and prefill chunks from
core/generation.py; repetition penalty, then temperature, top-k, top-p, min-p, as transformers orders its
processors); greedy output equals it, sampled output uses torch's RNG.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ...core.generation import GenerationStats, Sampling, check_args, prefill_spans
from .model import make_cache


def apply_repetition_penalty(logits, history: list[int], penalty: float):
    """(B, vocab) logits with each token of `history` divided by `penalty` where positive, multiplied where
    negative."""
    if not history or penalty == 1.0:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device)  # (H,)
    seen = logits[:, ids]  # (B, H)
    logits = logits.clone()
    logits[:, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def apply_top_k(logits, k: int):
    """-inf below the k-th largest logit of each row (ties kept); k 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits, p: float):
    """-inf outside the smallest set of most likely tokens whose probability reaches `p` (the top one always)."""
    if p >= 1:
        return logits
    sorted_p, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)  # (B, vocab)
    keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def apply_min_p(logits, min_p: float):
    """-inf where a token's probability is below `min_p` times the most likely token's; 0 is off."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)  # (B, vocab)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def process_logits(logits, sampling: Sampling, history: list[int] = ()):
    """(B, vocab) fp32 logits as the draw sees them: repetition penalty, then (unless greedy) temperature,
    top-k, top-p and min-p, -inf where a token is ruled out; `history`: the tokens so far."""
    logits = apply_repetition_penalty(logits.float(), sampling.history(history), sampling.repetition_penalty)
    if sampling.temp == 0:
        return logits
    logits = logits / sampling.temp
    return apply_min_p(apply_top_p(apply_top_k(logits, sampling.top_k), sampling.top_p), sampling.min_p)


def sample(logits, sampling: Sampling, generator, history: list[int] = ()):
    """Next token ids (B,) from last-position logits (B, vocab): the argmax when greedy, else a draw."""
    logits = process_logits(logits, sampling, history)
    if sampling.temp == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def _peak_memory(device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA peak allocated"
    from .trainer import peak_memory

    return peak_memory(device), "process peak RSS"


def stream_generate(model, prompt: list[int], max_tokens: int = 100, temp: float = 0.0, top_p: float = 1.0,
                    seed: int = 0, prefill_chunk: int = 512, stop_ids: set[int] | None = None, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0, repetition_context: int = 64,
                    stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt`, stopping after a token in `stop_ids`;
    `stats` (optional) gets the speeds, the stop reason and the peak memory when the generation ends."""
    sampling = check_args(prompt, temp, top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                          repetition_context=repetition_context, seed=seed)
    stats = stats if stats is not None else GenerationStats()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats.start(len(prompt))
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = make_cache(model)
    history = list(prompt)
    tokens = torch.tensor([prompt], device=device)  # (1, P)
    with torch.inference_mode():
        for start, end in prefill_spans(len(prompt), prefill_chunk):
            model(tokens[:, start:end], cache=cache)
        y = tokens[:, -1:]
        reason = "max_tokens"
        for _ in range(max_tokens):
            logits = model(y, cache=cache)[:, -1]  # (1, vocab)
            y = sample(logits, sampling, gen, history)[:, None]  # (1, 1)
            tok = int(y.item())
            history.append(tok)
            stats.token()
            if stop_ids and tok in stop_ids:
                reason = "eos"
            stats.stop(reason, *_peak_memory(device))
            yield tok
            if reason == "eos":
                return


def generate(model, prompt: list[int], max_tokens: int = 100, **kw) -> list[int]:
    """The new token ids after `prompt` (see `stream_generate`)."""
    return list(stream_generate(model, prompt, max_tokens, **kw))
