"""Preference data: JSONL records -> token pairs -> packed rows, as pure numpy (the data half of DPO/ORPO).

A record is TRL's explicit-prompt form, text or conversational:
  {"prompt": str, "chosen": str, "rejected": str}
  {"prompt": [messages...], "chosen": [assistant messages...], "rejected": [assistant messages...]}
Text is formatted as SFT's prompt/completion (`chat.encode_completion`: `<s>` prompt, completion, `</s>`);
messages by the same Mistral instruct code as SFT (`chat.encode_chat`). The completion of each side is
every token after the prompt's tokens (the assistant turn(s) and their EOS). A bad line is a ValueError
naming the file and the line.

Packing keeps a pair together: a pair (chosen + rejected, two segments) is the unit of best-fit-decreasing,
so a row holds whole pairs with SFT's isolation (segment ids, positions restarting, the window), a pair costs
its real tokens rather than a padded batch, and the number of pairs of a step is known before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import chat
from .data import _cache_key, _read_cache, _write_cache, cache_root, encode_jsonl, resolve_split
from .packing import best_fit_decreasing, next_token_targets
from .tokenizer import Tokenizer

_SHAPE = '{"prompt", "chosen", "rejected"} (all strings, or all lists of messages)'


@dataclass
class Pair:
    """Token ids and completion masks (1 = the token's log-prob counts) of one preference pair."""

    chosen: np.ndarray
    chosen_mask: np.ndarray
    rejected: np.ndarray
    rejected_mask: np.ndarray

    @property
    def prompt_len(self) -> int:
        return int(np.argmax(self.chosen_mask))

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    def trl_ids(self) -> dict:
        """The pair as TRL's tokenized columns (prompt_ids / chosen_ids / rejected_ids)."""
        p = self.prompt_len
        return {"prompt_ids": self.chosen[:p].tolist(), "chosen_ids": self.chosen[p:].tolist(),
                "rejected_ids": self.rejected[p:].tolist()}


def _side(prompt_ids: np.ndarray, full: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(prompt_ids)
    if len(full) <= n or not np.array_equal(full[:n], prompt_ids):
        raise ValueError(f"the formatted prompt is not a prefix of prompt + {what}")
    mask = np.zeros(len(full), np.int32)
    mask[n:] = 1
    return full.astype(np.int32), mask


def encode_pair(tok: Tokenizer, rec, version: str | None = None) -> Pair:
    """One parsed record -> `Pair`; `ValueError` saying what is wrong (the caller adds file:line)."""
    if not isinstance(rec, dict) or not {"prompt", "chosen", "rejected"} <= set(rec):
        got = f"keys {sorted(rec)[:8]}" if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"expected {_SHAPE}, got {got}")
    p, c, r = rec["prompt"], rec["chosen"], rec["rejected"]
    if all(isinstance(x, str) for x in (p, c, r)):
        for k in ("chosen", "rejected"):
            if not rec[k].strip():
                raise ValueError(f"'{k}' is empty: a pair needs two non-empty answers")
        (tc, mc), (tr, mr) = (chat.encode_completion(tok, p, x) for x in (c, r))
        return Pair(tc, mc, tr, mr)
    if all(isinstance(x, list) for x in (p, c, r)):
        for k in ("chosen", "rejected"):
            if not rec[k] or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in rec[k]):
                raise ValueError(f"'{k}' must be a non-empty list of assistant messages "
                                 '[{"role": "assistant", "content": ...}]')
        if not p or not isinstance(p[-1], dict) or p[-1].get("role") != "user":
            raise ValueError("'prompt' must be a list of messages ending with a user message")
        prompt_ids = np.asarray(chat.encode_prompt(tok, p, version), np.int32)
        out = []
        for k, x in (("chosen", c), ("rejected", r)):
            full, _ = chat.encode_chat(tok, p + x, loss_on="all", version=version)
            out += _side(prompt_ids, full, k)
        return Pair(*out)
    raise ValueError("'prompt', 'chosen' and 'rejected' must be all strings or all lists of messages")


def tokenize_pairs_file(path: Path, tok: Tokenizer, progress: Callable[[int, int], None] | None = None,
                        formats: dict | None = None) -> list[Pair]:
    """Every line of a preference JSONL file as a `Pair`; a bad line is a ValueError `file:line: what`.
    `formats`, when given, counts the record shapes ("chat": message lists, "completion": text)."""
    encoded, _ = encode_jsonl(path, lambda rec: encode_pair(tok, rec), _SHAPE, progress=progress)
    if not encoded:
        raise ValueError(f"{path}: no preference pairs (the file is empty)")
    if formats is not None:
        for rec, _ in encoded:
            k = "completion" if isinstance(rec["prompt"], str) else "chat"
            formats[k] = formats.get(k, 0) + 1
    return [pair for _, pair in encoded]


def load_pairs(path: str | Path, tok: Tokenizer, split: str = "train", cache: bool = True,
               progress: Callable[[int, int], None] | None = None,
               formats: dict | None = None) -> tuple[list[Pair], Path | None]:
    """(pairs of one split, their cache directory or None). Cached like SFT's documents (data.py): two
    documents per pair (chosen 2k, rejected 2k + 1) with their completion masks, keyed by the data and
    tokenizer hashes; the reference log-probs of full fine-tuning are stored in the same directory.
    `formats`, when given, counts the record shapes ("chat", "completion")."""
    f = resolve_split(path, split)
    entry = Path(cache_root()) / "datasets" / _cache_key(f, tok, {"kind": "pairs"}) if cache else None
    if entry is not None and (entry / "meta.json").exists():
        docs, masks, meta = _read_cache(entry)
        for k, n in meta["stats"].get("formats", {}).items() if formats is not None else ():
            formats[k] = formats.get(k, 0) + n
        return [Pair(docs[i], masks[i], docs[i + 1], masks[i + 1]) for i in range(0, len(docs), 2)], entry
    seen: dict[str, int] = {}
    pairs = tokenize_pairs_file(f, tok, progress, seen)
    if formats is not None:
        for k, n in seen.items():
            formats[k] = formats.get(k, 0) + n
    if entry is not None:
        docs = [a for p in pairs for a in (p.chosen, p.rejected)]
        masks = [a for p in pairs for a in (p.chosen_mask, p.rejected_mask)]
        _write_cache(entry, docs, masks, {"options": {"kind": "pairs"},
                                          "stats": {"file": str(f), "n_pairs": len(pairs), "formats": seen}})
    return pairs, entry


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) pair indices: a fixed, seeded fraction of the pairs held out (whole pairs)."""
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    order = np.random.default_rng([seed, 2**31 - 2]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def read_reference(entry: Path | None, key: str, n_pairs: int) -> np.ndarray | None:
    """The cached (P, 2) reference log-probs of `entry` for model key `key`, or None."""
    if entry is None:
        return None
    f = entry / f"reference-{key}.npy"
    if not f.exists():
        return None
    table = np.load(f, allow_pickle=False)
    return table if table.shape == (n_pairs, 2) else None


def write_reference(entry: Path | None, key: str, table: np.ndarray):
    """Store reference log-probs (P, 2) beside the tokenized pairs, atomically."""
    from .io import atomic_path

    if entry is None:
        return
    with atomic_path(entry / f"reference-{key}.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(table, np.float32), allow_pickle=False)


# ---- packing ---------------------------------------------------------------------------------------------
@dataclass
class PairRows:
    """Packed pairs: (rows, seq_len) arrays. Sequence 2k is pair k's chosen side, 2k + 1 its rejected.

    `reference` (P, 2): the reference model's summed completion log-probs [chosen, rejected] by pair id, when
    precomputed (full fine-tuning); None when the reference is evaluated in the step (adapters off)."""

    tokens: np.ndarray
    segment_ids: np.ndarray  # 1.. per sequence within a row, 0 = padding
    positions: np.ndarray  # restart at 0 per sequence
    targets: np.ndarray  # next token of the same segment
    weights: np.ndarray  # 1 where targets[t] is a completion token (DPO/ORPO log-probs)
    full_weights: np.ndarray  # 1 where targets[t] is any token of the sequence (ORPO's NLL)
    seq_index: np.ndarray  # global sequence id of position t (2k / 2k+1), -1 on padding
    pair_row: np.ndarray  # (P,) the row of each pair
    reference: np.ndarray | None = None

    def __len__(self):
        return self.tokens.shape[0]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_row)

    @property
    def max_pairs_per_row(self) -> int:
        return int(np.bincount(self.pair_row).max()) if self.n_pairs else 0

    @property
    def efficiency(self) -> float:
        return float((self.segment_ids > 0).mean()) if self.tokens.size else 0.0

    def pairs_in(self, rows) -> np.ndarray:
        """Sorted global pair ids of `rows` (each once)."""
        return np.flatnonzero(np.isin(self.pair_row, np.asarray(rows)))

    def pair_count(self, rows) -> int:
        """Pairs in `rows`, counting a row as often as it appears (a batch larger than the data repeats rows)."""
        return int(np.bincount(self.pair_row, minlength=len(self))[np.asarray(rows)].sum())

    def real_tokens(self, rows) -> int:
        return int((self.segment_ids[np.asarray(rows)] > 0).sum())

    def chosen_targets(self, rows) -> int:
        """Every target token of the chosen sequences of `rows` (ORPO's NLL denominator)."""
        rows = np.asarray(rows)
        chosen = (self.seq_index[rows] >= 0) & (self.seq_index[rows] % 2 == 0)
        return int((self.full_weights[rows] * chosen).sum())

    def take(self, rows, slots: int | None = None):
        """Arrays of `rows` with `seq_index` made local and the global pair ids, in local order:
        `(tokens, seg, pos, targets, weights, full_weights, local, pair_ids)`. Local sequence 2j / 2j + 1 are
        the chosen / rejected side of pair_ids[j] (row by row, ascending within a row; a repeated row repeats
        its pairs); padding is -1. `slots` (>= the pairs of these rows) fixes
        how many pair slots the caller's arrays have (static shapes under compilation)."""
        rows = np.asarray(rows)
        g = self.seq_index[rows]  # (B, L) global sequence ids
        local = np.full(g.shape, -1, np.int32)
        per_row = []
        for b in range(len(rows)):  # row by row, so a repeated row gets slots of its own
            real = g[b] >= 0
            present = np.unique(g[b][real] // 2)  # (p_b,) sorted pair ids of this row
            base = sum(len(x) for x in per_row)
            local[b, real] = 2 * (base + np.searchsorted(present, g[b][real] // 2)) + g[b][real] % 2
            per_row.append(present)
        pair_ids = np.concatenate(per_row) if per_row else np.zeros(0, np.int64)
        if slots is not None and slots < len(pair_ids):
            raise ValueError(f"{len(pair_ids)} pairs in these rows, more than {slots} slots")
        return (self.tokens[rows], self.segment_ids[rows], self.positions[rows], self.targets[rows],
                self.weights[rows], self.full_weights[rows], local, pair_ids)

    def subset_reference(self, pair_ids, slots: int) -> np.ndarray:
        """(2 * slots,) float32 reference log-probs of `pair_ids` in local order (chosen, rejected
        interleaved), zero-padded; requires `reference`."""
        out = np.zeros(2 * slots, np.float32)
        out[0:2 * len(pair_ids):2] = self.reference[pair_ids, 0]
        out[1:2 * len(pair_ids):2] = self.reference[pair_ids, 1]
        return out


def pack_pairs(pairs: list[Pair], seq_len: int, pad_id: int = 0) -> PairRows:
    """Pack pairs into rows of `seq_len` tokens, a pair's two sequences side by side (best-fit-decreasing
    on pair lengths). A pair longer than a row is an error naming it: DPO needs whole sequences."""
    for i, p in enumerate(pairs):
        if len(p) > seq_len:
            raise ValueError(f"pair {i} has {len(p)} tokens (chosen {len(p.chosen)} + rejected {len(p.rejected)}), "
                             f"more than seq_len {seq_len}: raise seq_len (a pair is packed whole into one row)")
    bins = best_fit_decreasing([len(p) for p in pairs], seq_len)
    R = len(bins)
    tokens = np.full((R, seq_len), pad_id, np.int32)
    seg, pos, mask, real = (np.zeros((R, seq_len), np.int32) for _ in range(4))
    seq = np.full((R, seq_len), -1, np.int32)
    pair_row = np.zeros(len(pairs), np.int64)
    for r, items in enumerate(bins):
        at, s = 0, 0
        for k in sorted(items):  # ascending pair id within a row: local order == global order
            pair_row[k] = r
            for side, (ids, m) in enumerate(((pairs[k].chosen, pairs[k].chosen_mask),
                                             (pairs[k].rejected, pairs[k].rejected_mask))):
                n = len(ids)
                s += 1
                tokens[r, at:at + n] = ids
                seg[r, at:at + n] = s
                pos[r, at:at + n] = np.arange(n)
                mask[r, at:at + n] = m
                real[r, at:at + n] = 1
                seq[r, at:at + n] = 2 * k + side
                at += n
    targets, weights = next_token_targets(tokens, seg, mask)
    _, full = next_token_targets(tokens, seg, real)
    return PairRows(tokens, seg, pos, targets, weights, full, seq, pair_row)
