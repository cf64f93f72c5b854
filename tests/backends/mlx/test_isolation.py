"""Isolation, the core property of SWA-aware packing: a document inside a packed row computes exactly
what it computes alone, and nothing flows into it from the other documents of the row.

Tiny random fp32 models with small windows (16-32); rows are several times the window, documents are
longer than the window and start mid-row. The generic `naive` packing must fail both checks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral.backends.mlx.loader import load_model
from mlx_mistral.core.packing import pack

SEQ_LEN = 160  # 5x the swa window, 6.7x nemo's, 10x mqa's


def docs_for(seed: int, window: int):
    """Random documents: some longer than the window, one longer than a row (split), some short."""
    rng = np.random.default_rng(seed)
    lengths = [3 * window + 7, 2 * window - 3, window + 1, 17, 9, 40, SEQ_LEN + 50, 5]
    return [rng.integers(3, 32000, size=n).astype(np.int32) for n in lengths]


def segments(p: np.ndarray, r: int):
    """(segment id, indices) of the documents of row r."""
    seg = p.segment_ids[r]
    return [(int(s), np.flatnonzero(seg == s)) for s in np.unique(seg[seg > 0])]


@pytest.fixture(scope="module", params=["swa", "mixtral", "nemo", "mqa"])
def model(request, tiny_models):
    m = load_model(tiny_models(request.param), dtype="float32")
    mx.eval(m.parameters())
    return m


def test_packed_logits_equal_each_document_alone(model):
    w = model.args.sliding_window
    p = pack(docs_for(0, w), SEQ_LEN)
    assert p.n_split == 1 and p.rows >= 2
    mid_row_long = 0  # documents longer than the window that start mid-row
    for r in range(p.rows):
        tokens = mx.array(p.tokens[r:r + 1])
        packed = model(tokens, segment_ids=mx.array(p.segment_ids[r:r + 1]),
                       positions=mx.array(p.positions[r:r + 1]))  # (1, L, vocab)
        implied = model(tokens, segment_ids=mx.array(p.segment_ids[r:r + 1]))  # positions from segments
        for s, idx in segments(p, r):
            alone = model(mx.array(p.tokens[r, idx])[None])  # (1, n, vocab)
            got = packed[0, int(idx[0]):int(idx[-1]) + 1]
            assert mx.abs(got - alone[0]).max().item() <= 1e-5, (r, s)
            assert mx.abs(implied[0, int(idx[0]):int(idx[-1]) + 1] - alone[0]).max().item() <= 1e-5
            mid_row_long += int(idx[0] > 0 and len(idx) > w)
    assert mid_row_long >= 1, "the test must place a document longer than the window mid-row"


def doc_loss_grad(model, row_tokens, seg, pos, idx):
    """d(loss of the document at `idx`) / d(input embeddings of the row): (L, hidden)."""
    emb = model.model.embed_tokens(mx.array(row_tokens)[None])  # (1, L, hidden)
    sl = slice(int(idx[0]), int(idx[-1]) + 1)
    targets = mx.array(row_tokens[int(idx[0]) + 1:int(idx[-1]) + 1])

    def loss(e):
        logits = model(inputs_embeds=e, segment_ids=mx.array(seg)[None], positions=mx.array(pos)[None])
        lg = logits[0, sl][:-1]  # (n-1, vocab): each token of the document predicts the next
        return (mx.logsumexp(lg, axis=-1) - mx.take_along_axis(lg, targets[:, None], axis=-1)[:, 0]).mean()

    return mx.grad(loss)(emb)[0]  # (L, hidden)


def test_no_gradient_flows_between_documents(model):
    p = pack(docs_for(1, model.args.sliding_window), SEQ_LEN)
    r = int(np.argmax(p.segment_ids.max(axis=1)))  # the row with the most documents
    docs = segments(p, r)
    assert len(docs) >= 3
    for s, idx in docs:
        g = np.array(doc_loss_grad(model, p.tokens[r], p.segment_ids[r], p.positions[r], idx))
        other = np.ones(SEQ_LEN, bool)
        other[idx] = False
        assert np.all(g[other] == 0.0), f"segment {s} receives gradient from other tokens"
        assert np.abs(g[idx]).max() > 0  # and its own tokens do matter


def test_naive_packing_fails_both(model):
    docs = docs_for(0, model.args.sliding_window)
    p = pack(docs, SEQ_LEN, mode="naive")
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    # documents that lie inside one row but do not start it
    inside = [(i, int(s) // SEQ_LEN, int(s) % SEQ_LEN) for i, s in enumerate(starts[:-1])
              if s % SEQ_LEN and s // SEQ_LEN == (s + len(docs[i]) - 1) // SEQ_LEN]
    assert inside
    for i, r, at in inside:
        n = len(docs[i])
        row = model(mx.array(p.tokens[r:r + 1]), segment_ids=mx.array(p.segment_ids[r:r + 1]),
                    positions=mx.array(p.positions[r:r + 1]))
        alone = model(mx.array(docs[i])[None])
        assert mx.abs(row[0, at:at + n] - alone[0]).max().item() > 1e-2
        g = np.array(doc_loss_grad(model, p.tokens[r], p.segment_ids[r], p.positions[r],
                                   np.arange(at, at + n)))
        assert np.abs(g[:at]).max() > 0, "naive packing leaks the previous documents into this one"
