"""Sequence packing: tokenized documents -> fixed-length training rows, as pure numpy functions.

Three modes:
- `swa` (default): best-fit-decreasing bin packing of whole documents into rows. Each document keeps
  its own segment id (1, 2, ... within a row; 0 is padding) and its positions restart at 0, so with the
  model's mask (same segment AND causal AND within the sliding window) a document inside a packed row
  computes exactly what it computes alone.
- `naive`: the generic baseline: documents concatenated and cut into rows, one segment per row, one
  causal mask, positions running on. Documents attend into the ones before them.
- `none`: one document per row, padded.

Documents longer than `seq_len` are split into chunks of at most `seq_len` tokens; consecutive chunks
share `overlap` tokens, which are context only (loss 0) in the later chunk. A chunk is a document of its
own in every respect (positions from 0, its own segment). Nothing is truncated silently: `Packed` reports
how many documents were split and how many tokens were dropped (only with `long="drop"`, or empty docs).
`context_stats` measures context utilisation: real tokens per row of capacity, and the longest document
trained whole (in one row, unsplit) against the longest one given.

The label convention is the trainer's: `loss_mask[t] == 1` means token t is a target (predicted from
token t-1 of the same segment); `next_token_targets` computes the shifted labels and weights.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

MODES = ("swa", "naive", "none")


@dataclass
class Packed:
    """Packed rows: int32 arrays of shape (rows, seq_len), plus what packing did to the documents."""

    tokens: np.ndarray
    segment_ids: np.ndarray  # 1.. per document within a row, 0 = padding
    positions: np.ndarray  # restart at 0 per document (naive: run on along the row)
    loss_mask: np.ndarray  # 1 = token is a target
    mode: str
    seq_len: int
    n_docs: int  # documents given
    n_chunks: int  # documents placed, after splitting (naive: documents given)
    n_split: int  # documents split across chunks (naive: documents cut by a row boundary)
    split_tokens: int  # tokens of the split documents
    overlap_tokens: int  # tokens repeated as context at the start of later chunks
    n_dropped: int = 0  # documents dropped (empty, or too long with long="drop")
    dropped_tokens: int = 0
    doc_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    doc_whole: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)  # in one row, unsplit

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def efficiency(self) -> float:
        """Real tokens / row capacity."""
        cap = self.rows * self.seq_len
        return self.real_tokens / cap if cap else 0.0

    def stats(self) -> dict:
        """Plain numbers for logs and `data inspect`."""
        return {"mode": self.mode, "seq_len": self.seq_len, "rows": self.rows, "n_docs": self.n_docs,
                "n_chunks": self.n_chunks, "n_split": self.n_split, "split_tokens": self.split_tokens,
                "overlap_tokens": self.overlap_tokens, "n_dropped": self.n_dropped,
                "dropped_tokens": self.dropped_tokens, "real_tokens": self.real_tokens,
                "loss_tokens": self.loss_tokens, "capacity": self.rows * self.seq_len,
                "efficiency": self.efficiency, **context_stats(self)}


def context_stats(packed: Packed, segment_ids: np.ndarray | None = None) -> dict:
    """Context utilisation of packed rows, as plain numbers for logs, `data inspect` and the start event.

    - `context_utilisation`: real (non-padding) tokens / (rows x seq_len);
    - `context_tokens_per_row`: mean real tokens per row (of `seq_len`);
    - `longest_doc`, `longest_whole_doc`: the longest document given, and the longest trained whole (it sits
      in one row, unsplit; in `naive` mode, not cut by a row boundary); 0 when there is none;
    - `split_docs`, `split_token_fraction`: documents split across rows (chunks, with `overlap`), and the
      fraction of the documents' tokens that are in them.

    `segment_ids` (default: the packed rows') measures utilisation over a subset of the rows, e.g. the
    training rows once validation rows are held out; the document numbers stay those of the whole packing.
    """
    seg = packed.segment_ids if segment_ids is None else np.asarray(segment_ids)
    rows = seg.shape[0] if seg.ndim == 2 else 0
    real = int((seg > 0).sum())
    lengths, whole = packed.doc_lengths, packed.doc_whole
    total = int(lengths.sum())
    return {"context_utilisation": real / (rows * packed.seq_len) if rows else 0.0,
            "context_tokens_per_row": real / rows if rows else 0.0,
            "longest_doc": int(lengths.max()) if lengths.size else 0,
            "longest_whole_doc": int(lengths[whole].max()) if whole.any() else 0,
            "split_docs": packed.n_split,
            "split_token_fraction": packed.split_tokens / total if total else 0.0}


def split_document(n: int, seq_len: int, overlap: int = 0) -> list[tuple[int, int]]:
    """[start, end) spans of the chunks of an n-token document: each at most `seq_len` long, each after
    the first starting `overlap` tokens before the previous one ends."""
    if not 0 <= overlap < seq_len:
        raise ValueError(f"overlap must be in 0..seq_len-1 ({seq_len - 1}), got {overlap}")
    spans, start = [], 0
    while True:
        end = min(start + seq_len, n)
        spans.append((start, end))
        if end == n:
            return spans
        start = end - overlap


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) holding `lengths` (each <= capacity): every item goes, longest first,
    into the open bin it fills most tightly. O(n log n) searches over a sorted list of free space."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index) of bins with room left
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))  # tightest bin with free space >= n
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack(docs, seq_len: int, loss_masks=None, overlap: int = 0, mode: str = "swa", long: str = "split",
         pad_id: int = 0) -> Packed:
    """Pack tokenized documents (lists/arrays of token ids, each with its own BOS/EOS) into rows.

    `loss_masks`: optional 0/1 sequences of the same lengths (default: every token is a target).
    `overlap`: tokens shared by consecutive chunks of a long document (loss 0 in the later chunk).
    `mode`: "swa" (isolated documents, best-fit-decreasing), "naive" (concatenated) or "none" (padded).
    `long`: "split" documents longer than `seq_len` into chunks, or "drop" them (counted in the stats).
    """
    if mode not in MODES:
        raise ValueError(f"packing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if long not in ("split", "drop"):
        raise ValueError(f"long must be 'split' or 'drop', got {long!r}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not 0 <= overlap < seq_len:
        raise ValueError(f"overlap must be in 0..seq_len-1 ({seq_len - 1}), got {overlap}")
    docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in docs]
    if loss_masks is None:
        masks = [np.ones(len(d), np.int32) for d in docs]
    else:
        if len(loss_masks) != len(docs):
            raise ValueError(f"{len(loss_masks)} loss masks for {len(docs)} documents")
        masks = [np.asarray(m, dtype=np.int32).reshape(-1) for m in loss_masks]
        for i, (d, m) in enumerate(zip(docs, masks)):
            if len(d) != len(m):
                raise ValueError(f"document {i}: {len(d)} tokens but a loss mask of length {len(m)}")
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    if mode == "naive":
        return _pack_naive(docs, masks, lengths, seq_len, pad_id)

    # Split (or drop) long documents into chunks; every chunk is a document of its own.
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    n_split = split_tokens = overlap_tokens = n_dropped = dropped_tokens = 0
    for d, m in zip(docs, masks):
        n = len(d)
        if n == 0:
            n_dropped += 1
            continue
        if n <= seq_len:
            chunks.append((d, m))
            continue
        if long == "drop":
            n_dropped += 1
            dropped_tokens += n
            continue
        n_split += 1
        split_tokens += n
        for k, (s, e) in enumerate(split_document(n, seq_len, overlap)):
            cm = m[s:e].copy()
            if k > 0 and overlap:
                cm[:overlap] = 0  # context already seen (and trained on) in the previous chunk
                overlap_tokens += overlap
            chunks.append((d[s:e], cm))

    clen = [len(c[0]) for c in chunks]
    bins = best_fit_decreasing(clen, seq_len) if mode == "swa" else [[i] for i in range(len(chunks))]
    R = len(bins)
    tokens = np.full((R, seq_len), pad_id, np.int32)
    seg = np.zeros((R, seq_len), np.int32)
    pos = np.zeros((R, seq_len), np.int32)
    loss = np.zeros((R, seq_len), np.int32)
    for r, items in enumerate(bins):
        at = 0
        for s, i in enumerate(items, start=1):
            d, m = chunks[i]
            n = len(d)
            tokens[r, at:at + n] = d
            seg[r, at:at + n] = s
            pos[r, at:at + n] = np.arange(n, dtype=np.int32)
            loss[r, at:at + n] = m
            at += n
    return Packed(tokens, seg, pos, loss, mode, seq_len, n_docs=len(docs), n_chunks=len(chunks),
                  n_split=n_split, split_tokens=split_tokens, overlap_tokens=overlap_tokens,
                  n_dropped=n_dropped, dropped_tokens=dropped_tokens, doc_lengths=lengths,
                  doc_whole=(lengths > 0) & (lengths <= seq_len))


def _pack_naive(docs, masks, lengths, seq_len, pad_id) -> Packed:
    """Concatenate everything and cut into rows: one segment per row, positions 0..seq_len-1."""
    total = int(lengths.sum())
    R = max(1, -(-total // seq_len)) if total else 0
    flat_t = np.full(R * seq_len, pad_id, np.int32)
    flat_m = np.zeros(R * seq_len, np.int32)
    if total:
        flat_t[:total] = np.concatenate(docs)
        flat_m[:total] = np.concatenate(masks)
    seg = np.zeros(R * seq_len, np.int32)
    seg[:total] = 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    ends = starts + lengths
    cut = (lengths > 0) & (starts // seq_len != (ends - 1) // seq_len)  # crosses a row boundary
    pos = np.tile(np.arange(seq_len, dtype=np.int32), R)
    pos[total:] = 0
    shape = (R, seq_len)
    return Packed(flat_t.reshape(shape), seg.reshape(shape), pos.reshape(shape), flat_m.reshape(shape),
                  "naive", seq_len, n_docs=len(docs), n_chunks=len(docs), n_split=int(cut.sum()),
                  split_tokens=int(lengths[cut].sum()), overlap_tokens=0,
                  n_dropped=int((lengths == 0).sum()), dropped_tokens=0, doc_lengths=lengths,
                  doc_whole=(lengths > 0) & ~cut)


def next_token_targets(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray):
    """Labels and weights for next-token loss on packed rows: `(targets, weights)`, both (rows, seq_len).

    Position t predicts token t+1 when t+1 is in the same (non-padding) segment; the weight is then
    `loss_mask[t+1]`, else 0 (a document's last token predicts nothing across the boundary).
    """
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    same = np.zeros(tokens.shape, bool)
    same[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    weights = np.zeros(tokens.shape, np.int32)
    weights[:, :-1] = loss_mask[:, 1:]
    return targets, weights * same


def length_histogram(lengths, seq_len: int, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of document lengths, inclusive, doubling up to `seq_len`, plus one
    bucket for documents longer than `seq_len` when there are any."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    highs = sorted({max(1, seq_len >> k) for k in range(bins - 1, -1, -1)})
    if int(lengths.max()) > seq_len:
        highs.append(int(lengths.max()))
    out, lo = [], 0
    for hi in highs:
        out.append((lo, hi, int(((lengths >= lo) & (lengths <= hi)).sum())))
        lo = hi + 1
    return out
