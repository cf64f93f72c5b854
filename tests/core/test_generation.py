"""core/generation.py: a run's prompt format (recorded by training, overridden by --chat/--raw), prompt ids in
each format (chat: mistral-common's own encoding), streamed text that never shows half a character."""

from __future__ import annotations

import json

import pytest
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mistral.core.generation import (GenerationStats, TextStream, encode_turns, prompt_format,
                                         recorded_prompt_format, write_data_format)
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

V3 = "mistral_instruct_tokenizer_240323.model.v3"


def test_recorded_format_and_overrides(tmp_path):
    run, base = tmp_path / "run", tmp_path / "base"
    write_data_format(run, {"chat": 3})
    write_data_format(base, {"text": 10, "chat": 2})  # mostly text: raw
    assert json.loads((base / "data_format.json").read_text())["prompt_format"] == "raw"
    assert prompt_format(None, run, base) == ("chat", f"as trained ({run / 'data_format.json'})")
    assert prompt_format(None, None, base)[0] == "raw"  # no adapter: the model directory's record
    assert prompt_format("raw", run, base) == ("raw", "asked for")
    fmt, why = prompt_format(None, tmp_path / "nothing")
    assert fmt == "raw" and "no data format recorded" in why
    write_data_format(base, {"completion": 4, "chat": 4})  # a tie goes to chat
    assert recorded_prompt_format(base)[0] == "chat"
    (base / "data_format.json").write_text('{"prompt_format": "jinja"}')
    with pytest.raises(ValueError, match="prompt_format must be one of chat, raw"):
        prompt_format(None, base)
    with pytest.raises(ValueError, match="no record shapes"):
        write_data_format(run, {})


@pytest.mark.parametrize("name", ["tokenizer.model.v1", V3, "mistral_instruct_tokenizer_241114.model.v7",
                                  "tekken_240911.json"])
def test_chat_prompt_is_mistral_commons(name):
    path = bundled_tokenizer_path(name)
    tok = Tokenizer(path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    want = MistralTokenizer.from_file(str(path)).encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content="Be brief."), UserMessage(content="Name a prime.")])).tokens
    assert encode_turns(tok, msgs, "chat") == want


def test_raw_prompt_is_how_training_encodes_a_completion_prompt():
    tok = Tokenizer(bundled_tokenizer_path(V3))
    assert encode_turns(tok, [{"role": "user", "content": "Once upon"}], "raw") == tok.encode("Once upon", bos=True)
    with pytest.raises(ValueError, match="system prompt needs the chat format"):
        encode_turns(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "raw")
    with pytest.raises(ValueError, match="prompt format must be one of"):
        encode_turns(tok, [{"role": "user", "content": "u"}], "jinja")


def test_text_stream_holds_back_half_characters():
    tok = Tokenizer(bundled_tokenizer_path(V3))
    ids = tok.encode("a𝄞b c", bos=False)  # 𝄞: four byte-fallback tokens
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in ids]
    assert pieces[:6] == ["a", "", "", "", "𝄞", "b"] and "".join(pieces) == "a𝄞b c" == stream.text


def test_stats_summary():
    s = GenerationStats(prompt_tokens=10, prompt_s=0.5, tokens=5, gen_s=2.0, reason="eos", peak_memory=2_500_000_000,
                        memory_kind="MLX peak")
    assert s.prompt_tps == 20 and s.gen_tps == 2
    assert s.summary() == ("stop: end of sequence (EOS) · prompt 10 tokens, 20.0 tok/s · generation 5 tokens, "
                           "2.0 tok/s · peak memory 2.50 GB (MLX peak)")
