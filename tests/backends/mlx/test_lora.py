"""LoRA / QLoRA: exact parameter counts per rank policy, PEFT as the reference for counts and outputs."""

from __future__ import annotations

import json

import mlx_mistral  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mistral.backends.mlx.loader import load, quantize_model
from mlx_mistral.backends.mlx.lora import LoRALinear, apply_lora, fuse, load_adapters, save_adapters
from mlx_mistral.core.adapters import adapter_config, count_params, plan_modules
from mlx_mistral.core.config import ModelArgs, bundled_config

# tests/conftest.py TINY["swa"]: hidden 64, 4 heads, 2 KV heads (head_dim 16), MLP 128, 2 layers.
TINY = ModelArgs(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32)


def test_exact_counts_uniform_and_gqa():
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # uniform r=8: q, o 8*(64+64) = 1024; k, v 8*(64+32) = 768  -> 3584 per layer
    assert count_params(plan_modules(TINY, attn, rank=8, alpha=16)) == 2 * 3584
    # gqa r=8: k, v rank 8*2/4 = 4 -> 4*96 = 384 each  -> 2816 per layer
    specs = plan_modules(TINY, attn, rank=8, alpha=16, policy="gqa", floor=2)
    assert count_params(specs) == 2 * 2816
    k = specs["model.layers.1.self_attn.k_proj"]
    assert (k.rank, k.alpha, k.n_in, k.n_out) == (4, 8.0, 64, 32)  # alpha/r stays 2
    assert specs["model.layers.1.self_attn.q_proj"].rank == 8
    # all-linear adds gate/up/down 3 * 8*(64+128) = 4608 per layer, same under both policies
    assert count_params(plan_modules(TINY, "all-linear", rank=8)) == 2 * (3584 + 4608)
    assert count_params(plan_modules(TINY, "all-linear", rank=8, policy="gqa", floor=2)) == 2 * (2816 + 4608)
    # the floor: r=2 would give k/v rank 1; the floor keeps 2 (and never exceeds r)
    assert plan_modules(TINY, ["k_proj"], rank=2, policy="gqa", floor=2)["model.layers.0.self_attn.k_proj"].rank == 2
    assert plan_modules(TINY, ["k_proj"], rank=2, policy="gqa", floor=4)["model.layers.0.self_attn.k_proj"].rank == 2


def test_mistral_7b_counts():
    args = bundled_config("mistral-7b-v0.3")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # per layer uniform r16: q,o 16*8192 each, k,v 16*(4096+1024) each = 425,984; 32 layers
    assert count_params(plan_modules(args, attn, rank=16)) == 13_631_488
    # gqa r16: k,v rank 16*8/32 = 4 -> 4*5120 each: 303,104 per layer
    assert count_params(plan_modules(args, attn, rank=16, policy="gqa")) == 9_699_328


def test_last_n_layers_and_patterns():
    specs = plan_modules(TINY, ["q_proj", "v_proj"], num_layers=1, rank=8, alpha=16,
                         rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 4})
    assert sorted(specs) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert (specs["model.layers.1.self_attn.v_proj"].rank, specs["model.layers.1.self_attn.v_proj"].alpha) == (2, 16.0)
    assert (specs["model.layers.1.self_attn.q_proj"].rank, specs["model.layers.1.self_attn.q_proj"].alpha) == (8, 4.0)
    with pytest.raises(ValueError, match="num_layers"):
        plan_modules(TINY, "all-linear", num_layers=3)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        plan_modules(TINY, ["qkv"])


def _peft_model(model_dir, specs, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    rank_pattern = {n: s.rank for n, s in specs.items()}  # full names: PEFT matches `(.*\.)?name$`
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                     rank_pattern=rank_pattern, alpha_pattern={n: s.alpha for n, s in specs.items()})
    return get_peft_model(hf, cfg)


@pytest.mark.parametrize("policy", ["uniform", "gqa"])
def test_counts_and_outputs_match_peft(tiny_models, policy):
    import torch

    path = tiny_models("swa")
    model, _ = load(path, dtype="float32")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    specs = apply_lora(model, targets, rank=8, alpha=16, policy=policy, floor=2, seed=3)
    ours = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert ours == count_params(specs) == (2 * (2816 + 1536) if policy == "gqa" else 2 * (3584 + 1536))

    peft = _peft_model(path, specs, targets)
    trainable, _ = peft.get_nb_trainable_parameters()
    assert trainable == ours
    rng = np.random.default_rng(0)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.array(rng.normal(0, 0.05, m.lora_b.shape).astype(np.float32))
            mod = peft.get_submodule("base_model.model." + name)
            with torch.no_grad():
                mod.lora_A["default"].weight.copy_(torch.from_numpy(np.array(m.lora_a.T)))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(np.array(m.lora_b.T)))
                assert mod.scaling["default"] == m.scale
    ids = rng.integers(0, 32000, (2, 100))  # several times the window of 32
    ref = peft(torch.from_numpy(ids)).logits.detach().numpy()
    got = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    assert np.abs(got - np.array(fuse(model)(mx.array(ids)))).max() < 2e-4


def test_qlora_trains_only_adapters_and_fuses(tiny_models):
    model, _ = load(tiny_models("swa"), dtype="float32")
    quantize_model(model, group_size=64, bits=4)
    base_ids = mx.array(np.arange(70)[None] % 500)
    before = model(base_ids)
    apply_lora(model, "all-linear", rank=4, alpha=8)
    assert isinstance(model.layers[0].self_attn.k_proj.base, nn.QuantizedLinear)
    np.testing.assert_array_equal(np.array(model(base_ids)), np.array(before))  # B = 0: a no-op at start
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith((".lora_a", ".lora_b")) for k in names)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.trainable_parameters()))

    def loss(m):
        return m(base_ids).astype(mx.float32).square().mean()
    _, grads = nn.value_and_grad(model, loss)(model)
    assert all(float(mx.abs(g).max()) > 0 for k, g in tree_flatten(grads) if k.endswith("lora_b"))
    for m in (mm for _, mm in model.named_modules() if isinstance(mm, LoRALinear)):
        m.lora_b = mx.full(m.lora_b.shape, 0.01)
    adapted = np.array(model(base_ids))
    fused = np.array(fuse(model, dequantize=True)(base_ids))
    assert not any(isinstance(m, (LoRALinear, nn.QuantizedLinear)) for _, m in model.named_modules())
    np.testing.assert_allclose(fused, adapted, atol=1e-4, rtol=0)


def test_mixtral_router_and_experts_get_no_lora(tiny_models):
    model, _ = load(tiny_models("mixtral"), dtype="float32")
    specs = apply_lora(model, "all-linear", rank=4)
    assert {n.rsplit(".", 1)[1] for n in specs} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not isinstance(model.layers[0].block_sparse_moe.gate, LoRALinear)
    with pytest.raises(ValueError, match="experts"):
        plan_modules(model.args, ["q_proj", "gate_proj"])


def test_save_load_roundtrip_and_mismatch_refused(tiny_models, tmp_path):
    model, _ = load(tiny_models("swa"), dtype="float32")
    specs = apply_lora(model, ["q_proj", "k_proj", "v_proj"], rank=8, alpha=16, policy="gqa", floor=2)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    cfg = adapter_config(specs, base_model="tiny", args=model.args, targets=["q_proj", "k_proj", "v_proj"],
                         num_layers=-1, policy="gqa", rank=8, alpha=16, dropout=0.0)
    save_adapters(tmp_path, model, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules"]["model.layers.0.self_attn.k_proj"] == {"rank": 4, "alpha": 8.0, "in": 64, "out": 32}
    ids = mx.array([[1, 5, 9, 200] * 20])
    want = np.array(model(ids))

    fresh, _ = load(tiny_models("swa"), dtype="float32")
    load_adapters(fresh, tmp_path)
    np.testing.assert_array_equal(np.array(fresh(ids)), want)

    other, _ = load(tiny_models("mqa"), dtype="float32")  # one KV head: k_proj is 64 -> 16
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj.*\(64, 32\).*\(64, 16\)"):
        load_adapters(other, tmp_path)
