"""The main job (`mlx-mistral demo`, what `make demo` runs) end to end in a real pseudo-terminal: the live
dashboard of the real training CLI appears, the fine-tune measurably changes the answers to held-out
questions (tag-format and right-module rates printed before and after), every export is written.
Fast tests: the bundled data and tokenizer (against Mistral's own v1 tokenizer), the checker, the view."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from ui.test_dashboard import braille_cells, run_in_pty  # tests/ui/ (tests/ is on sys.path: conftest.py)

from mlx_mistral.core.data import DEMO_TAGS
from mlx_mistral.core.tokenizer import bundled_tokenizer_path
from mlx_mistral.recipes.demo_check import check, module_of, rates

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FILES = [(kind, split) for kind in ("pretrain", "tagged") for split in ("train", "valid", "test")]
FILES.append(("tagged", "unseen"))


def records(kind, split):
    return [json.loads(line)["messages"] for line in (DEMO_TAGS / kind / f"{split}.jsonl").read_text().splitlines()]


def make_data_script():
    spec = importlib.util.spec_from_file_location("make_tag_demo_data", ROOT / "bench" / "make_tag_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the bundled data and tokenizer -----------------------------------------------------------------------------
def test_cut_tokenizer_keeps_mistral_v1_pieces_on_the_training_data():
    """The 4096-piece cut tokenizes the train and valid splits to exactly the pieces Mistral's full v1
    tokenizer (the mistral-common wheel's file, read by sentencepiece) gives; held-out text, which may need
    dropped pieces, still round-trips (byte fallback). Control ids are Mistral's."""
    full = spm.SentencePieceProcessor(model_file=str(bundled_tokenizer_path("tokenizer.model.v1")))
    cut = spm.SentencePieceProcessor(model_file=str(DEMO_TAGS / "tokenizer.model"))
    assert cut.vocab_size() == 4096 and full.vocab_size() == 32000
    assert (cut.unk_id(), cut.bos_id(), cut.eos_id()) == (full.unk_id(), full.bos_id(), full.eos_id())
    for kind, split in FILES:
        texts = [m["content"] for r in records(kind, split) for m in r]
        for t in texts:
            if split in ("train", "valid"):
                assert cut.encode(t, out_type=str) == full.encode(t, out_type=str), (kind, split, t)
            assert cut.decode(cut.encode(t)) == t


def test_held_out_questions_are_in_no_training_data():
    """tagged/test.jsonl asks about trained modules' items that no training split holds; unseen.jsonl about
    modules in no training data. Items are read from the pre-training answers, which restate them."""
    def items(split):  # "`json.dumps`: Serialize ..." -> "json.dumps"
        return {m[1] for r in records("pretrain", split) for m in [re.match(r"`([\w.]+)`: ", r[1]["content"])] if m}

    assert len(items("test")) >= 100 and not items("test") & (items("train") | items("valid"))
    seen = {module_of(r[0]["content"]) for r in records("tagged", "train")}
    assert {module_of(r[0]["content"]) for r in records("tagged", "test")} <= seen
    unseen = {module_of(r[0]["content"]) for r in records("tagged", "unseen")}
    assert len(unseen) == 20 and not unseen & seen


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7) or sys.implementation.name != "cpython",
                    reason="the bundled files were generated from CPython 3.11.7's standard library")
def test_data_script_regenerates_the_bundled_files(tmp_path):
    gen = make_data_script()
    data, mods = gen.build()
    info = gen.write(tmp_path, data, 4096)
    assert len(mods) == 60 and info["pieces"] == 4096
    for kind, split in FILES:
        assert (tmp_path / kind / f"{split}.jsonl").read_bytes() == (DEMO_TAGS / kind / f"{split}.jsonl").read_bytes()
    assert (tmp_path / "tokenizer.model").read_bytes() == (DEMO_TAGS / "tokenizer.model").read_bytes()


def test_trim_refuses_a_vocabulary_smaller_than_the_data_needs():
    gen = make_data_script()
    full = spm.SentencePieceProcessor(model_file=str(bundled_tokenizer_path("tokenizer.model.v1")))
    with pytest.raises(ValueError, match="smaller than the"):
        gen.trim_tokenizer(bundled_tokenizer_path("tokenizer.model.v1"), full.encode("Hello world, again"), 100)


# ---- the checker ------------------------------------------------------------------------------------------------
def test_checker_agrees_with_the_data_on_every_tagged_answer():
    """Every reference answer of the tagged data passes both checks against its question; the same answer
    under another record's question fails the right-module check unless both ask about one module."""
    gen = make_data_script()
    recs = [r for split in ("train", "valid", "test", "unseen") for r in records("tagged", split)]
    for r in recs:
        for q, a in zip(r[0::2], r[1::2]):
            if q["content"] != gen.LIST_Q:  # the follow-up "Which functions...?" names no module itself
                assert check(q["content"], a["content"]) == (True, True), (q, a)
    for t in gen.TEMPLATES + [gen.MODULE_Q]:
        assert module_of(t.format(m="json", f="dumps")) == "json"


def test_checker_cases_and_rates():
    q = "Briefly, what does `dumps` in `json` do?"
    assert check(q, "[json] Serialize obj") == (True, True)
    assert check(q, "  [pickle] Serialize") == (True, False)
    assert check(q, "`json.dumps`: Serialize") == (False, False)
    assert check(q, "json] x") == (False, False) and check(q, "[1json] x") == (False, False)
    pairs = [(q, "[json] a"), ("What does `re.sub()` do?", "[json] b"), ("What does `re.sub()` do?", "b")]
    r = rates(pairs)
    assert (r["format"], r["module"], r["n"], r["constant_baseline"]) == (2 / 3, 1 / 3, 3, 2 / 3)
    with pytest.raises(ValueError, match="at least one"):
        rates([])


def test_before_after_view_shows_both_rates_losses_answers_and_limits():
    from mlx_mistral.ui.demo_view import before_after
    from rich.console import Console

    prompts = ["What does `json.dumps()` do?", "What does `re.sub()` do?"]
    def side(answers, checks, loss):
        return {"loss": loss, "loss_tokens": 20, "answers": answers, "checks": checks,
                "rates": rates(zip(prompts, answers))}

    result = {"prompts": prompts, "steps": 60, "before": side(["`json.x`: y", "z"], [[False, False]] * 2, 7.5),
              "after": dict(side(["[json] y", "[json] z"], [[True, True], [True, False]], 4.5),
                            unseen={"n": 40, "format": 1.0, "module": 0.0})}
    con = Console(width=120, record=True)
    for part in before_after(result, 120):
        con.print(part)
    text = con.export_text()
    assert re.search(r"before \(pre-trained base\)\s+0%\s+0%\s+7\.500", text), text
    assert re.search(r"after \(\+ LoRA, 60 steps\)\s+100%\s+50%\s+4\.500", text), text
    assert "[json] y" in text and "`json.x`: y" in text and "✓" in text and "~" in text
    assert "right module 0%" in text and "not to new modules" in text


def test_tiny_demo_tags_preset_uses_the_cut_tokenizer(tmp_path):
    from mlx_mistral.core.tiny import build_tiny

    d = build_tiny(tmp_path / "a", "demo-tags")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == 4096 and cfg["hidden_size"] == 128 and cfg["sliding_window"] == 64
    assert (d / "tokenizer.model").read_bytes() == (DEMO_TAGS / "tokenizer.model").read_bytes()
    full = build_tiny(tmp_path / "b", "demo-tags", tokenizer="tokenizer.model.v1")  # an explicit tokenizer wins
    assert json.loads((full / "config.json").read_text())["vocab_size"] == 32000


# ---- the demo in a pseudo-terminal ------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_in_a_pty_shows_the_live_panel_learning_and_exports(tmp_path):
    out = tmp_path / "demo"
    rc, text = run_in_pty([sys.executable, "-m", "mlx_mistral.cli", "demo", "--out", str(out)],
                          timeout=1200, cols=110, rows=45)
    assert rc == 0, text[-3000:]
    assert "\x1b[" in text and len(braille_cells(text)) > 40  # the live panel with its loss chart
    assert "step 250/250" in text and "step 60/60" in text and "Run summary" in text and "demo finished" in text
    plain = ANSI.sub("", text)
    rows = {}
    for side, pat in (("before", r"before \(pre-trained base\)"), ("after", r"after \(\+ LoRA, 60 steps\)")):
        m = re.search(pat + r"\s+(\d+)%\s+(\d+)%\s+(\d+\.\d+)", plain)
        assert m, plain[-4000:]
        rows[side] = [int(m[1]), int(m[2]), float(m[3])]
    # the targets of issue 17 on 108 held-out questions: tag format and right module <= 5% before, >= 60% after
    assert rows["before"][0] <= 5 and rows["before"][1] <= 5, rows
    assert rows["after"][0] >= 60 and rows["after"][1] >= 60, rows
    assert rows["after"][2] < rows["before"][2]  # the test loss on the answers falls
    result = json.loads((out / "results.json").read_text())
    assert round(100 * result["after"]["rates"]["module"]) == rows["after"][1]
    assert result["after"]["rates"]["n"] == 108 and result["after"]["unseen"]["n"] == 40
    words = " ".join(plain.split())  # paragraphs wrap at the terminal's width
    assert "right module (the prompt-dependent rate)" in words and "not to new modules" in words, words[-3000:]
    for f in ("export/hf/config.json", "export/hf/model.safetensors.index.json",
              "export/peft/adapter_model.safetensors", "export/tiny-demo-q8_0.gguf", "export/Modelfile",
              "export/tiny-demo-lora.gguf", "lora/adapters.safetensors", "lora/adapter_config.json",
              "pretrain/model.safetensors", "pretrain/tokenizer.model", ".mlx-mistral-demo"):
        assert (out / f).exists(), f
    events = [json.loads(line) for line in (out / "lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert evals[-1] < evals[0]  # the fine-tune lowers the validation loss
    pre = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in pre if e["event"] == "end"][0]["final_loss"] < 3.0  # from ~8.3 (uniform over 4096)

