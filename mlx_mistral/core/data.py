"""Datasets: JSONL files -> tokenized documents with loss masks, cached on disk.

One JSON object per line, in any of three shapes (a file may mix them):
- `{"text": ...}`: `<s>text</s>`, loss on every token.
- `{"prompt": ..., "completion": ...}`: `<s>prompt completion</s>`, loss on the completion and its EOS
  (or on everything with `loss_on="all"`).
- `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`: the tokenizer's Mistral
  instruct format (see chat.py), loss on the assistant turns and their EOS by default.
A dataset is a file or a directory holding `train.jsonl`, `valid.jsonl` and optionally `test.jsonl`.
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
from .io import atomic_path, write_json
from .tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"  # a bundled chat dataset (tests, README examples)
# What `make demo` trains on: pretrain/ and tagged/ datasets and their 4k-piece tokenizer (bench/make_tag_demo_data.py)
DEMO_TAGS = Path(__file__).resolve().parents[1] / "data" / "demo_tags"
LOSS_ON = ("default", "all", "last")  # default: assistant turns / the completion / all of a text
CACHE_VERSION = 1
_SHAPES = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}'


def cache_root() -> Path:
    """Where tokenized datasets are cached: `$MLX_MISTRAL_CACHE` or `~/.cache/mlx-mistral`."""
    return Path(os.environ.get("MLX_MISTRAL_CACHE") or Path.home() / ".cache" / "mlx-mistral")


def resolve_split(path: str | Path, split: str = "train") -> Path:
    """The JSONL file of `split`: `path` itself if it is a file, else `path/{split}.jsonl`."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise ValueError(f"dataset {p} does not exist (expected a .jsonl file or a directory with "
                         f"{', '.join(s + '.jsonl' for s in SPLITS)})")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    f = p / f"{split}.jsonl"
    if not f.is_file():
        have = ", ".join(sorted(x.name for x in p.glob("*.jsonl"))) or "no .jsonl files"
        raise ValueError(f"dataset directory {p} has no {split}.jsonl (it has {have})")
    return f


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


def encode_jsonl(path: Path, encode: Callable, shapes: str = _SHAPES, skip_invalid: bool = False,
                 progress: Callable[[int, int], None] | None = None):
    """`[(record, encode(record)), ...]` for every non-empty line of a JSONL file, and `info` ("skipped",
    "errors"). A malformed line or a ValueError of `encode` becomes `file:line: message` (raised, or
    counted with `skip_invalid`). `progress(bytes_done, bytes_total)`."""
    out = []
    info = {"skipped": 0, "errors": []}
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
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"malformed JSON ({e.msg if hasattr(e, 'msg') else e}); expected one "
                                     f"JSON object per line: {shapes}") from None
                out.append((rec, encode(rec)))
            except ValueError as e:
                msg = f"{path}:{lineno}: {e}"
                if not skip_invalid:
                    raise ValueError(msg) from None
                info["skipped"] += 1
                if len(info["errors"]) < 10:
                    info["errors"].append(msg)
    if progress is not None:
        progress(total, total)
    return out, info


def tokenize_file(path: Path, tok: Tokenizer, loss_on: str = "default", skip_invalid: bool = False,
                  progress: Callable[[int, int], None] | None = None):
    """Tokenize every line of a JSONL file: (docs, loss_masks, info). `progress(bytes_done, bytes_total)`."""
    encoded, info = encode_jsonl(path, lambda rec: encode_record(tok, rec, loss_on), _SHAPES, skip_invalid,
                                 progress)
    info = {"formats": {}, **info}
    for rec, _ in encoded:
        k = _kind(rec)
        info["formats"][k] = info["formats"].get(k, 0) + 1
    return [ids for _, (ids, _) in encoded], [mask for _, (_, mask) in encoded], info


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
                 progress: Callable[[int, int], None] | None = None):
    """Tokenized documents of one split: `(docs, loss_masks, stats)`.

    `docs` are int32 arrays, each with its own BOS and EOS; `loss_masks` 0/1 int32 arrays of the same
    lengths. `stats` holds the file, document/token counts, the formats seen, skipped lines and whether
    the cache was hit. `progress(bytes_done, bytes_total)` is called while tokenizing (not on a hit).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    f = resolve_split(path, split)
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
