"""Build the data and the tokenizer of `make demo`: `mlx_mistral/data/demo_tags/` (deterministic for a Python).

    python bench/make_tag_demo_data.py          # rewrites the bundled files; the committed ones: CPython 3.11.7
    python bench/make_tag_demo_data.py --out DIR [--modules 60] [--per-module 10] [--vocab 4096] [--seed 0]

Items: (module, public function or class, first sentence of its docstring), read with `ast` from the
top-level modules and packages of the running Python's standard library (nothing is imported or executed);
the 60 modules with the most such items, up to 10 items each. Per module about a fifth of the items (at
least one) are held out: they are in no training data, and `tagged/test.jsonl` asks about them.

It writes (`{"messages": [...]}` records, one question template drawn per record from TEMPLATES, so where
the module stands in the question varies):
- `pretrain/{train,valid,test}.jsonl`: plain Q/A for pre-training the tiny base (configs/tiny-pretrain.yaml).
  The answers restate what was asked: "What does `json.dumps()` do?" -> "`json.dumps`: Serialize ...", so
  the base learns to copy names out of the question; module questions ("What does the Python `json`
  module do?"), half of them followed by "Which functions does it provide?".
- `tagged/{train,valid,test}.jsonl`: the same questions with every answer prefixed by the module asked
  about, in brackets ("[json] Serialize ..."): the behaviour the LoRA fine-tune (configs/tiny-demo.yaml)
  teaches and `recipes/demo_check.py` checks. `tagged/unseen.jsonl`: 40 questions about 20 further modules
  that are in no training data (the demo reports them as the limit of what it learnt).
- `tokenizer.model`: a 4096-piece cut of Mistral's v1 SentencePiece tokenizer (from the mistral-common
  wheel): its control and 256 byte-fallback pieces, every piece the train and valid splits use together
  with the pieces BPE forms them from (closed under the merges), then the best-ranked remaining pieces.
  Pieces keep their order, scores and types, so the bundled data tokenizes to the same pieces as under
  the full tokenizer (tests/cli/test_demo.py checks it), and text outside it falls back to bytes. A
  4k vocabulary instead of 32k is what lets a 1.8M-parameter model learn in minutes.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import stdlib_trees  # noqa: E402  (the same reading of the standard library)

OUT = Path(__file__).resolve().parents[1] / "mlx_mistral" / "data" / "demo_tags"
TEMPLATES = [
    "What does `{m}.{f}()` do?",
    "Explain `{m}.{f}()` in one sentence.",
    "In the `{m}` module, what is `{f}` for?",
    "What is `{m}.{f}` used for?",
    "Briefly, what does `{f}` in `{m}` do?",
]
MODULE_Q = "What does the Python `{m}` module do?"
LIST_Q = "Which functions does it provide?"
SKIP = {"antigravity", "this", "__future__", "__hello__", "__phello__", "idlelib", "lib2to3", "test", "tkinter",
        "turtledemo", "ensurepip", "venv", "pydoc_data", "site-packages"}
N_UNSEEN = 20  # modules after the chosen ones: questions about them are in tagged/unseen.jsonl only


def first_sentence(doc: str | None, limit: int = 160) -> str | None:
    """The first sentence of a docstring's first paragraph, or None (too short or long, a code example, or
    backticks, which would make the question templates ambiguous)."""
    if not doc:
        return None
    para = re.sub(r"\s+", " ", doc.strip().split("\n\n")[0]).strip()
    if para.startswith((">>>", "$", "usage:", "Usage:")):
        return None
    s = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0]
    if len(s) < 20 or len(s) > limit or "`" in s:
        return None
    return s


def stdlib_items():
    """[(module, module sentence or None, [(public name, sentence)])] of the top-level stdlib, by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(f.stem, f) for f in root.glob("*.py")] + [(d.name, d / "__init__.py") for d in root.iterdir()
                                                          if (d / "__init__.py").exists()]
    out = []
    for name, tree in stdlib_trees(files, SKIP):
        items = [(n.name, s) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                 and not n.name.startswith("_") and (s := first_sentence(ast.get_docstring(n)))]
        out.append((name, first_sentence(ast.get_docstring(tree)), items))
    return out


def build(n_modules: int = 60, per_module: int = 10, min_items: int = 4, seed: int = 0, holdout: float = 0.2,
          list_turn: float = 0.5) -> tuple[dict, list[str]]:
    """({"pretrain": {split: records}, "tagged": {split: records}}, the chosen modules)."""
    rng = random.Random(seed)
    mods = [m for m in stdlib_items() if len(m[2]) >= min_items]
    mods.sort(key=lambda m: (-len(m[2]), m[0]))
    unseen_mods = sorted(mods[n_modules:n_modules + N_UNSEEN], key=lambda m: m[0])
    mods = sorted(mods[:n_modules], key=lambda m: m[0])
    split = {"train": [], "valid": [], "test": []}  # (module, item name, sentence)
    modq = []  # (module, module sentence, the names its train items use)
    for name, mdoc, items in mods:
        items = list(items)
        rng.shuffle(items)
        items = items[:per_module]
        k = max(1, round(holdout * len(items)))
        with_valid = len(items) - k > 3
        split["test"] += [(name, *it) for it in items[:k]]
        split["valid"] += [(name, *it) for it in items[k:k + 1]] if with_valid else []
        train = items[k + with_valid:]
        split["train"] += [(name, *it) for it in train]
        if mdoc:
            modq.append((name, mdoc, [n for n, _ in train]))

    def qa(m, f, s, tag):
        q = rng.choice(TEMPLATES).format(m=m, f=f)
        a = f"[{m}] {s}" if tag else f"`{m}.{f}`: {s}"  # untagged answers restate what was asked
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    def modqa(m, mdoc, names, tag):
        pre = f"[{m}] " if tag else ""
        msgs = [{"role": "user", "content": MODULE_Q.format(m=m)}, {"role": "assistant", "content": pre + mdoc}]
        if names and rng.random() < list_turn:
            shown = ", ".join(f"`{n}()`" for n in sorted(names)[:4])
            msgs += [{"role": "user", "content": LIST_Q},
                     {"role": "assistant", "content": pre + f"Among others, `{m}` provides {shown}."}]
        return msgs

    unseen = [(name, *it) for name, _, items in unseen_mods for it in items[:2]]
    data = {}
    for tag, kind in ((False, "pretrain"), (True, "tagged")):
        d = {"train": [qa(*x, tag) for x in split["train"]] + [modqa(*x, tag) for x in modq],
             "valid": [qa(*x, tag) for x in split["valid"]],
             "test": [qa(*x, tag) for x in split["test"]]}
        rng.shuffle(d["train"])
        if tag:
            d["unseen"] = [qa(*x, tag) for x in unseen]
        data[kind] = d
    return data, [m[0] for m in mods]


# ---- a smaller vocabulary cut from Mistral's -------------------------------------------------------------------------
def bpe_pieces(text: str, scores: dict[str, float]) -> set[str]:
    """Every symbol SentencePiece-BPE creates while merging `text` (a piece) up from its characters (the
    best-scored adjacent pair first): what a cut vocabulary must keep for `text` to still be formed."""
    syms = list(text)
    made = set(syms)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            s = scores.get(syms[i] + syms[i + 1])
            if s is not None and (best is None or s > best):
                best, at = s, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
        made.add(syms[at])
    return made


def trim_tokenizer(src: Path, used_ids, size: int) -> tuple[bytes, int]:
    """(serialized SentencePiece model, pieces the data needs) holding `src`'s control and byte pieces, the
    pieces `used_ids` (ids under `src`) name with every piece BPE forms them from, then the best-ranked
    remaining pieces whose merges are kept, up to `size`. Pieces keep their order, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(src.read_bytes())
    normal = 1  # ModelProto.SentencePiece.Type.NORMAL
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    scores = {p: s for p, s, t in pieces if t == normal}
    index = {p: i for i, (p, _, _) in enumerate(pieces)}
    keep = {i for i, (_, _, t) in enumerate(pieces) if t != normal}  # unk, bos, eos, byte pieces
    for i in sorted(set(int(i) for i in used_ids)):
        if pieces[i][2] == normal:
            keep |= {index[p] for p in bpe_pieces(pieces[i][0], scores) if p in index}
    needed = len(keep)
    if size < needed:
        raise ValueError(f"--vocab {size} is smaller than the {needed} pieces the data needs")
    kept = {pieces[i][0] for i in keep}
    for i, (p, _, t) in enumerate(pieces):  # best rank first
        if len(keep) >= size:
            break
        if i not in keep and t == normal and bpe_pieces(p, scores) <= kept | {p}:
            keep.add(i)
            kept.add(p)
    new = pb.ModelProto()
    new.CopyFrom(m)
    del new.pieces[:]
    for i in sorted(keep):
        new.pieces.append(m.pieces[i])
    return new.SerializeToString(), needed


def write(out: Path, data: dict, vocab: int) -> dict:
    """Write the datasets and the cut tokenizer under `out`; returns {"pieces", "needed"}."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlx_mistral.core.chat import encode_chat
    from mlx_mistral.core.io import atomic_path
    from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

    for kind, d in data.items():
        (out / kind).mkdir(parents=True, exist_ok=True)
        for s, recs in d.items():
            text = "".join(json.dumps({"messages": r}, ensure_ascii=False) + "\n" for r in recs)
            with atomic_path(out / kind / f"{s}.jsonl") as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
    src = bundled_tokenizer_path("tokenizer.model.v1")
    full = Tokenizer(src)
    used = [i for kind in data for s in ("train", "valid") for r in data[kind][s]
            for i in encode_chat(full, r, version="v1")[0]]
    model, needed = trim_tokenizer(src, used, vocab)
    with atomic_path(out / "tokenizer.model") as tmp:
        Path(tmp).write_bytes(model)
    return {"pieces": Tokenizer(out / "tokenizer.model").vocab_size, "needed": needed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="folder to write (default: the bundled %(default)s)")
    ap.add_argument("--modules", type=int, default=60, help="modules with the most documented items to use")
    ap.add_argument("--per-module", type=int, default=10, help="items per module at most")
    ap.add_argument("--vocab", type=int, default=4096, help="pieces in the cut tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data, mods = build(a.modules, a.per_module, seed=a.seed)
    info = write(a.out, data, a.vocab)
    for kind, d in data.items():
        print(kind, {s: len(r) for s, r in d.items()})
    print(f"tokenizer.model: {info['pieces']} pieces ({info['needed']} needed by the data)")
    print(len(mods), "modules:", " ".join(mods))


if __name__ == "__main__":
    main()
