"""The tagged preference set (bench/make_tag_preferences.py) and DPO's held-out reward accuracy on it, from the
demo's pre-trained tiny base (issue 16: >= 0.75 on >= 40 held-out pairs, 95% interval above 0.5)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package

from bench.pref_accuracy import measure  # noqa: E402

TAGS = ROOT / "mlx_mistral" / "data" / "demo_tags"
PREF = TAGS / "preference"


def _pairs(split):
    return [json.loads(line) for line in (PREF / f"{split}.jsonl").read_text().splitlines() if line]


def _questions(path):
    return {json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines() if line}


def test_sides_share_first_token_and_length_and_differ_only_in_the_tag():
    sp = spm.SentencePieceProcessor(model_file=str(TAGS / "tokenizer.model"))
    for split in ("train", "valid"):
        for p in _pairs(split):
            c, r = p["chosen"][0]["content"], p["rejected"][0]["content"]
            tc, tr = sp.encode(c), sp.encode(r)
            assert tc[0] == tr[0] and len(tc) == len(tr), (c, r)
            (mc, text_c), (mr, text_r) = (s[1:].split("] ", 1) for s in (c, r))
            assert text_c == text_r and mc != mr
            asked = " ".join(m["content"] for m in p["prompt"])  # (some conversations name it in an earlier turn)
            assert f"`{mc}" in asked  # the chosen tag names the module asked about, the rejected one does not
            assert f"`{mr}`" not in asked and f"`{mr}." not in asked


def test_held_out_questions_are_not_in_training_and_there_are_at_least_40():
    valid = {p["prompt"][-1]["content"] for p in _pairs("valid")}
    train = {p["prompt"][-1]["content"] for p in _pairs("train")}
    assert len(valid) >= 40 and not valid & train
    assert not valid & (_questions(TAGS / "pretrain" / "train.jsonl") | _questions(TAGS / "tagged" / "train.jsonl"))


def test_script_regenerates_the_bundled_files(tmp_path):
    before = {s: (PREF / f"{s}.jsonl").read_bytes() for s in ("train", "valid")}
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_tag_preferences.py")], check=True,
                   capture_output=True)
    assert {s: (PREF / f"{s}.jsonl").read_bytes() for s in ("train", "valid")} == before


@pytest.mark.slow
def test_dpo_lifts_held_out_reward_accuracy_from_the_pretrained_base(tmp_path):
    r = measure(tmp_path, pref_set="tags", pretrain=True, backend="mlx", pref_weights="lora", steps=60)
    assert r["reason"] == "done" and r["n"] >= 40
    lo, hi = r["interval"]
    assert r["accuracy"] >= 0.75 and lo > 0.5, r
    assert r["margin"] > 0, r
