"""Blockwise attention, planned: which queries form a block, which keys each block can see, and when the
dense path is the better choice. Pure functions of ints and (optionally) numpy segment ids; both backends
run the plan with their own tensor code (backends/*/blockwise.py).

A block of queries [q0, q1) attends to the key band [k0, q1): keys after q1 - 1 are in the future, and keys
before k0 are outside every query's window (k0 >= q0 - W + 1) or belong to a document that starts after
them (k0 >= the start of the document that holds query q0, the earliest document in the block). Inside the
band the exact rule is still `core.masks.allowed` on row indices and segment ids, so packing isolation and
the window hold exactly as in the dense mask; the band only skips keys that rule would mask anyway.

Memory: a layer's attention holds one block's scores, H x C x (q1 - k0) <= H x C x (C + W - 1), instead of
H x L x L. Without a window (v0.2/v0.3, Nemo, Mixtral) the band grows to the block's document start, so the
compute stays quadratic while the memory becomes linear in L.
"""

from __future__ import annotations

import numpy as np

MODES = ("auto", "dense", "blockwise")
# auto: the dense path below this many tokens per row (its one big matmul is faster there, and its L x L
# scores are small); blockwise from here on.
AUTO_MIN_LEN = 1024
AUTO_BLOCK_MIN, AUTO_BLOCK_MAX = 64, 512
AUTO_BAND_SCORES = 1 << 22  # scores per head of one block without a window (4M: 16 MB fp32)
# Logits per chunk of the LM head and cross-entropy (both backends, and the planner): 16M, 64 MB in fp32,
# 512 tokens of a 32k vocabulary. The loss's chunk is a constant cost of every long row (its backward holds
# a few (chunk, vocab) fp32 copies), so it is kept to a few hundred tokens: measured on a 4-layer hidden-256
# model, chunks of 512 instead of 1024 at vocab 32k lowered the peak by 0.25-0.46 GB at 2k-16k tokens.
LOSS_ELEMENTS = 1 << 24


def auto_block(window: int | None, seq_len: int | None = None) -> int:
    """Query block size for a model with sliding `window` (None: full attention): about half the window,
    a power of two in [64, 512], so a block's band (C + W keys) stays near 1.5 W. Without a window a band
    is up to `seq_len` keys, so the block shrinks as rows grow: the largest power of two with
    C x seq_len <= AUTO_BAND_SCORES (512 up to 8k tokens, 128 at 32k)."""
    if window is None:
        c = AUTO_BLOCK_MAX
        while seq_len and c > AUTO_BLOCK_MIN and c * seq_len > AUTO_BAND_SCORES:
            c //= 2
        return c
    c = 1 << max(0, (window // 2).bit_length() - 1)  # the power of two <= W/2
    return int(min(AUTO_BLOCK_MAX, max(AUTO_BLOCK_MIN, c)))


def loss_chunk(vocab_size: int) -> int:
    """Tokens per chunk of the LM head and cross-entropy: LOSS_ELEMENTS logits, rounded down to a multiple
    of 64 tokens when there are that many (512 for vocab 32000 or 32768, 128 for Nemo's 131072)."""
    n = max(1, LOSS_ELEMENTS // max(1, int(vocab_size)))
    return n - n % 64 if n >= 64 else n


def choose(seq_len: int, window: int | None, mode: str = "auto", block: int | None = None) -> int | None:
    """The query block size to use for rows of `seq_len` tokens, or None for the dense path.

    `mode`: auto (dense below AUTO_MIN_LEN tokens or when a row is at most two blocks, blockwise above),
    dense, or blockwise. `block`: a fixed block size (None: `auto_block(window)`)."""
    if mode not in MODES:
        raise ValueError(f"attention must be one of {', '.join(MODES)}, got {mode!r}")
    if block is not None and block < 1:
        raise ValueError(f"attention_block must be a positive number of tokens, got {block}")
    if mode == "dense":
        return None
    c = block or auto_block(window, seq_len)
    if mode == "blockwise":
        return min(c, seq_len)
    if seq_len < AUTO_MIN_LEN or seq_len <= 2 * c:
        return None
    return c


def doc_starts(segment_ids: np.ndarray) -> np.ndarray:
    """(B, L) row index of the first token of the segment each token belongs to (segments are contiguous
    runs of equal ids; padding, id 0, is a run like any other)."""
    seg = np.asarray(segment_ids)
    if seg.ndim == 1:
        seg = seg[None]
    B, L = seg.shape
    idx = np.broadcast_to(np.arange(L), (B, L))
    new = np.ones((B, L), bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return np.maximum.accumulate(np.where(new, idx, 0), axis=1)


def plan(seq_len: int, block: int, window: int | None = None, segment_ids=None) -> tuple[tuple[int, int, int], ...]:
    """The blocks of a row of `seq_len` tokens: a tuple of (q0, q1, k0), queries [q0, q1) seeing keys
    [k0, q1). With `segment_ids` (B, L) the band also starts no earlier than the first document in the
    block (the earliest over the batch's rows), which only skips keys the segment rule masks anyway."""
    if block < 1:
        raise ValueError(f"block size must be positive, got {block}")
    starts = doc_starts(segment_ids) if segment_ids is not None else None
    out = []
    for q0 in range(0, seq_len, block):
        q1 = min(seq_len, q0 + block)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        if starts is not None:
            k0 = max(k0, int(starts[:, q0].min()))
        out.append((q0, q1, k0))
    return tuple(out)


def peak_scores(seq_len: int, block: int, window: int | None) -> int:
    """Largest number of (query, key) scores one head holds for one block of the plan (no segment ids)."""
    return max((q1 - q0) * (q1 - k0) for q0, q1, k0 in plan(seq_len, block, window))


def describe(seq_len: int, window: int | None, mode: str = "auto", block: int | None = None) -> dict:
    """The attention path of a run, for its start event: attention (dense / blockwise), attention_block
    (None when dense) and attention_reason (why, in words)."""
    c = choose(seq_len, window, mode, block)
    if mode != "auto":
        why = f"attention: {mode} in the config"
    elif c is None:
        why = (f"rows of {seq_len} tokens are short (under {AUTO_MIN_LEN}, or at most two blocks): "
               "one dense score matrix per layer is faster there")
    else:
        why = (f"rows of {seq_len} tokens: blocks of {c} queries, each seeing "
               f"{'only its window' if window else 'only the keys before it'}, keep attention memory "
               "linear in the row")
    return {"attention": "dense" if c is None else "blockwise", "attention_block": c, "attention_reason": why}
