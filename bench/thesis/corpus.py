"""The thesis corpus: real text available offline, split by package, tokenized by a real Mistral tokenizer.

Source: the `.py` files of the running interpreter's standard library (code, docstrings and comments),
tests and vendored grammars excluded. Every machine with Python has it, so the experiment needs no
download; its content hash is recorded with the results, because another Python version is another
corpus.

Split (deterministic, by `split_seed`): whole top-level packages/modules are assigned to pre-training or
held apart, so the fine-tuning text is text the base never saw, from packages it never saw. From the
held-apart packages, documents of `min_len..max_len` tokens (several windows long) are the fine-tuning
set, and a fixed handful of them, chosen by file, the evaluation set.

Vocabulary: documents are encoded with Mistral 7B v0.1's SentencePiece tokenizer (BOS + text + EOS), then
remapped to the `vocab_size - 3` ids most frequent in the pre-training set plus unk/BOS/EOS (new ids 0/1/2,
as in Mistral's own tokenizer). Why: at hidden size 256 a 32000-row embedding and LM head would be most of
the parameters and most of the compute (the head alone ~2.5x the four layers); 8192 ids cover ~98% of the
held-apart tokens (the coverage is measured and reported). The token boundaries are Mistral's; only rare
ids collapse to unk.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_mistral.core.io import atomic_path, write_json
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
             "ensurepip", "_vendor"}
UNK, BOS, EOS = 0, 1, 2  # new ids; the same as Mistral's SentencePiece ids


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files (tests, vendored and bundled packages excluded), sorted."""
    root = Path(root or stdlib_root())
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def package_of(rel: str) -> str:
    """Top-level package or module of a relative path: `email/mime/text.py` -> `email`."""
    first = rel.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


def unit_hash(name: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for `name` under `seed` (independent of Python's hash)."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def build_vocab(counts: np.ndarray, size: int) -> np.ndarray:
    """Old ids of the reduced vocabulary: [unk, bos, eos, then the `size - 3` most frequent other ids]
    (ties broken by the lower id). `counts[i]` is the frequency of old id i."""
    if size < 4 or size > len(counts):
        raise ValueError(f"vocab_size must be in 4..{len(counts)}, got {size}")
    counts = np.asarray(counts, np.int64).copy()
    counts[[UNK, BOS, EOS]] = -1  # placed first, explicitly
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count desc, then id asc
    return np.concatenate([[UNK, BOS, EOS], order[:size - 3]]).astype(np.int64)


def remap_table(old_ids: np.ndarray, old_vocab: int) -> np.ndarray:
    """Lookup table old id -> new id (unknown -> UNK)."""
    lut = np.full(old_vocab, UNK, np.int32)
    lut[old_ids] = np.arange(len(old_ids), dtype=np.int32)
    return lut


@dataclass
class Corpus:
    """Remapped documents of the three sets, with what they are made of."""

    pretrain: list[np.ndarray]
    finetune: list[np.ndarray]
    eval: list[np.ndarray]
    names: dict  # set -> list of relative paths
    vocab: np.ndarray  # old (Mistral) id of each new id
    info: dict

    def decode(self, tok: Tokenizer, ids) -> str:
        """Text of new ids through the Mistral tokenizer (unk shows as ⁇)."""
        return tok.decode(self.vocab[np.asarray(ids)].tolist())


def _content_hash(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _tokenize(files: list[Path], tok: Tokenizer, cache: Path, key: str):
    """Mistral ids of every file (BOS + text + EOS), cached as one .npz keyed by content and tokenizer."""
    path = cache / f"corpus-{key}.npz"
    if path.exists():
        z = np.load(path)
        flat, lengths = z["tokens"], z["lengths"]
    else:
        docs = [np.asarray(tok.encode(p.read_text(encoding="utf-8", errors="replace"), bos=True, eos=True),
                           np.int32) for p in files]
        flat = np.concatenate(docs)
        lengths = np.array([len(d) for d in docs], np.int64)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, tokens=flat, lengths=lengths)
    return np.split(flat, np.cumsum(lengths)[:-1])


def build_corpus(cache_dir: str | Path, *, vocab_size: int = 8192, heldout_fraction: float = 0.3,
                 min_len: int = 1024, max_len: int = 4096, n_eval: int = 12, eval_fraction: float = 0.3,
                 split_seed: int = 0, max_files: int = 0, root: str | Path | None = None,
                 tokenizer: str = "tokenizer.model.v1") -> Corpus:
    """Read, tokenize (cached), split and remap the corpus (see the module doc).

    `max_files` > 0 keeps a fixed pseudo-random subset of that many files (the miniature run).
    """
    root = Path(root or stdlib_root())
    files = source_files(root)
    if not files:
        raise ValueError(f"no .py files under {root}: cannot build the corpus")
    rel = [p.relative_to(root).as_posix() for p in files]
    if max_files:
        keep = sorted(sorted(range(len(files)), key=lambda i: unit_hash(rel[i], split_seed))[:max_files])
        files, rel = [files[i] for i in keep], [rel[i] for i in keep]
    tok = Tokenizer(bundled_tokenizer_path(tokenizer))
    cache = Path(cache_dir)
    content = _content_hash(files, root)
    tok_hash = hashlib.sha256(tok.path.read_bytes()).hexdigest()[:16]
    docs = _tokenize(files, tok, cache, f"{content}-{tok_hash}")

    held = [unit_hash(package_of(r), split_seed) < heldout_fraction for r in rel]
    pre = [i for i in range(len(rel)) if not held[i]]
    long_held = [i for i in range(len(rel)) if held[i] and min_len <= len(docs[i]) <= max_len]
    by_draw = sorted(long_held, key=lambda i: unit_hash("eval:" + rel[i], split_seed))
    ev = sorted(by_draw[:min(n_eval, max(1, round(eval_fraction * len(long_held))))])
    ft = [i for i in long_held if i not in set(ev)]
    if len(ev) < 2 or len(ft) < 2 or len(pre) < 2:
        raise ValueError(f"corpus split too small (pre-training {len(pre)}, fine-tuning {len(ft)}, eval {len(ev)} "
                         f"documents of {len(files)} files): raise max_files or heldout_fraction, or widen "
                         f"min_len..max_len ({min_len}..{max_len})")

    counts = np.bincount(np.concatenate([docs[i] for i in pre]), minlength=tok.vocab_size)
    vocab = build_vocab(counts, vocab_size)
    lut = remap_table(vocab, tok.vocab_size)

    def remap(idx):
        return [lut[docs[i]] for i in idx]

    sets = {"pretrain": remap(pre), "finetune": remap(ft), "eval": remap(ev)}
    info = {"source": f"Python {platform.python_version()} standard library ({root})",
            "files": len(files), "content_hash": content, "tokenizer": tokenizer, "tokenizer_hash": tok_hash,
            "vocab_size": vocab_size, "split_seed": split_seed, "heldout_fraction": heldout_fraction,
            "min_len": min_len, "max_len": max_len,
            "heldout_packages": sorted({package_of(rel[i]) for i in range(len(rel)) if held[i]})}
    for name, ds in sets.items():
        n = np.array([len(d) for d in ds])
        unk = sum(int((d == UNK).sum()) for d in ds)
        info[name] = {"docs": len(ds), "tokens": int(n.sum()), "min_len": int(n.min()),
                      "median_len": float(np.median(n)), "max_len": int(n.max()),
                      "unk_rate": unk / max(int(n.sum()), 1)}
    names = {"pretrain": [rel[i] for i in pre], "finetune": [rel[i] for i in ft], "eval": [rel[i] for i in ev]}
    return Corpus(sets["pretrain"], sets["finetune"], sets["eval"], names, vocab, info)


def save_vocab(path: str | Path, corpus: Corpus):
    """`vocab.json`: the Mistral id of every model id, so the model's outputs can be decoded."""
    write_json(path, {"tokenizer": corpus.info["tokenizer"], "tokenizer_hash": corpus.info["tokenizer_hash"],
                      "mistral_ids": corpus.vocab.tolist()}, indent=None)
