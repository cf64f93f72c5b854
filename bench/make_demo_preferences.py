"""Build the demo preference set `mlx_mistral/data/demo/preference/{train,valid}.jsonl` from the demo chat data.

    python bench/make_demo_preferences.py      # deterministic: reads mlx_mistral/data/demo/*.jsonl

Each conversation of the chat set becomes a pair in TRL's conversational form: the prompt is the conversation
up to its last user turn, `chosen` the real answer, `rejected` the answer to a *different* question whose
first word is the same and whose length is the closest (the wrong module's / function's docstring). So the
first token and the length distribution of both sides agree and no surface feature separates them: only
whether the answer fits the question does. Questions without a same-first-word partner within 40% of the
length are left out. valid.jsonl holds pairs whose questions come from the chat set's valid and test splits
and the last 40 conversations of its train split (never in train.jsonl here), and each split draws its
wrong answers from its own answers only: no held-out pair's rejected answer is an answer that training
pushes up.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "mlx_mistral" / "data" / "demo"
OUT = DEMO / "preference"


def load(split: str) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (DEMO / f"{split}.jsonl").read_text().splitlines() if line]


def pairs(convs: list[list[dict]], pool: list[str]) -> list[dict]:
    """A pair per conversation that has a partner answer in `pool` (same first word, closest length)."""
    out = []
    for msgs in convs:
        right = msgs[-1]["content"]
        first = right.split()[0]
        cands = [a for a in pool
                 if a != right and a.split()[0] == first and abs(len(a) - len(right)) <= 0.4 * len(right)]
        if not cands:
            continue
        wrong = min(cands, key=lambda a: (abs(len(a) - len(right)), a))
        out.append({"prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [{"role": "assistant", "content": wrong}]})
    return out


def main():
    chat_train = load("train")
    train, held = chat_train[:-40], chat_train[-40:] + load("valid") + load("test")
    OUT.mkdir(exist_ok=True)
    for name, convs in (("train", train), ("valid", held)):
        ps = pairs(convs, sorted({m[-1]["content"] for m in convs}))
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ps))
        print(f"{name}: {len(ps)} pairs of {len(convs)} conversations")


if __name__ == "__main__":
    main()
