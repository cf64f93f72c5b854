"""Datasets: JSONL files -> tokenized documents with loss masks, cached on disk.

One JSON object per line, in any of three shapes (a file may mix them):
- `{"text": ...}`: `<s>text</s>`, loss on every token.
- `{"prompt": ..., "completion": ...}`: `<s>prompt completion</s>`, loss on the completion and its EOS
  (or on everything with `loss_on="all"`).
- `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`: the tokenizer's Mistral
  instruct format (see chat.py), loss on the assistant turns and their EOS by default.
A dataset is a file or a directory holding `train.jsonl`, `valid.jsonl` and optionally `test.jsonl`, or a
Hugging Face Hub dataset id `owner/name[@revision]` whose split's JSONL or Parquet files are fetched with
`huggingface_hub` (see core/hub.py for how files are matched to splits; Parquet needs `pyarrow`, the
`parquet` extra). Parquet rows are records with the same keys as the JSONL objects.
A bad line is a `ValueError` naming the file, the line and what was expected, unless `skip_invalid`.

Tokenized datasets are cached under `$MLX_MISTRAL_CACHE` (default `~/.cache/mlx-mistral/`), keyed by
the hashes of the data file and the tokenizer file and the format options; a second load reads three
.npy arrays and a JSON file instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from . import chat
from .hub import SPLIT_ALIASES, dataset_snapshot, dataset_split_files, is_dataset_id
from .io import atomic_path, write_json
from .tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"  # a bundled chat dataset (tests, README examples)
# What `make demo` trains on: pretrain/ and tagged/ datasets and their 4k-piece tokenizer (bench/make_tag_demo_data.py)
DEMO_TAGS = Path(__file__).resolve().parents[1] / "data" / "demo_tags"
LOSS_ON = ("default", "all", "last")  # default: assistant turns / the completion / all of a text
CACHE_VERSION = 1
_SHAPES = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}'


class MissingSplit(ValueError):
    """A dataset that exists but has no file for the split asked."""


def cache_root() -> Path:
    """Where tokenized datasets are cached: `$MLX_MISTRAL_CACHE` or `~/.cache/mlx-mistral`."""
    return Path(os.environ.get("MLX_MISTRAL_CACHE") or Path.home() / ".cache" / "mlx-mistral")


def resolve_split(path: str | Path, split: str = "train") -> Path:
    """The JSONL file of `split`: `path` itself if it is a file, else `path/{split}.jsonl` (for a Hub dataset
    id: the split's first data file; `split_files` gives them all). ValueError when there is none."""
    p = Path(path)
    if p.is_file():
        return p
    if is_dataset_id(path):
        return split_files(path, split)[0]
    if not p.exists():
        raise ValueError(f"dataset {p} does not exist (expected a .jsonl file or a directory with "
                         f"{', '.join(s + '.jsonl' for s in SPLITS)})")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    f = p / f"{split}.jsonl"
    if not f.is_file():
        have = ", ".join(sorted(x.name for x in p.glob("*.jsonl"))) or "no .jsonl files"
        raise MissingSplit(f"dataset directory {p} has no {split}.jsonl (it has {have})")
    return f


def split_files(path: str | Path, split: str = "train", fmt: str | None = None) -> list[Path]:
    """Every data file of `split`: one local file (`resolve_split`), or a Hub dataset's JSONL / Parquet files
    of that split (`fmt` keeps one format). ValueError naming the splits there are when it has none."""
    if not is_dataset_id(path):
        return [resolve_split(path, split)]
    root = dataset_snapshot(str(path))
    files = dataset_split_files(root, split, fmt)
    if not files:
        have = [x for x in SPLIT_ALIASES if dataset_split_files(root, x, fmt)]
        found = ", ".join(str(f.relative_to(root)) for f in sorted(root.rglob("*")) if f.is_file()) or "none"
        raise MissingSplit(f"dataset {path} has no {fmt + ' ' if fmt else ''}files for split {split!r} (splits "
                         f"found: {', '.join(have) or 'none'}; data files: {found}). Name the split's files "
                         f"{split}*.jsonl / {split}*.parquet, or choose another split.")
    return files


def encode_record(tok: Tokenizer, rec, loss_on: str = "default"):
    """(tokens, loss_mask) of one parsed JSONL record; `ValueError` saying what is wrong with it."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object ({_SHAPES}), got {type(rec).__name__}")
    if "messages" in rec:
        return chat.encode_chat(tok, rec["messages"], loss_on={"default": "assistant"}.get(loss_on, loss_on))
    if "prompt" in rec or "completion" in rec:
        for k in ("prompt", "completion"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"'{k}' must be a string (a prompt/completion record needs both)")
        if not rec["completion"].strip():
            raise ValueError("'completion' is empty: there is nothing to learn from")
        return chat.encode_completion(tok, rec["prompt"], rec["completion"],
                                      loss_on="all" if loss_on == "all" else "completion")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError("'text' must be a non-empty string")
        ids = np.asarray(tok.encode(rec["text"], bos=True, eos=True), np.int32)
        return ids, np.ones(len(ids), np.int32)
    raise ValueError(f"expected one of {_SHAPES}; found keys {sorted(rec)[:8]}")


def _kind(rec) -> str:
    return "chat" if "messages" in rec else "completion" if "prompt" in rec or "completion" in rec else "text"


def _jsonl_records(path: Path, progress, shapes: str = _SHAPES):
    """(line number, record or a ValueError) of every non-blank line; progress in bytes."""
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            done += len(raw)
            if progress is not None and (lineno % 256 == 0 or done == total):
                progress(done, total)
            line = raw.strip()
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield lineno, ValueError(f"malformed JSON ({e.msg if hasattr(e, 'msg') else e}); expected one "
                                         f"JSON object per line: {shapes}")


def encode_jsonl(path: Path, encode: Callable, shapes: str = _SHAPES, skip_invalid: bool = False,
                 progress: Callable[[int, int], None] | None = None):
    """`[(record, encode(record)), ...]` for every non-empty line of a JSONL file, and `info` ("skipped",
    "errors"). A malformed line or a ValueError of `encode` becomes `file:line: message` (raised, or
    counted with `skip_invalid`). `progress(bytes_done, bytes_total)`. (Preference pairs: core/pairs.py.)"""
    out = []
    info = {"skipped": 0, "errors": []}
    for lineno, rec in _jsonl_records(path, progress, shapes):
        try:
            if isinstance(rec, ValueError):
                raise rec
            out.append((rec, encode(rec)))
        except ValueError as e:
            msg = f"{path}:{lineno}: {e}"
            if not skip_invalid:
                raise ValueError(msg) from None
            info["skipped"] += 1
            if len(info["errors"]) < 10:
                info["errors"].append(msg)
    return out, info


def _parquet_records(path: Path, progress):
    """("row N", record) of every row of a Parquet file (columns text / prompt, completion / messages);
    progress in rows."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet files needs pyarrow: pip install 'mlx-mistral[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
        total, row = pf.metadata.num_rows, 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1  # a column a row does not use (a mixed-shape file) reads as null: leave it out
                yield f"row {row}", {k: v for k, v in rec.items() if v is not None}
            if progress is not None:
                progress(row, total)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; ArrowIOError an OSError
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from None


def tokenize_file(path: Path, tok: Tokenizer, loss_on: str = "default", skip_invalid: bool = False,
                  progress: Callable[[int, int], None] | None = None):
    """Tokenize every record of a JSONL (one object a line) or Parquet (one a row) file: (docs, loss_masks,
    info). `progress(done, total)` in bytes (JSONL) or rows (Parquet)."""
    docs, masks = [], []
    info = {"formats": {}, "skipped": 0, "errors": []}
    records = _parquet_records if path.suffix == ".parquet" else _jsonl_records
    for lineno, rec in records(path, progress):
        try:
            if isinstance(rec, ValueError):
                raise rec
            ids, mask = encode_record(tok, rec, loss_on)
        except ValueError as e:
            msg = f"{path}:{lineno}: {e}"
            if not skip_invalid:
                raise ValueError(msg) from None
            info["skipped"] += 1
            if len(info["errors"]) < 10:
                info["errors"].append(msg)
            continue
        k = _kind(rec)
        info["formats"][k] = info["formats"].get(k, 0) + 1
        docs.append(ids)
        masks.append(mask)
    return docs, masks, info


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_key(data_file: Path, tok: Tokenizer, options: dict) -> str:
    key = json.dumps({"data": file_hash(data_file), "tokenizer": file_hash(tok.path), "options": options,
                      "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _write_cache(d: Path, docs, masks, meta: dict):
    lengths = np.array([len(x) for x in docs], np.int64)
    arrays = {"tokens": np.concatenate(docs) if docs else np.zeros(0, np.int32),
              "loss_mask": np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8),
              "lengths": lengths}
    for name, a in arrays.items():
        with atomic_path(d / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, a, allow_pickle=False)
    write_json(d / "meta.json", meta)  # written last: its presence marks a complete entry


def _read_cache(d: Path):
    meta = json.loads((d / "meta.json").read_text())
    tokens, loss, lengths = (np.load(d / f"{n}.npy", allow_pickle=False) for n in ("tokens", "loss_mask", "lengths"))
    cuts = np.cumsum(lengths)[:-1]
    return np.split(tokens, cuts), [m.astype(np.int32) for m in np.split(loss, cuts)], meta


def load_dataset(path: str | Path, tokenizer: Tokenizer, split: str = "train", loss_on: str = "default",
                 skip_invalid: bool = False, cache: bool = True, cache_dir: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None, fmt: str | None = None):
    """Tokenized documents of one split: `(docs, loss_masks, stats)`.

    `path`: a .jsonl / .parquet file, a dataset directory, or a Hub dataset id `owner/name[@revision]`
    (`fmt` "jsonl" / "parquet" keeps that format of its files). `docs` are int32 arrays, each with its own
    BOS and EOS; `loss_masks` 0/1 int32 arrays of the same lengths. `stats` holds the file(s), document /
    token counts, the formats seen, skipped lines, whether the cache was hit (each file is cached on its
    own) and, for a Hub dataset, the commit read. `progress(done, total)` is called while tokenizing.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    files = split_files(path, split, fmt)
    parts = [_load_file(f, tokenizer, split, loss_on, skip_invalid, cache, cache_dir, progress) for f in files]
    if len(parts) == 1:
        docs, masks, stats = parts[0]
    else:
        docs = [d for p in parts for d in p[0]]
        masks = [m for p in parts for m in p[1]]
        each = [p[2] for p in parts]
        formats: dict[str, int] = {}
        for st in each:
            for k, n in st["formats"].items():
                formats[k] = formats.get(k, 0) + n
        stats = {"file": f"{path} ({len(files)} {split} files)", "files": [str(f) for f in files], "split": split,
                 "tokenizer": tokenizer.path.name, "formats": formats,
                 **{k: sum(st[k] for st in each) for k in ("n_docs", "n_tokens", "n_loss_tokens", "skipped")},
                 "errors": [e for st in each for e in st["errors"]][:10], "cached": all(st["cached"] for st in each),
                 "cache_path": [st["cache_path"] for st in each]}
    if is_dataset_id(path):
        snap = files[0].parts
        stats = dict(stats, dataset=str(path), revision=snap[snap.index("snapshots") + 1])
    return docs, masks, stats


def _load_file(f: Path, tokenizer: Tokenizer, split: str, loss_on: str, skip_invalid: bool, cache: bool,
               cache_dir, progress):
    """`load_dataset` of one data file, through the on-disk cache."""
    options = {"loss_on": loss_on, "skip_invalid": skip_invalid}
    entry = None
    if cache:
        entry = Path(cache_dir or cache_root()) / "datasets" / _cache_key(f, tokenizer, options)
        if (entry / "meta.json").exists():
            docs, masks, meta = _read_cache(entry)
            return docs, masks, dict(meta["stats"], cached=True, cache_path=str(entry))
    docs, masks, info = tokenize_file(f, tokenizer, loss_on, skip_invalid, progress)
    if not docs:
        raise ValueError(f"{f}: no documents (the file is empty{' or every line was invalid' if skip_invalid else ''})")
    stats = {"file": str(f), "split": split, "tokenizer": tokenizer.path.name, "n_docs": len(docs),
             "n_tokens": int(sum(len(d) for d in docs)), "n_loss_tokens": int(sum(int(m.sum()) for m in masks)),
             **info}
    if entry is not None:
        _write_cache(entry, docs, masks, {"options": options, "stats": stats})
    return docs, masks, dict(stats, cached=False, cache_path=str(entry) if entry else None)
