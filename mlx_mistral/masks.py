"""Attention masks and per-token positions: pure functions, built once per step and shared by all layers.

Conventions (the same as transformers' Mistral): token i may attend to token j when j <= i and, with a
sliding window W, i - j < W (W positions, itself included). Packed rows add: i and j carry the same
segment id. Padding (segment 0) attends to the padding before it, so no row is ever fully masked.
"""

from __future__ import annotations

import mlx.core as mx


def causal_mask(q_pos: mx.array, k_pos: mx.array, window: int | None = None) -> mx.array:
    """Boolean (Lq, Lk) mask: True where the query at `q_pos` may attend to the key at `k_pos`."""
    q = q_pos[:, None]  # (Lq, 1)
    k = k_pos[None, :]  # (1, Lk)
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask


def packed_mask(segment_ids: mx.array, window: int | None = None) -> mx.array:
    """Boolean (B, 1, L, L) mask for packed rows: same segment AND causal AND within `window`.

    Documents are contiguous in a row, so row indices order tokens within a document exactly as their
    positions do; the window is measured on them.
    """
    L = segment_ids.shape[-1]
    idx = mx.arange(L)
    base = causal_mask(idx, idx, window)  # (L, L)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, L, L)
    return (same & base)[:, None]  # (B, 1, L, L)


def positions_from_segments(segment_ids: mx.array) -> mx.array:
    """Positions that restart at 0 at every change of segment id along the row: (B, L) int32."""
    B, L = segment_ids.shape
    idx = mx.broadcast_to(mx.arange(L, dtype=mx.int32), (B, L))
    prev = mx.concatenate([mx.full((B, 1), -1, segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    starts = mx.where(segment_ids != prev, idx, 0)  # (B, L) start index at each document start
    return idx - mx.cummax(starts, axis=1)
