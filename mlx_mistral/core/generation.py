"""What generation does the same on both backends: argument checks and the chunks of a prompt's prefill.

A prompt is prefilled in chunks of `prefill_chunk` tokens (all but its last token, which the first decode
step feeds), so a long prompt never materialises a full (L, L) score matrix and a sliding-window model's
cache never exceeds its window. The sampling itself is tensor code and lives in each backend.
"""

from __future__ import annotations


def check_args(prompt: list[int], temp: float, top_p: float):
    """ValueError for an empty prompt or sampling settings outside temp >= 0, 0 < top_p <= 1."""
    if not prompt:
        raise ValueError("the prompt is empty: encode at least a BOS token")
    if temp < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temp >= 0 and 0 < top_p <= 1, got temp={temp}, top_p={top_p}")


def prefill_spans(n_prompt: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of the prefill chunks of an `n_prompt`-token prompt (its last token is not prefilled)."""
    return [(s, min(s + chunk, n_prompt - 1)) for s in range(0, n_prompt - 1, chunk)]
