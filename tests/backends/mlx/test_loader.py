"""Loading: HF directories, Mistral's params.json format, and clear errors for broken checkpoints."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mlx_mistral.backends.mlx.loader import load


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_models, tmp_path):
    d = copy_model(tiny_models("swa"), tmp_path / "m")
    w = load_file(d / "model.safetensors")
    del w["model.layers.1.self_attn.k_proj.weight"]
    save_file(w, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1: model\.layers\.1\.self_attn\.k_proj\.weight"):
        load(d)


def test_unexpected_and_misshaped_tensors(tiny_models, tmp_path):
    d = copy_model(tiny_models("swa"), tmp_path / "m")
    w = load_file(d / "model.safetensors")
    w["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(w, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected 1: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load(d)
    w.pop("model.layers.0.self_attn.q_proj.bias")
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # a non-GQA shape
    save_file(w, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(64, 64\).*\(32, 64\)"):
        load(d)


def test_no_weights_no_tokenizer_truncated(tiny_models, tmp_path):
    d = copy_model(tiny_models("swa"), tmp_path / "m")
    (d / "model.safetensors").rename(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        load(d)
    data = (tmp_path / "weights.bin").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(d)
    d2 = copy_model(tiny_models("swa"), tmp_path / "m2")
    (d2 / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="no Mistral tokenizer file"):
        load(d2)
    with pytest.raises(ValueError, match="neither an existing directory nor"):
        load(str(tmp_path / "does-not-exist"))


def test_sharded_checkpoint_with_index(tiny_models, tmp_path):
    src = tiny_models("mixtral")
    d = copy_model(src, tmp_path / "m")
    w = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in shards.items():
        save_file({k: w[k] for k in keys}, d / f)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a, _ = load(src)
    b, _ = load(d)
    x = mx.array([[1, 5, 9, 200, 7]])
    assert np.array_equal(np.array(a(x)), np.array(b(x)))


def hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the HF conversion script's permute (written here independently of our importer)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


@pytest.mark.parametrize("kind", ["swa", "mixtral"])
def test_mistral_params_json_import(tiny_models, tmp_path, kind):
    """Write the tiny HF checkpoint by hand in Mistral's consolidated format; logits must match."""
    from transformers import AutoModelForCausalLM

    src = tiny_models(kind)
    cfg = json.loads((src / "config.json").read_text())
    hf = load_file(src / "model.safetensors")
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = lambda k: torch.from_numpy(hf[p + k])  # noqa: E731
        out[f"layers.{i}.attention.wq.weight"] = hf_to_meta(t("self_attn.q_proj.weight"), nh).numpy()
        out[f"layers.{i}.attention.wk.weight"] = hf_to_meta(t("self_attn.k_proj.weight"), nkv).numpy()
        out[f"layers.{i}.attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if kind == "mixtral":
            out[f"layers.{i}.feed_forward.gate.weight"] = hf[p + "block_sparse_moe.gate.weight"]
            for e in range(cfg["num_local_experts"]):
                for wn in ("w1", "w2", "w3"):
                    out[f"layers.{i}.feed_forward.experts.{e}.{wn}.weight"] = \
                        hf[p + f"block_sparse_moe.experts.{e}.{wn}.weight"]
        else:
            for wn, hn in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out[f"layers.{i}.feed_forward.{wn}.weight"] = hf[p + f"mlp.{hn}.weight"]
    d = tmp_path / "consolidated"
    d.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, d / "consolidated.safetensors")
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "head_dim": cfg["head_dim"] or 16,
              "hidden_dim": cfg["intermediate_size"], "n_heads": nh, "n_kv_heads": nkv,
              "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"], "rope_theta": 10000.0,
              "sliding_window": cfg["sliding_window"]}
    if kind == "mixtral":
        params["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}
    (d / "params.json").write_text(json.dumps(params))
    shutil.copy(src / "tokenizer.model", d / "tokenizer.model")
    model, _ = load(d)
    x = np.random.default_rng(0).integers(3, 32000, (1, 100))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor(x)).logits.numpy()
    assert np.abs(np.array(model(mx.array(x))) - ref).max() < 1e-4


def test_dtype_cast(tiny_models):
    model, _ = load(tiny_models("swa"), dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load(tiny_models("swa"), dtype="float8")
