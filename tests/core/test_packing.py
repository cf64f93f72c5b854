"""Packing as pure functions: segments, positions, splitting, loss masks, efficiency, context utilisation.
No model here."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_mistral.core.packing import (best_fit_decreasing, context_stats, length_histogram, next_token_targets,
                                     pack, split_document)


def random_docs(n, median=300, sigma=0.8, seed=0, vocab=1000, lo=2):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(lo, rng.lognormal(np.log(median), sigma, n).astype(int))
    return [rng.integers(3, vocab, size=k).astype(np.int32) for k in lengths]


def documents_of(p):
    """Every (tokens, positions, loss) run of one segment in the packed rows, in row order."""
    out = []
    for r in range(p.rows):
        seg = p.segment_ids[r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "a document must be contiguous in its row"
            out.append((p.tokens[r, idx], p.positions[r, idx], p.loss_mask[r, idx]))
    return out


def test_swa_rows_hold_every_document_once_with_restarting_positions():
    docs = [d[:256] for d in random_docs(400, median=60, seed=1)]
    p = pack(docs, 256)
    for a in (p.tokens, p.segment_ids, p.positions, p.loss_mask):
        assert a.dtype == np.int32 and a.shape == (p.rows, 256)
    placed = documents_of(p)
    assert sum(len(t) for t, _, _ in placed) == sum(len(d) for d in docs) == p.real_tokens
    for t, pos, _ in placed:
        np.testing.assert_array_equal(pos, np.arange(len(t)))
    key = lambda a: a.tobytes()  # noqa: E731
    assert p.n_split == 0  # every document here fits a row
    assert sorted(map(key, (t for t, _, _ in placed))) == sorted(map(key, docs))
    # segment ids number documents of a row 1, 2, ... in order; padding is 0 and at the end, loss 0
    for r in range(p.rows):
        seg = p.segment_ids[r]
        real = seg[seg > 0]
        assert np.all(np.diff(real) >= 0) and real[0] == 1 and len(np.unique(real)) == real[-1]
        n = len(real)
        assert np.all(seg[n:] == 0) and np.all(p.loss_mask[r, n:] == 0)


def test_long_documents_are_split_never_truncated():
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, 1000, size=k) for k in (10, 1000, 257, 256, 33)]
    p = pack(docs, 256)
    assert p.n_split == 2 and p.split_tokens == 1000 + 257 and p.dropped_tokens == 0
    assert p.real_tokens == sum(len(d) for d in docs)
    # the chunks of the long document concatenate back to it
    chunks = [t for t, _, _ in documents_of(p)]
    for d in docs:
        if len(d) > 256:
            parts = [c for c in chunks if any(np.array_equal(c, d[s:e]) for s, e in split_document(len(d), 256))]
            assert sum(len(c) for c in parts) == len(d)
    assert max(len(c) for c in chunks) == 256


def test_overlap_tokens_are_context_without_loss():
    doc = np.arange(3, 3 + 700, dtype=np.int32)
    spans = split_document(700, 256, overlap=64)
    assert spans == [(0, 256), (192, 448), (384, 640), (576, 700)]
    p = pack([doc], 256, overlap=64)
    assert p.n_chunks == 4 and p.overlap_tokens == 3 * 64
    by_first = {int(t[0]): (t, pos, m) for t, pos, m in documents_of(p)}
    for k, (s, e) in enumerate(spans):
        t, pos, m = by_first[int(doc[s])]
        np.testing.assert_array_equal(t, doc[s:e])
        np.testing.assert_array_equal(pos, np.arange(e - s))  # a chunk is a document of its own
        want = np.ones(e - s, np.int32)
        if k:
            want[:64] = 0
        np.testing.assert_array_equal(m, want)
    # every token of the document is a target exactly once
    assert p.loss_tokens == 700


def test_loss_masks_travel_with_their_tokens():
    rng = np.random.default_rng(3)
    docs = [rng.integers(3, 1000, size=k) for k in rng.integers(5, 90, size=60)]
    masks = [(rng.random(len(d)) < 0.5).astype(np.int32) for d in docs]
    p = pack(docs, 128, loss_masks=masks)
    lookup = {d.astype(np.int32).tobytes(): m for d, m in zip(docs, masks)}
    for t, _, m in documents_of(p):
        np.testing.assert_array_equal(m, lookup[t.tobytes()])


def test_drop_mode_counts_what_it_drops():
    docs = [[1] * 10, [1] * 300, [], [1] * 20]
    p = pack(docs, 64, long="drop")
    assert (p.n_dropped, p.dropped_tokens, p.real_tokens) == (2, 300, 30)


def test_efficiency_at_least_95_percent_on_lognormal_lengths():
    docs = random_docs(3000, median=300, seed=4)
    assert 250 < np.median([len(d) for d in docs]) < 350
    p = pack(docs, 2048)
    assert p.efficiency >= 0.95
    assert p.real_tokens == sum(len(d) for d in docs)  # no overlap: nothing repeated or lost
    pad = pack(docs, 2048, mode="none")
    assert pad.efficiency < 0.3 and pad.real_tokens == p.real_tokens


def test_best_fit_decreasing_picks_the_tightest_bin():
    bins = best_fit_decreasing([6, 5, 4, 3, 2], 10)
    # 6 opens bin 0 (free 4), 5 opens bin 1 (free 5), 4 fills bin 0, 3 -> bin 1 (free 2), 2 -> bin 1
    assert bins == [[0, 2], [1, 3, 4]]
    lengths = np.random.default_rng(5).integers(1, 100, size=500)
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 100 * 11 / 9)) + 1  # BFD's 11/9 OPT + 6/9 bound


def test_naive_concatenates_with_running_positions():
    docs = [np.full(k, i + 3, np.int32) for i, k in enumerate((100, 100, 100))]
    p = pack(docs, 128, mode="naive")
    assert p.rows == 3 and p.real_tokens == 300
    np.testing.assert_array_equal(p.tokens.reshape(-1)[:300], np.concatenate(docs))
    assert np.all(p.segment_ids.reshape(-1)[:300] == 1) and np.all(p.segment_ids.reshape(-1)[300:] == 0)
    np.testing.assert_array_equal(p.positions[0], np.arange(128))
    np.testing.assert_array_equal(p.positions[1], np.arange(128))
    assert p.n_split == 2  # documents 0 and 1 cross a row boundary


def test_none_mode_is_one_document_per_row():
    docs = [[5] * 10, [6] * 40, [7] * 100]
    p = pack(docs, 64, mode="none")
    assert p.rows == 4 and p.n_split == 1
    assert [int((p.segment_ids[r] > 0).sum()) for r in range(4)] == [10, 40, 64, 36]
    assert p.segment_ids.max() == 1


def test_next_token_targets_stop_at_document_boundaries():
    tokens = np.array([[1, 10, 11, 2, 1, 20, 2, 0]], np.int32)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
    loss = np.array([[0, 1, 1, 1, 0, 1, 1, 0]], np.int32)
    t, w = next_token_targets(tokens, seg, loss)
    np.testing.assert_array_equal(t[0, :7], [10, 11, 2, 1, 20, 2, 0])
    np.testing.assert_array_equal(w[0], [1, 1, 1, 0, 1, 1, 0, 0])


@pytest.mark.parametrize("bad", [dict(seq_len=1), dict(overlap=128), dict(mode="greedy"), dict(long="cut")])
def test_bad_arguments_raise(bad):
    kw = dict(seq_len=128) | bad
    with pytest.raises(ValueError):
        pack([[1, 2, 3]], **kw)
    with pytest.raises(ValueError, match="document 0"):
        pack([[1, 2, 3]], 128, loss_masks=[[1, 1]])


def test_length_histogram_counts_every_document():
    lengths = [1, 16, 17, 300, 2048, 2049, 9000]
    h = length_histogram(lengths, 2048)
    assert sum(c for _, _, c in h) == len(lengths)
    assert h[-1] == (2049, 9000, 2) and h[-2] == (1025, 2048, 1)


def test_context_stats_count_real_tokens_per_row_and_the_longest_document_trained_whole():
    # Rows of 100: 60 + 40 fill one row, 90 and 30 share nothing (90 + 30 > 100), 250 splits into 100/100/50.
    docs = [np.full(k, 5, np.int32) for k in (60, 40, 90, 30, 250)]
    p = pack(docs, 100)
    c = context_stats(p)
    real = sum(len(d) for d in docs)
    assert real == p.real_tokens == 470
    assert c["context_utilisation"] == pytest.approx(real / (p.rows * 100)) == pytest.approx(p.efficiency)
    assert c["context_tokens_per_row"] == pytest.approx(real / p.rows)
    # measured independently of the packer: per row, count the cells whose segment id is not 0
    assert c["context_tokens_per_row"] == pytest.approx(np.mean([np.count_nonzero(r) for r in p.segment_ids]))
    assert (c["longest_doc"], c["longest_whole_doc"], c["split_docs"]) == (250, 90, 1)
    assert c["split_token_fraction"] == pytest.approx(250 / 470)
    assert p.stats()["longest_whole_doc"] == 90  # the stats of logs and `data inspect` carry them

    # A subset of the rows (training rows once validation rows are held out): utilisation of those rows only.
    full = [r for r in range(p.rows) if np.count_nonzero(p.segment_ids[r]) == 100]
    sub = context_stats(p, p.segment_ids[full])
    assert sub["context_utilisation"] == 1.0 and sub["context_tokens_per_row"] == 100.0
    assert sub["longest_whole_doc"] == 90

    # Overlap repeats tokens as context: more rows, the same documents.
    o = context_stats(pack(docs, 100, overlap=20))
    assert (o["longest_whole_doc"], o["split_docs"]) == (90, 1)

    # A document exactly one row long is whole; dropped and empty ones are not.
    d = context_stats(pack([[5] * 100, [5] * 101, []], 100, long="drop"))
    assert (d["longest_doc"], d["longest_whole_doc"], d["split_docs"], d["split_token_fraction"]) == (101, 100, 0, 0)
    # Naive: a document is whole unless a row boundary cuts it.
    n = context_stats(pack([[5] * 30, [5] * 80, [5] * 10], 100, mode="naive"))
    assert (n["longest_whole_doc"], n["split_docs"], n["split_token_fraction"]) == (30, 1, pytest.approx(80 / 120))
    # Nothing to pack: zeros, not errors.
    e = context_stats(pack([[]], 100))
    assert e == {"context_utilisation": 0.0, "context_tokens_per_row": 0.0, "longest_doc": 0,
                 "longest_whole_doc": 0, "split_docs": 0, "split_token_fraction": 0.0}
