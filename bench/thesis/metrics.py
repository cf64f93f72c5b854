"""What the thesis experiment measures, as functions: per-token losses of a document run alone, loss by
position bucket, perplexity, decoding latency, and mean/spread over seeds.

Position convention: the loss at position t is the loss of predicting token t+1 from tokens 0..t, so a
position t < W is a query that still sees the document's first token; buckets are [0, W), [W, 2W),
[2W, 4W), [4W, 8W), ... (doubling), the last one ending at the longest document.
"""

from __future__ import annotations

import math
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_mistral.backends.mlx.generate import stream_generate
from mlx_mistral.backends.mlx.model import make_cache


# ---- pure functions ------------------------------------------------------------------------------------
def position_edges(window: int, max_len: int) -> list[int]:
    """Bucket edges [0, W, 2W, 4W, ...] up to the first edge >= `max_len` (at least [0, W])."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    edges, hi = [0, window], window
    while hi < max_len:
        hi *= 2
        edges.append(hi)
    return edges


def bucket_label(lo: int, hi: int, window: int) -> str:
    """`0–W`, `W–2W`, `2W–4W`, ... for edges that are multiples of the window."""
    def w(x):
        k = x // window
        return "0" if x == 0 else "W" if k == 1 else f"{k}W"
    return f"{w(lo)}–{w(hi)}"


def bucket_losses(doc_losses, window: int) -> list[dict]:
    """Mean loss per position bucket over all documents: [{"label", "lo", "hi", "tokens", "loss"}], one
    entry per bucket from 0 to the longest document (a bucket no document reaches has loss None)."""
    doc_losses = [np.asarray(d, np.float64) for d in doc_losses]
    max_len = max((len(d) for d in doc_losses), default=0)
    edges = position_edges(window, max_len)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1, np.int64)
    for d in doc_losses:
        for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            part = d[lo:hi]
            sums[b] += part.sum()
            counts[b] += len(part)
    return [{"label": bucket_label(lo, hi, window), "lo": lo, "hi": hi, "tokens": int(c),
             "loss": float(s / c) if c else None}
            for lo, hi, s, c in zip(edges[:-1], edges[1:], sums, counts)]


def perplexity(doc_losses) -> float:
    """exp(mean token loss) over all tokens of all documents (token-weighted)."""
    total = sum(float(np.sum(d)) for d in doc_losses)
    count = sum(len(d) for d in doc_losses)
    if not count:
        raise ValueError("no tokens to compute a perplexity on")
    return math.exp(total / count)


def mean_spread(values) -> dict:
    """{"mean", "std" (sample, 0 for one value), "min", "max", "n", "values"} of finite numbers."""
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"need finite values, got {vals}")
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


# ---- measurements on a model -----------------------------------------------------------------------------
def document_losses(model, doc, chunk: int = 512) -> np.ndarray:
    """Per-position next-token losses (len(doc) - 1,) of one document run alone, fp32.

    The document goes through the model in chunks with its KV cache (rotating for a sliding-window
    model), so memory stays O(chunk x (window + chunk)) however long it is; the result equals one
    full-sequence forward pass.
    """
    tokens = mx.array(np.asarray(doc, np.int32))[None]  # (1, N)
    n = tokens.shape[1]
    if n < 2:
        raise ValueError("a document needs at least 2 tokens to have a next-token loss")
    cache = make_cache(model)
    out = []
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)
        logits = model(tokens[:, s:e], cache=cache)  # (1, e - s, vocab)
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, s + 1:e + 1], reduction="none")
        mx.eval(ce)
        out.append(np.array(ce[0]))
    return np.concatenate(out)


def decode_latency(model, prompt, new_tokens: int = 48, repeats: int = 3) -> float:
    """Median milliseconds per generated token (greedy, after the prefill), over `repeats` runs."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to time the decoding steps")
    prompt = [int(t) for t in prompt]
    times = []
    for _ in range(repeats):
        stamps = []
        for _tok in stream_generate(model, prompt, max_tokens=new_tokens, temp=0.0):
            stamps.append(time.perf_counter())
        times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)  # the first token carries prefill
    return statistics.median(times)
