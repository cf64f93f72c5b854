"""Build the tagged preference set `mlx_mistral/data/demo_tags/preference/{train,valid}.jsonl`.

    python bench/make_tag_preferences.py      # deterministic: reads mlx_mistral/data/demo_tags/tagged/*.jsonl

Each tagged conversation ("[smtplib] Base class for all exceptions ...", bench/make_tag_demo_data.py) becomes
a pair in TRL's conversational form: `chosen` the tagged answer, `rejected` the *same* answer under another
module's tag. The wrong module is drawn (seeded) from the modules whose tag has the same number of tokens
under the demo tokenizer, so both sides share their first token ("[") and their length distribution, and
differ only in whether the tag names the module the question asks about: a prompt-dependent preference
that a tiny pre-trained base can learn (issue 16's held-out accuracy test, tests/recipes/test_pref_tags.py).
train.jsonl pairs the questions of tagged/train.jsonl; valid.jsonl those of tagged/test.jsonl (functions
held out of every training split, modules seen), so no held-out question is in training.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import sentencepiece as spm

TAGS = Path(__file__).resolve().parents[1] / "mlx_mistral" / "data" / "demo_tags"
OUT = TAGS / "preference"


def load(split: str) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (TAGS / "tagged" / f"{split}.jsonl").read_text().splitlines()
            if line]


def split_tag(answer: str) -> tuple[str, str]:
    """'[mod] text' -> ('mod', 'text')."""
    if not answer.startswith("[") or "] " not in answer:
        raise ValueError(f"not a tagged answer: {answer!r}")
    mod, text = answer[1:].split("] ", 1)
    return mod, text


def pairs(convs: list[list[dict]], by_len: dict[int, list[str]], tag_len: dict[str, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for msgs in convs:
        mod, text = split_tag(msgs[-1]["content"])
        cands = [m for m in by_len[tag_len[mod]] if m != mod]
        if not cands:  # no module with a tag of the same token count: the nearest count
            cands = sorted((m for m in tag_len if m != mod), key=lambda m: (abs(tag_len[m] - tag_len[mod]), m))[:5]
        wrong = rng.choice(cands)
        out.append({"prompt": msgs[:-1], "chosen": [msgs[-1]],
                    "rejected": [{"role": "assistant", "content": f"[{wrong}] {text}"}]})
    return out


def main():
    sp = spm.SentencePieceProcessor(model_file=str(TAGS / "tokenizer.model"))
    train, held = load("train"), load("test")
    mods = sorted({split_tag(m[-1]["content"])[0] for m in train + held})
    tag_len = {m: len(sp.encode(f"[{m}]")) for m in mods}
    by_len = defaultdict(list)
    for m in mods:
        by_len[tag_len[m]].append(m)
    OUT.mkdir(exist_ok=True)
    for name, convs, seed in (("train", train, 0), ("valid", held, 1)):
        ps = pairs(convs, by_len, tag_len, seed)
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ps))
        print(f"{name}: {len(ps)} pairs")


if __name__ == "__main__":
    main()
