"""GGUF exports judged by llama.cpp itself (llama-cpp-python) and by gguf-py's reader.

llama.cpp does not implement Mistral's sliding window, so logits are compared on window-less configs.
It runs with an F32 KV cache and flash attention off, so an F32 file is exact to ~1e-6.
"""

from __future__ import annotations

import mlx_mistral  # noqa: F401
import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral.backends.mlx import lora
from mlx_mistral.backends.mlx.generate import generate
from mlx_mistral.backends.mlx.loader import load
from mlx_mistral.core.weights import to_interleaved as permute_rope
from mlx_mistral.export.gguf_adapter import export_gguf_lora
from mlx_mistral.export.gguf_model import export_gguf
from mlx_mistral.export.tokenizer_files import gguf_chat_template, ollama_modelfile
from llama_judge import quantize, system_info
from llama_judge import run as judge
from test_adapters import make_run, prompt_ids

TEXT = "The quick brown fox jumps over the lazy dog. Mistral models run in llama.cpp: 42 tokens, café, 日本."


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}


# ---- metadata (gguf-py reader; no llama.cpp needed) ----------------------------------------------------
def test_metadata_nemo_head_dim_and_window_warning(tiny_models, tmp_path):
    src = tiny_models("nemo")  # head_dim 32 while hidden / heads = 20; window 24
    r = export_gguf(src, tmp_path / "m.gguf", dtype="f16")
    assert r["warnings"] and "sliding window" in r["warnings"][0]
    reader, f = _fields(tmp_path / "m.gguf")
    assert f["general.architecture"] == "llama"
    assert f["llama.rope.dimension_count"] == 32 and f["llama.attention.key_length"] == 32
    assert f["llama.rope.freq_base"] == 10000.0
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert f["llama.attention.head_count_kv"] == 2
    scores = f["tokenizer.ggml.scores"]
    assert len(f["tokenizer.ggml.tokens"]) == 32000 and len(set(scores)) > 1000  # real scores, not -1000s
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.add_bos_token"] is True
    # the templates tests/export/test_templates.py proves against mistral-common, Go and llama.cpp (v1 here)
    assert f["tokenizer.chat_template"] == gguf_chat_template("v1")
    assert (tmp_path / "Modelfile").read_text() == ollama_modelfile("m.gguf", "v1", 24)
    assert 'PARAMETER stop "</s>"' in (tmp_path / "Modelfile").read_text()
    # the Q rows are permuted with n_heads, K rows with n_kv_heads
    model, _ = load(src, dtype="float32")
    k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    want = permute_rope(np.array(model.layers[0].self_attn.k_proj.weight), 2).astype(np.float16)
    assert np.array_equal(np.array(k.data).reshape(want.shape), want)


def test_unknown_type_and_bad_name(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="unknown GGUF type"):
        export_gguf(tiny_models("full"), tmp_path / "x.gguf", dtype="q3_k_s")
    with pytest.raises(ValueError, match=".gguf"):
        export_gguf(tiny_models("full"), tmp_path / "x.bin", dtype="f32")
    assert not list(tmp_path.iterdir())


# ---- llama.cpp (in a child process: see llama_judge.py) --------------------------------------------------
@pytest.mark.llama
def test_judge_is_the_portable_build():
    """`make test` builds llama.cpp with GGML_NATIVE=OFF: a build for the build machine's own CPU
    (AVX512, AMX) crashed in `decode` on another CPU of the same machine kind."""
    info = system_info()
    if info is None:
        from llama_judge import require

        require()
    print(f"llama.cpp system info: {info}")
    assert "AVX512 = 1" not in info and "AMX_INT8 = 1" not in info, (
        f"llama-cpp-python was built for this CPU ({info}); rebuild it portably: make test (see README)")


@pytest.mark.llama
def test_a_crash_in_the_judge_fails_one_test_naming_the_file(tmp_path):
    from llama_judge import _call

    with pytest.raises(pytest.fail.Exception, match=r"crashed with SIGSEGV on .*m\.gguf"):
        _call({"task": "crash"}, tmp_path, str(tmp_path / "m.gguf"))


@pytest.mark.llama
@pytest.mark.parametrize("kind,overrides", [("full", {}), ("mixtral", {"sliding_window": None}),
                                             ("nemo", {"sliding_window": None}), ("mqa", {"sliding_window": None})])
def test_f32_logits_and_greedy_match_llama_cpp(tiny_models, tmp_path, kind, overrides):
    src = tiny_models(kind, **overrides)
    r = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    assert r["types"] == {"F32": sum(1 for _ in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors)}
    assert not r["warnings"]
    model, tok = load(src, dtype="float32")
    ids = tok.encode(TEXT)
    toks, logits, greedy = judge(tmp_path / "m.gguf", [{"op": "tokenize", "text": TEXT}, {"op": "logits", "ids": ids},
                                                     {"op": "greedy", "ids": ids, "n": 30}], tmp_path / "judge")
    assert toks == ids
    assert np.abs(logits - np.array(model(mx.array([ids]))[0])).max() < 1e-4
    assert greedy == generate(model, ids, 30)


@pytest.mark.llama
def test_tekken_model(tiny_models, tmp_path):
    src = tiny_models("full", tokenizer="tekken_240718.json", vocab_size=131072)
    export_gguf(src, tmp_path / "t.gguf", dtype="f32")
    _, f = _fields(tmp_path / "t.gguf")
    assert f["tokenizer.ggml.pre"] == "tekken" and f["tokenizer.ggml.model"] == "gpt2"
    model, tok = load(src, dtype="float32")
    texts = (TEXT, "Hello world", "  two  spaces\nand a newline", "naïve 🤖 x=1+2")
    ids = tok.encode(TEXT)
    *toks, logits = judge(tmp_path / "t.gguf", [{"op": "tokenize", "text": t} for t in texts]
                        + [{"op": "logits", "ids": ids}], tmp_path / "judge")
    for text, got in zip(texts, toks):
        assert got == tok.encode(text), text
    assert np.abs(logits - np.array(model(mx.array([ids]))[0])).max() < 1e-4


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["full", "mixtral"])
def test_q8_0_q4_0_byte_identical_to_llama_cpp_quantizer(tiny_models, tmp_path, kind):
    src = tiny_models(kind, sliding_window=None)
    export_gguf(src, tmp_path / "f32.gguf", dtype="f32")
    for dtype, ftype in (("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0), ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0)):
        ours = tmp_path / f"{dtype}.gguf"
        export_gguf(src, ours, dtype=dtype)
        ref = tmp_path / f"ref_{dtype}.gguf"
        assert quantize(tmp_path / "f32.gguf", ref, int(ftype), tmp_path / f"judge_q_{dtype}") == 0
        a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
        b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
        assert a.keys() == b.keys()
        same = [n for n in a if a[n].tensor_type == b[n].tensor_type]
        assert sum(a[n].tensor_type.name == dtype.upper() for n in same) >= 2 * 4  # the projections at least
        for n in same:
            assert np.array_equal(np.array(a[n].data), np.array(b[n].data)), n
        ids = load(src)[1].encode(TEXT)  # and llama.cpp runs our file
        assert np.isfinite(judge(ours, [{"op": "logits", "ids": ids}], tmp_path / f"judge_{dtype}")[0]).all()


@pytest.mark.llama
def test_k_quant_through_llama_cpp(tiny_models, tmp_path):
    src = tiny_models("full")
    r = export_gguf(src, tmp_path / "k.gguf", dtype="q4_k_m")
    assert any("multiple of 256" in w for w in r["warnings"])  # hidden 64: every row falls back
    _, f = _fields(tmp_path / "k.gguf")
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert "Q5_0" in r["types"] and not list(tmp_path.glob(".*"))  # fallback type; no temp files left
    ids = load(src)[1].encode(TEXT)
    assert np.isfinite(judge(tmp_path / "k.gguf", [{"op": "logits", "ids": ids}], tmp_path / "judge")[0]).all()


@pytest.mark.llama
@pytest.mark.parametrize("policy", ["uniform", "gqa"])
def test_adapter_gguf_matches_fused(tiny_models, tmp_path, policy):
    src = tiny_models("full")
    run = make_run(src, tmp_path / "run", policy=policy)
    export_gguf(src, tmp_path / "base.gguf", dtype="f32")
    r = export_gguf_lora(src, run, tmp_path / "lora.gguf")
    assert r["folded"] == (policy == "gqa") and (r["alpha"] == 0.0) == (policy == "gqa")
    _, f = _fields(tmp_path / "lora.gguf")
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora"
    model, tok = load(src, dtype="float32")
    lora.load_adapters(model, run)
    lora.fuse(model)
    ids = prompt_ids(tok, 60)
    ours = np.array(model(mx.array([ids]))[0])
    judged = judge(tmp_path / "base.gguf", [{"op": "logits", "ids": ids}], tmp_path / "judge",
                 lora_path=tmp_path / "lora.gguf")[0]
    assert np.abs(judged - ours).max() < 1e-4
    assert np.abs(np.array(load(src, dtype="float32")[0](mx.array([ids]))[0]) - ours).max() > 1e-2
