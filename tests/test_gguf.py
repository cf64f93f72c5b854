"""GGUF exports judged by llama.cpp itself (llama-cpp-python) and by gguf-py's reader.

llama.cpp does not implement Mistral's sliding window, so logits are compared on window-less configs.
It runs with an F32 KV cache and flash attention off, so an F32 file is exact to ~1e-6.
"""

from __future__ import annotations

import ctypes

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
from test_peft import make_run, prompt_ids

TEXT = "The quick brown fox jumps over the lazy dog. Mistral models run in llama.cpp: 42 tokens, café, 日本."


def _llama(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF judge: pip install llama-cpp-python")
    return llama_cpp.Llama(str(path), logits_all=True, type_k=0, type_v=0, flash_attn=False, n_ctx=256,
                           verbose=False, seed=0, **kw)


def _logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def _greedy(llm, ids, n=30):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


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
    assert "[INST]" in f["tokenizer.chat_template"]
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


# ---- llama.cpp ------------------------------------------------------------------------------------------
@pytest.mark.llama
@pytest.mark.parametrize("kind,overrides", [("full", {}), ("mixtral", {"sliding_window": None}),
                                             ("nemo", {"sliding_window": None}), ("mqa", {"sliding_window": None})])
def test_f32_logits_and_greedy_match_llama_cpp(tiny_models, tmp_path, kind, overrides):
    src = tiny_models(kind, **overrides)
    r = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    assert r["types"] == {"F32": sum(1 for _ in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors)}
    assert not r["warnings"]
    llm = _llama(tmp_path / "m.gguf")
    model, tok = load(src, dtype="float32")
    ids = tok.encode(TEXT)
    assert llm.tokenize(TEXT.encode(), add_bos=True) == ids
    assert np.abs(_logits(llm, ids) - np.array(model(mx.array([ids]))[0])).max() < 1e-4
    assert _greedy(llm, ids) == generate(model, ids, 30)


@pytest.mark.llama
def test_tekken_model(tiny_models, tmp_path):
    src = tiny_models("full", tokenizer="tekken_240718.json", vocab_size=131072)
    export_gguf(src, tmp_path / "t.gguf", dtype="f32")
    _, f = _fields(tmp_path / "t.gguf")
    assert f["tokenizer.ggml.pre"] == "tekken" and f["tokenizer.ggml.model"] == "gpt2"
    llm = _llama(tmp_path / "t.gguf")
    model, tok = load(src, dtype="float32")
    for text in (TEXT, "Hello world", "  two  spaces\nand a newline", "naïve 🤖 x=1+2"):
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text), text
    ids = tok.encode(TEXT)
    assert np.abs(_logits(llm, ids) - np.array(model(mx.array([ids]))[0])).max() < 1e-4


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["full", "mixtral"])
def test_q8_0_q4_0_byte_identical_to_llama_cpp_quantizer(tiny_models, tmp_path, kind):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF judge")
    src = tiny_models(kind, sliding_window=None)
    export_gguf(src, tmp_path / "f32.gguf", dtype="f32")
    for dtype, ftype in (("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0), ("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0)):
        ours = tmp_path / f"{dtype}.gguf"
        export_gguf(src, ours, dtype=dtype)
        ref = tmp_path / f"ref_{dtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.pure = int(ftype), True
        assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(ref).encode(),
                                              ctypes.byref(params)) == 0
        a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
        b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
        assert a.keys() == b.keys()
        same = [n for n in a if a[n].tensor_type == b[n].tensor_type]
        assert sum(a[n].tensor_type.name == dtype.upper() for n in same) >= 2 * 4  # the projections at least
        for n in same:
            assert np.array_equal(np.array(a[n].data), np.array(b[n].data)), n
        llm = _llama(ours)  # and llama.cpp runs our file
        ids = load(src)[1].encode(TEXT)
        assert np.isfinite(_logits(llm, ids)).all()


@pytest.mark.llama
def test_k_quant_through_llama_cpp(tiny_models, tmp_path):
    src = tiny_models("full")
    r = export_gguf(src, tmp_path / "k.gguf", dtype="q4_k_m")
    assert any("multiple of 256" in w for w in r["warnings"])  # hidden 64: every row falls back
    _, f = _fields(tmp_path / "k.gguf")
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert "Q5_0" in r["types"] and not list(tmp_path.glob(".*"))  # fallback type; no temp files left
    llm = _llama(tmp_path / "k.gguf")
    assert np.isfinite(_logits(llm, load(src)[1].encode(TEXT))).all()


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
    llm = _llama(tmp_path / "base.gguf", lora_path=str(tmp_path / "lora.gguf"))
    model, tok = load(src, dtype="float32")
    lora.load_adapters(model, run)
    lora.fuse(model)
    ids = prompt_ids(tok, 60)
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(_logits(llm, ids) - ours).max() < 1e-4
    assert np.abs(np.array(load(src, dtype="float32")[0](mx.array([ids]))[0]) - ours).max() > 1e-2
