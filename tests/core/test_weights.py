"""The weight-name table (core/weights.py): names and shapes both backends' models hold, HF <-> ours with
experts stacked or not, the RoPE permutation pair, and GGUF names, on numpy, MLX and torch arrays."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_mistral.backends.mlx.model import Model as MlxModel
from mlx_mistral.backends.torch.model import Model as TorchModel
from mlx_mistral.core.config import ModelArgs
from mlx_mistral.core.weights import (check_tensors, from_interleaved, gguf_name, hf_to_ours, ours_to_hf,
                                      param_shapes, rope_heads, to_interleaved)

SHAPES = {
    "dense": dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "nemo": dict(vocab_size=100, hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
    "mixtral": dict(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=3, num_experts_per_tok=2),
}


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_param_shapes_are_what_both_models_hold(kind):
    args = ModelArgs(**SHAPES[kind])
    want = param_shapes(args)
    assert {k: tuple(v.shape) for k, v in tree_flatten(MlxModel(args).parameters())} == want
    with torch.device("meta"):
        assert {k: tuple(v.shape) for k, v in TorchModel(args).state_dict().items()} == want
    assert sum(int(np.prod(s)) for s in want.values()) == args.param_count()


def test_hf_and_ours_round_trip_with_stacked_experts():
    args = ModelArgs(**SHAPES["mixtral"])
    rng = np.random.default_rng(0)
    ours = {k: rng.normal(size=s).astype(np.float32) for k, s in param_shapes(args).items()}
    hf = ours_to_hf(ours)
    assert "model.layers.1.block_sparse_moe.experts.2.w2.weight" in hf and not any("switch_mlp" in k for k in hf)
    assert hf["model.layers.0.block_sparse_moe.experts.1.w1.weight"].shape == (24, 32)  # (out, in)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4)  # a buffer old checkpoints carry
    for stack in (np.stack, mx.stack, torch.stack):
        conv = {k: v if stack is np.stack else (mx.array(v) if stack is mx.stack else torch.from_numpy(v))
                for k, v in hf.items()}
        back = hf_to_ours(conv, args, stack)
        assert back.keys() == ours.keys()
        assert all(np.array_equal(np.asarray(back[k]), ours[k]) for k in ours)
    del hf["model.layers.1.block_sparse_moe.experts.0.w3.weight"]
    with pytest.raises(ValueError, match="missing expert tensors: .*experts.0.w3"):
        hf_to_ours(hf, args, np.stack)


def test_rope_permutations_are_inverse_on_every_array_type():
    w = np.arange(4 * 2 * 8 * 3, dtype=np.float32).reshape(64, 3)  # 4 heads x head_dim 16, 3 columns
    p = to_interleaved(w, 4)
    assert not np.array_equal(p, w) and np.array_equal(from_interleaved(p, 4), w)
    # per head, HF's rows (x0..x7 | y0..y7) become llama.cpp's (x0, y0, x1, y1, ...)
    np.testing.assert_array_equal(p[:16:2], w[:8])
    np.testing.assert_array_equal(p[1:16:2], w[8:16])
    np.testing.assert_array_equal(np.array(to_interleaved(mx.array(w), 4)), p)
    np.testing.assert_array_equal(to_interleaved(torch.from_numpy(w), 4).numpy(), p)
    with pytest.raises(ValueError, match="not a multiple of 2 \\* heads"):
        to_interleaved(w[:60], 4)


def test_gguf_names_and_rope_heads():
    args = ModelArgs(**SHAPES["dense"])
    assert gguf_name("model.layers.1.self_attn.q_proj.weight")[0] == "blk.1.attn_q.weight"
    assert gguf_name("model.embed_tokens.weight")[0] == "token_embd.weight"
    assert gguf_name("model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight")[0] == "blk.0.ffn_down_exps.weight"
    with pytest.raises(ValueError, match="no llama.cpp equivalent"):
        gguf_name("model.layers.0.self_attn.q_proj.bias")
    assert rope_heads("model.layers.0.self_attn.q_proj.weight", args) == 4
    assert rope_heads("model.layers.0.self_attn.k_proj", args) == 2
    assert rope_heads("model.layers.0.self_attn.v_proj.weight", args) is None


def test_check_tensors_names_the_problem():
    want = {"a": (2, 3), "b": (4,)}
    check_tensors(want, dict(want), "x")
    with pytest.raises(ValueError, match=r"x does not match the model config: missing 1: b; unexpected 1: c"):
        check_tensors(want, {"a": (2, 3), "c": (1,)}, "x")
    with pytest.raises(ValueError, match=r"x: tensor a has shape \(3, 2\), the config implies \(2, 3\)"):
        check_tensors(want, {"a": (3, 2), "b": (4,)}, "x")
