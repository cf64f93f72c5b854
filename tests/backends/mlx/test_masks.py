"""Masks and positions as pure functions (no model)."""

import mlx.core as mx
import numpy as np

from mlx_mistral.backends.mlx.model import causal_mask, packed_mask, positions_from_segments


def test_causal_window_row_sums():
    L, w = 100, 16
    m = np.array(causal_mask(mx.arange(L), mx.arange(L), w))
    assert m.sum(axis=1).tolist() == [min(i + 1, w) for i in range(L)]
    full = np.array(causal_mask(mx.arange(L), mx.arange(L)))
    assert full.sum(axis=1).tolist() == list(range(1, L + 1))


def test_causal_mask_with_offset_queries():
    m = np.array(causal_mask(mx.arange(50, 53), mx.arange(40, 53), window=5))
    assert m.sum(axis=1).tolist() == [5, 5, 5]
    assert m[0].tolist() == [False] * 6 + [True] * 5 + [False] * 2


def test_packed_mask_isolates_documents_and_keeps_the_window():
    seg = np.array([[1] * 40 + [2] * 50 + [0] * 10])
    m = np.array(packed_mask(mx.array(seg), window=16))[0, 0]
    assert not m[:40, 40:].any() and not m[40:90, :40].any() and not m[40:90, 90:].any()
    assert m[40:90].sum(axis=1).tolist() == [min(i + 1, 16) for i in range(50)]
    assert m.sum(axis=1).min() >= 1  # padding rows are never fully masked


def test_positions_restart_per_segment():
    seg = mx.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert np.array(positions_from_segments(seg)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
