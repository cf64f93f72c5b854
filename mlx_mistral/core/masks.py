"""The attention rule, once, for every backend and kernel.

Conventions (the same as transformers' Mistral): token i may attend to token j when j <= i and, with a
sliding window W, i - j < W (W positions, itself included). Packed rows add: i and j carry the same
segment id. Padding (segment 0) attends to the padding before it, so no row is ever fully masked.

`allowed` is written with comparisons and `&` only, so numpy, MLX and torch arrays (and the scalar
tensors flex_attention's `mask_mod` receives) all go through it unchanged. The backends build their
per-step masks from it (`packed_mask`, `positions_from_segments` in each model file: an `arange` and a
cumulative max are the only tensor ops they add).
"""

from __future__ import annotations


def allowed(q, k, window: int | None = None, q_segment=None, k_segment=None):
    """True where a query at position `q` may attend to a key at position `k` (broadcasting): causal,
    within `window` when given, and in the same segment when segment ids are given."""
    ok = k <= q
    if window is not None:
        ok = ok & (q - k < window)
    if q_segment is not None:
        ok = ok & (q_segment == k_segment)
    return ok


def causal_mask(q_pos, k_pos, window: int | None = None):
    """Boolean (Lq, Lk) mask: True where the query at `q_pos` may attend to the key at `k_pos`."""
    return allowed(q_pos[:, None], k_pos[None, :], window)  # (Lq, 1) vs (1, Lk)
