"""ModelArgs from real configs; every unimplemented key is an error that names it."""

import json

import pytest

from mlx_mistral.core.config import ModelArgs, bundled_config


def test_bundled_real_configs():
    v1 = bundled_config("mistral-7b-v0.1")
    assert (v1.sliding_window, v1.vocab_size, v1.rope_theta, v1.head_dim) == (4096, 32000, 10000.0, 128)
    v3 = bundled_config("mistral-7b-v0.3")
    assert (v3.sliding_window, v3.vocab_size, v3.rope_theta, v3.n_rep) == (None, 32768, 1e6, 4)
    mx8 = bundled_config("mixtral-8x7b-v0.1")
    assert (mx8.num_local_experts, mx8.num_experts_per_tok, mx8.is_moe) == (8, 2, True)
    nemo = bundled_config("mistral-nemo-base-2407")
    assert nemo.head_dim == 128 and nemo.hidden_size // nemo.num_attention_heads == 160
    # published sizes: 7.24B, 46.7B, 12.2B parameters
    assert round(v1.param_count() / 1e9, 2) == 7.24
    assert round(mx8.param_count() / 1e9, 1) == 46.7
    assert round(nemo.param_count() / 1e9, 1) == 12.2


def base_cfg(**kw):
    cfg = json.loads((bundled_config.__globals__["BUNDLED"] / "mistral-7b-v0.3.json").read_text())
    cfg.update(kw)
    return cfg


def test_rope_theta_top_level_and_rope_parameters():
    assert ModelArgs.from_hf_config(base_cfg(rope_theta=5e5)).rope_theta == 5e5
    cfg = base_cfg()
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_theta": 123.0, "rope_type": "default"}
    assert ModelArgs.from_hf_config(cfg).rope_theta == 123.0
    with pytest.raises(ValueError, match="disagree"):
        ModelArgs.from_hf_config(base_cfg(rope_parameters={"rope_theta": 1.0, "rope_type": "default"}))


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
    ("attention_bias", True),
    ("hidden_act", "gelu"),
    ("attention_dropout", 0.1),
    ("some_new_feature", 1),
    ("quantization_config", {"quant_method": "gptq"}),
    ("sliding_window", [4096, None]),
])
def test_unsupported_keys_raise_naming_them(key, value):
    name = key.split(".")[0]
    with pytest.raises(ValueError, match=name):
        ModelArgs.from_hf_config(base_cfg(**{key: value}))


def test_wrong_model_type_and_bad_heads():
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.from_hf_config(base_cfg(model_type="llama"))
    with pytest.raises(ValueError, match="multiple"):
        ModelArgs.from_hf_config(base_cfg(num_key_value_heads=5))


def test_mistral_params_json():
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0,
              "moe": {"num_experts": 8, "num_experts_per_tok": 2}}
    a = ModelArgs.from_mistral_params(params)
    assert (a.num_local_experts, a.num_key_value_heads, a.intermediate_size) == (8, 8, 14336)
    with pytest.raises(ValueError, match="vision_encoder"):
        ModelArgs.from_mistral_params(dict(params, vision_encoder={"x": 1}))


def test_hf_config_round_trip():
    for name in ("mistral-7b-v0.1", "mixtral-8x7b-v0.1", "mistral-nemo-base-2407"):
        a = bundled_config(name)
        assert ModelArgs.from_hf_config(a.to_hf_config()) == a
