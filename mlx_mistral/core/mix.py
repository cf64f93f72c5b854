"""Training data from one source or a weighted mix of several (the config's `datasets:` list).

A source is anything `data.load_dataset` reads: a local .jsonl / .parquet file, a dataset directory, or a
Hub dataset id (`owner/name[@revision]`). Each entry of a mix names its `path`, the `split` it trains on,
the `valid_split` that joins the validation set (when the source has it; null: none), a `revision`, a
`format` (jsonl / parquet, to read one format of a Hub repo) and a `weight`.

Weights act on documents, before packing: a source of weight w contributes every document floor(w) times
and a sample, without replacement, of round(frac(w) * n) more, drawn with the seed (seed, source index).
So `weight: 2` sees a source twice per epoch and `0.5` a seeded half of it; the mix is a pure function of
the sources and the seed, which is what keeps exact resume (the rows are rebuilt identically) and lets the
tokenized cache (per file) serve every run. Validation sets are joined unweighted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .data import MissingSplit, load_dataset
from .tokenizer import Tokenizer


def mix_indices(sizes: list[int], weights: list[float], seed: int = 0) -> list[np.ndarray]:
    """For each source (n documents, weight w), the indices of its documents in the mix: every index
    floor(w) times, then a sorted seeded sample of round(frac(w) * n) indices without replacement."""
    out = []
    for i, (n, w) in enumerate(zip(sizes, weights)):
        whole = int(np.floor(w))
        extra = int(round((w - whole) * n))
        sample = np.sort(np.random.default_rng([seed, i]).choice(n, size=extra, replace=False)) if extra else []
        out.append(np.concatenate([np.tile(np.arange(n), whole), np.asarray(sample, np.int64)]).astype(np.int64))
    return out


def _entry_split(entry: dict, split: str) -> str | None:
    return entry["split"] if split == "train" else entry["valid_split"] if split == "valid" else split


def load_split(data: str | list[dict], tok: Tokenizer, split: str = "train", loss_on: str = "default",
               seed: int = 0, progress: Callable[[int, int], None] | None = None):
    """`(docs, loss_masks, stats)` of one split of `data` (a path / Hub id, or a list of normalized
    `datasets` entries, see train_config.SOURCE_DEFAULTS), or None when no source has that split; the
    train split must exist (ValueError naming the source otherwise). `stats["sources"]` says, per
    source, what was read: path, split, commit (Hub), weight, documents read and used."""
    entries = [{"path": data, "split": "train", "valid_split": "valid", "revision": None, "weight": 1.0,
                "format": None}] if isinstance(data, str) else data
    docs, masks, sources, formats = [], [], [], {}
    loaded = []
    for e in entries:
        name = _entry_split(e, split)
        if name is None:
            continue
        path = f"{e['path']}@{e['revision']}" if e["revision"] else e["path"]
        if split != "train" and not isinstance(data, str) and Path(path).is_file():
            continue  # in a mix a single file is a train split only (it is every split when read alone)
        try:
            d, m, st = load_dataset(path, tok, name, loss_on=loss_on, progress=progress, fmt=e["format"])
        except MissingSplit:
            if split == "train":
                raise
            continue
        loaded.append((e, d, m, st))
    if not loaded:
        return None
    weights = [e["weight"] if split == "train" else 1.0 for e, *_ in loaded]
    picks = mix_indices([len(d) for _, d, _, _ in loaded], weights, seed)
    for (e, d, m, st), idx, w in zip(loaded, picks, weights):
        if len(idx) == 0:
            raise ValueError(f"datasets: source {e['path']} (split {_entry_split(e, split)}) has {len(d)} "
                             f"documents; weight {w:g} keeps none of them: raise its weight")
        docs += [d[i] for i in idx]
        masks += [m[i] for i in idx]
        for k, n in st["formats"].items():
            formats[k] = formats.get(k, 0) + n
        sources.append({"path": e["path"], "split": st["split"], "revision": st.get("revision", e["revision"]),
                        "format": e["format"], "weight": w, "n_docs": st["n_docs"], "n_used": int(len(idx)),
                        "cached": st["cached"]})
    stats = {"split": split, "sources": sources, "formats": formats, "n_docs": len(docs),
             "n_tokens": int(sum(len(x) for x in docs)), "n_loss_tokens": int(sum(int(x.sum()) for x in masks))}
    return docs, masks, stats

