"""Datasets: the three JSONL shapes, errors that name file and line, the on-disk cache, `data inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_mistral.core.data as data
from mlx_mistral.cli import main
from mlx_mistral.core.chat import encode_chat
from mlx_mistral.core.data import DEMO
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(bundled_tokenizer_path("mistral_instruct_tokenizer_240323.model.v3"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(d))
    return d


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}]}


def test_three_formats_each_with_bos_eos_and_their_loss(tmp_path, tok):
    f = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "Plain text."},
                                                {"prompt": "Q: 2+2?", "completion": " A: 4"},
                                                "", CHAT])  # a blank line is not a record
    docs, masks, stats = data.load_dataset(f, tok, cache=False)
    assert stats["n_docs"] == 3 and stats["formats"] == {"text": 1, "completion": 1, "chat": 1}
    for d in docs:
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id  # every document learns to stop
    text, comp, chat = zip(docs, masks)
    np.testing.assert_array_equal(text[0], tok.encode("Plain text.", bos=True, eos=True))
    assert text[1].all()
    c = tok.encode(" A: 4", bos=False, eos=True)
    assert comp[1].tolist() == [0] * (len(comp[0]) - len(c)) + [1] * len(c)
    want, want_mask = encode_chat(tok, CHAT["messages"])
    np.testing.assert_array_equal(chat[0], want)
    np.testing.assert_array_equal(chat[1], want_mask)
    assert stats["n_loss_tokens"] == int(sum(m.sum() for m in masks))


@pytest.mark.parametrize("line, expected", [
    ('{"text": "ok"', "malformed JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
     "empty assistant turn"),
    (json.dumps({"input": "x", "output": "y"}), "expected one of"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"prompt": "only a prompt"}), "'completion' must be a string"),
])
def test_bad_lines_name_file_and_line(tmp_path, tok, line, expected):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "also fine"}, line, {"text": "after"}])
    with pytest.raises(ValueError) as e:
        data.load_dataset(f, tok, cache=False)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and expected in msg
    docs, _, stats = data.load_dataset(f, tok, cache=False, skip_invalid=True)
    assert len(docs) == 3 and stats["skipped"] == 1 and stats["errors"][0].startswith(f"{f}:3: ")


def test_directory_splits_and_missing_split(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}] * 3)
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "d"}])
    assert len(data.load_dataset(tmp_path, tok, "valid", cache=False)[0]) == 1
    with pytest.raises(ValueError, match="no test.jsonl"):
        data.load_dataset(tmp_path, tok, "test", cache=False)
    with pytest.raises(ValueError, match="does not exist"):
        data.load_dataset(tmp_path / "nope", tok)


def test_second_load_hits_the_cache(tmp_path, tok, cache_dir, monkeypatch):
    f = write_jsonl(tmp_path / "train.jsonl", [CHAT, {"text": "x y z"}, {"prompt": "p", "completion": "c"}])
    calls = []
    docs, masks, s1 = data.load_dataset(f, tok, progress=lambda d, t: calls.append((d, t)))
    assert not s1["cached"] and calls[-1] == (f.stat().st_size,) * 2
    assert Path(s1["cache_path"]).parent.parent == cache_dir
    assert sorted(p.name for p in Path(s1["cache_path"]).iterdir()) == [
        "lengths.npy", "loss_mask.npy", "meta.json", "tokens.npy"]

    def fail(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(data, "tokenize_file", fail)
    docs2, masks2, s2 = data.load_dataset(f, tok)
    assert s2["cached"] and s2["n_docs"] == 3
    for a, b in zip(docs + masks, docs2 + masks2):
        np.testing.assert_array_equal(a, b)
    # other options or another tokenizer or changed data miss the cache
    monkeypatch.undo()
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(cache_dir))
    assert not data.load_dataset(f, tok, loss_on="all")[2]["cached"]
    tekken = Tokenizer(bundled_tokenizer_path("tekken_240718.json"))
    assert not data.load_dataset(f, tekken)[2]["cached"]
    write_jsonl(f, [CHAT])
    assert not data.load_dataset(f, tok)[2]["cached"]


def test_demo_dataset_loads_for_every_split(tok):
    sizes = {}
    for split in data.SPLITS:
        docs, masks, stats = data.load_dataset(DEMO, tok, split, cache=False)
        sizes[split] = len(docs)
        assert stats["formats"] == {"chat": len(docs)} and all(m.sum() > 0 for m in masks)
    assert sizes == {"train": 300, "valid": 40, "test": 40}
    assert sum(p.stat().st_size for p in DEMO.glob("*.jsonl")) < 1_000_000


def test_data_inspect_reports_packing_against_padding(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    lines = [{"text": " ".join(rng.choice(words, size=int(n)))} for n in rng.lognormal(np.log(60), 0.8, 200)]
    write_jsonl(tmp_path / "train.jsonl", lines)
    model_dir = tmp_path / "model"  # a model directory without weights: only its tokenizer is read
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(bundled_tokenizer_path("tokenizer.model.v1").read_bytes())
    r = CliRunner().invoke(main, ["data", "inspect", str(tmp_path), "--model", str(model_dir), "--seq-len", "256"],
                           env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    docs, _, _ = data.load_dataset(tmp_path, Tokenizer(model_dir / "tokenizer.model"))
    from mlx_mistral.core.packing import pack

    swa, pad = pack(docs, 256), pack(docs, 256, mode="none")
    assert "documents" in r.output and "200" in r.output
    assert f"{100 * swa.efficiency:.1f}%" in r.output and f"{100 * pad.efficiency:.1f}%" in r.output
    assert f"{swa.rows:,}" in r.output and "padded" in r.output

    bad = CliRunner().invoke(main, ["data", "inspect", str(tmp_path / "train.jsonl"), "--model",
                                    str(tmp_path / "missing-model"), "--seq-len", "256"])
    assert bad.exit_code != 0 and "missing-model" in bad.output


def test_data_inspect_reports_context_utilisation_on_long_documents(tmp_path):
    """The context line on synthetic long documents (bench/make_long_docs.py: exact token lengths), with
    numbers worked by hand: at rows of 2048 the documents of 3000 and 5000 tokens are split (into 2048 + 952
    and 2048 + 2048 + 904), best-fit-decreasing puts the eight pieces in 5 rows (three full ones, 952 + 904,
    900 + 700 + 400), so 10,000 / 5 = 2,000 tokens per row are used; 900 is the longest document whole."""
    import importlib.util

    script = Path(__file__).parents[2] / "bench" / "make_long_docs.py"
    spec = importlib.util.spec_from_file_location("make_long_docs", script)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    v1 = bundled_tokenizer_path("tokenizer.model.v1")
    gen.write_long_docs(tmp_path, v1, [3000, 900, 700, 400, 5000])
    args = ["data", "inspect", str(tmp_path), "--model", str(v1), "--seq-len", "2048"]
    r = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert ("context (swa): 2,000 of 2,048 tokens per row used (97.7%); longest document trained whole: 900 tokens "
            "(the longest, 5,000, is split); 2 documents split across rows (80.0% of tokens)") in r.output
    r = CliRunner().invoke(main, args + ["--packing", "none", "--seq-len", "8192"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert ("context (none): 2,000 of 8,192 tokens per row used (24.4%); longest document trained whole: 5,000 "
            "tokens; no document split") in r.output
    assert r.output.index("padded (none)") < r.output.index("packed (swa)")  # the chosen mode's row first
