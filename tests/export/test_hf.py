"""HF <-> MLX directories, judged by transformers (AutoModelForCausalLM, AutoTokenizer) and mlx-lm."""

from __future__ import annotations

import json

import mlx_mistral  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mistral.backends.mlx import lora
from mlx_mistral.export.hf import export_hf, hf_to_mlx, plan_shards
from mlx_mistral.backends.mlx.loader import load
from test_adapters import make_run, ours_with_adapter, prompt_ids, torch_logits

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Line one\nline two\n\nend",
         "unicode: héllo 日本語 🤖 naïve café", "numbers 12345 and 3.14159", "[INST] hi [/INST]", "tab\there"]
EDGE = [" leading space", "two  spaces", "  ", "</s> <s> literal"]  # where transformers' Llama tokenizer differs


def _hf(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["swa", "mixtral"])
def test_export_hf_fused_matches_transformers_and_reimports(tiny_models, tmp_path, kind):
    src = tiny_models(kind)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if kind == "mixtral" else "all-linear"
    run = make_run(src, tmp_path / "run", policy="gqa", targets=targets)
    r = export_hf(src, tmp_path / "hf", adapter=run, max_shard_bytes=200_000)
    assert r["shards"] > 1
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    if kind == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    model, tok = ours_with_adapter(src, run)
    ids = prompt_ids(tok)  # 100 tokens, window 32
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(torch_logits(_hf(tmp_path / "hf"), ids) - ours).max() < 1e-4
    # import back: the fused tensors, unchanged
    lora.fuse(model)
    back, _ = load(tmp_path / "hf")
    want, got = dict(tree_flatten(model.parameters())), dict(tree_flatten(back.parameters()))
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(np.array(want[k]), np.array(got[k])), k


def test_exported_tokenizer_and_chat_template(tiny_models, tmp_path):
    from mlx_mistral.export.tokenizer_files import hf_chat_template
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import AutoTokenizer

    src = tiny_models("swa")
    export_hf(src, tmp_path / "hf")
    _, tok = load(src)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.chat_template == hf_chat_template("v1")  # proven per version in tests/export/test_templates.py
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text), text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}]
    ref = MistralTokenizer.from_file(str(tok.path)).encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content="Be brief."), UserMessage(content="Hi there"),
        AssistantMessage(content="Hello! How can I help?"), UserMessage(content="Tell me a joke.")])).tokens
    ids = hf.apply_chat_template(chat, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == ref
    # the mistral-common backend gives our ids exactly, whitespace edge cases included
    export_hf(src, tmp_path / "hf2", tokenizer_backend="mistral-common")
    hf2 = AutoTokenizer.from_pretrained(tmp_path / "hf2")
    for text in TEXTS + EDGE:
        assert hf2.encode(text) == tok.encode(text), text


def test_hf_to_mlx_loads_in_mlx_lm(tiny_models, tmp_path):
    import mlx_lm

    src = tiny_models("full")  # mlx-lm ignores Mistral's window: compare without one
    hf_to_mlx(src, tmp_path / "plain")
    a, b = load(src)[0], load(tmp_path / "plain")[0]
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys() and all(np.array_equal(np.array(pa[k]), np.array(pb[k])) for k in pa)
    r = hf_to_mlx(src, tmp_path / "q4", bits=4)
    assert r["quantization"] == {"group_size": 64, "bits": 4}
    ours, tok = load(tmp_path / "q4")
    theirs, _ = mlx_lm.load(str(tmp_path / "q4"))
    ids = mx.array([prompt_ids(tok)])
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() < 1e-4
    # and the quantized base fuses + dequantizes into a transformers checkpoint
    export_hf(tmp_path / "q4", tmp_path / "hf")
    assert np.abs(torch_logits(_hf(tmp_path / "hf"), prompt_ids(tok)) - np.array(ours(ids)[0])).max() < 1e-4


def test_hf_to_mlx_mixtral_quantized(tiny_models, tmp_path):
    import mlx_lm

    src = tiny_models("mixtral", sliding_window=None)
    hf_to_mlx(src, tmp_path / "q8", bits=8, group_size=32)
    ours, tok = load(tmp_path / "q8")
    theirs, _ = mlx_lm.load(str(tmp_path / "q8"))
    ids = mx.array([prompt_ids(tok, 40)])
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() < 1e-4


def test_bad_inputs(tiny_models, tmp_path):
    import shutil

    src = tiny_models("swa")
    # truncated safetensors
    bad = tmp_path / "trunc"
    shutil.copytree(src, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        hf_to_mlx(bad, tmp_path / "o1")
    # missing tokenizer
    notok = tmp_path / "notok"
    shutil.copytree(src, notok)
    (notok / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="no Mistral tokenizer"):
        export_hf(notok, tmp_path / "o2")
    # an adapter from another model (wrong shapes / fingerprint)
    run = make_run(tiny_models("nemo"), tmp_path / "run", steps=0)
    with pytest.raises(ValueError, match="base_fingerprint"):
        export_hf(src, tmp_path / "o3", adapter=run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(dict(cfg, base_fingerprint="")))
    with pytest.raises(ValueError, match="expected|shape"):
        export_hf(src, tmp_path / "o4", adapter=run)
    with pytest.raises(ValueError, match="source directory"):
        export_hf(src, src)
    assert not list(tmp_path.glob("o*/model-*.safetensors"))  # nothing half-written under a final name


def test_plan_shards():
    assert plan_shards({"a": 3, "b": 3, "c": 5, "d": 1}, 6) == [["a", "b"], ["c", "d"]]
    assert plan_shards({"big": 10, "x": 1}, 4) == [["big"], ["x"]]


def test_cli_commands(tiny_models, tmp_path):
    from click.testing import CliRunner

    from mlx_mistral.cli import main

    src = tiny_models("full")
    run = make_run(src, tmp_path / "run", policy="gqa", steps=1)
    cli = CliRunner()
    for argv in (["convert", "hf-to-mlx", str(src), str(tmp_path / "mlx"), "--quantize", "8"],
                 ["export", "hf", "--model", str(tmp_path / "mlx"), "--adapter", str(run), "--out", str(tmp_path / "hf")],
                 ["export", "peft", "--adapter", str(run), "--out", str(tmp_path / "peft")],
                 ["convert", "peft-to-mlx", str(tmp_path / "peft"), str(tmp_path / "run2"), "--model", str(src)],
                 ["export", "gguf", "--model", str(src), "--adapter", str(tmp_path / "run2"), "--out",
                  str(tmp_path / "g" / "m.gguf"), "--dtype", "q8_0"],
                 ["export", "gguf-lora", "--model", str(src), "--adapter", str(run), "--out", str(tmp_path / "l.gguf")]):
        r = cli.invoke(main, argv)
        assert r.exit_code == 0, (argv, r.output)
    assert (tmp_path / "g" / "Modelfile").exists()
    r = cli.invoke(main, ["export", "gguf", "--model", str(src), "--out", str(tmp_path / "x.gguf"), "--dtype", "q2"])
    assert r.exit_code != 0 and "q2" in r.output
    r = cli.invoke(main, ["export", "hf", "--model", str(tmp_path / "nowhere" / "x"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "neither an existing directory" in r.output
