"""Synthetic long documents for long-row tests and benchmarks: a `{"text": ...}` JSONL whose documents have
exact token lengths (BOS and EOS included), e.g. 2k to 40k tokens, where the bundled demo data holds ~14k
tokens in all and no document longer than 200.

    python bench/make_long_docs.py OUT_DIR --tokenizer PATH [--docs 8] [--min 2048] [--max 40960] [--seed 0]

The words are those of the bundled demo data (mlx_mistral/data/demo) that the tokenizer encodes as exactly
one piece, drawn with a seeded numpy generator; SentencePiece splits on spaces, so a text of n such words
is n tokens. Lengths are log-uniform between --min and --max, and the longest is always --max. The script
tokenizes what it wrote and fails if a length differs from the planned one.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from mlx_mistral.core.data import load_dataset
from mlx_mistral.core.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "mlx_mistral" / "data" / "demo" / "train.jsonl"


def one_token_words(tok: Tokenizer) -> list[str]:
    """Lower-case words of the demo data that `tok` encodes as one piece, sorted (deterministic)."""
    text = " ".join(m["content"] for line in DEMO.read_text().splitlines() for m in json.loads(line)["messages"])
    words = sorted({w for w in re.findall(r"[a-z]{2,}", text)})
    words = [w for w in words if len(tok.encode(w, bos=False)) == 1]
    if len(words) < 20:
        raise ValueError(f"{tok.path}: only {len(words)} words of {DEMO} are one token each; need 20 or more")
    return words


def long_doc_lengths(n: int, lo: int = 2048, hi: int = 40960, seed: int = 0) -> list[int]:
    """`n` document lengths in tokens, log-uniform in [lo, hi], the first exactly `hi`."""
    if not 3 <= lo <= hi:
        raise ValueError(f"need 3 <= --min <= --max, got {lo} and {hi}")
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int).clip(lo, hi).tolist()
    return ([hi] + lengths[1:]) if n else []


def write_long_docs(out: str | Path, tokenizer: str | Path, lengths, seed: int = 0, split: str = "train") -> Path:
    """Write `out/{split}.jsonl` with one text document per length (in tokens with BOS and EOS) and check
    the lengths by tokenizing it as training does; returns the file."""
    tok = Tokenizer(tokenizer)
    words = np.array(one_token_words(tok))
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for k in lengths:
            f.write(json.dumps({"text": " ".join(words[rng.integers(0, len(words), k - 2)])}) + "\n")
    tmp.replace(path)
    docs, _, _ = load_dataset(out, tok, split, cache=False)
    got = [len(d) for d in docs]
    if got != list(lengths):
        raise RuntimeError(f"{path}: tokenized lengths {got[:4]} differ from the planned {list(lengths)[:4]}")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.model file (e.g. a tiny model's)")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--min", type=int, default=2048)
    ap.add_argument("--max", type=int, default=40960)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    lengths = long_doc_lengths(a.docs, a.min, a.max, a.seed)
    path = write_long_docs(a.out, a.tokenizer, lengths, a.seed)
    print(f"{path}: {len(lengths)} documents, {sum(lengths):,} tokens, {min(lengths):,} to {max(lengths):,} each")


if __name__ == "__main__":
    main()
