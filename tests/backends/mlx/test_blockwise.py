"""Blockwise attention, chunked layers and the chunked loss on MLX: equal to the dense path, exact to
transformers at long positions, and holding one block at a time in the backward pass.

Rows are >= 8 windows long; block sizes are not aligned to the documents or the window."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_mistral.backends.mlx import blockwise
from mlx_mistral.backends.mlx import model as M
from mlx_mistral.backends.mlx import trainer as T
from mlx_mistral.backends.mlx.loader import load_model
from mlx_mistral.backends.mlx.lora import apply_lora
from mlx_mistral.backends.mlx.model import Model, make_cache, packed_mask, positions_from_segments
from mlx_mistral.core import blocks
from mlx_mistral.core.config import ModelArgs
from mlx_mistral.core.masks import causal_mask

B, L, BLOCK = 2, 160, 24  # 10 windows of 16; blocks of 24 straddle windows and documents

SHAPES = {
    "swa": {},
    "full": dict(sliding_window=None),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "nemo": dict(hidden_size=80, head_dim=32, sliding_window=24),
    "tied": dict(tie_word_embeddings=True),
}


def tiny(**kw) -> Model:
    a = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=16, rope_theta=10000.0,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    a.update(kw)
    mx.random.seed(0)
    return Model(ModelArgs(**a))


def packed_batch(seed=0, vocab=128):
    """Two rows of documents of 5-60 tokens with padding at the end; targets and weights over documents."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, L), np.int32)
    for b in range(B):
        p, s = 0, 1
        while p < L - 7:
            n = int(rng.integers(5, 60))
            seg[b, p:p + n] = s
            p, s = p + n, s + 1
    tok = rng.integers(0, vocab, (B, L))
    pos = np.asarray(positions_from_segments(mx.array(seg)))
    return tok, seg, pos, rng.integers(0, vocab, (B, L)), (seg > 0).astype(np.float32)


def test_attention_blocks_equal_dense_with_gradients():
    mx.random.seed(1)
    H, n_kv, D, W = 4, 2, 16, 24
    q, k, v = mx.random.normal((B, H, L, D)), mx.random.normal((B, n_kv, L, D)), mx.random.normal((B, n_kv, L, D))
    seg = mx.array(packed_batch()[1])
    mask = packed_mask(seg, W)

    def dense(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)

    def bw(q, k, v):
        return blockwise.attention(q, k, v, D ** -0.5, blocks.plan(L, 20, W), W, seg)

    ct = mx.random.normal((B, H, L, D))
    (od,), gd = mx.vjp(dense, [q, k, v], [ct])
    (ob,), gb = mx.vjp(bw, [q, k, v], [ct])
    assert float(mx.abs(od - ob).max()) < 1e-5
    for a, b in zip(gd, gb):
        assert float(mx.abs(a - b).max()) < 1e-5
        assert float(mx.abs(a).max()) > 1e-2  # the gradients are not trivially zero
    compiled = mx.compile(lambda q, k, v: mx.vjp(bw, [q, k, v], [ct])[1])
    for a, b in zip(gd, compiled(q, k, v)):
        assert float(mx.abs(a - b).max()) < 1e-5


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_model_loss_and_gradients_equal_dense(shape, lora, monkeypatch):
    monkeypatch.setattr(T, "LOSS_CHUNK", 50)  # several loss and MLP chunks, not aligned to blocks
    monkeypatch.setattr(M, "LAYER_CHUNK", 70)
    m = tiny(**SHAPES[shape])
    if lora:
        m.freeze()
        apply_lora(m, rank=4, alpha=8)
    tok, seg, pos, tgt, w = packed_batch()
    results = {}
    for mode in ("dense", "blockwise"):
        for ckpt in (False, True):
            m.attention, m.attention_block, m.checkpoint_layers = mode, BLOCK, ckpt

            def loss_fn(model):
                rows, n = T.row_losses(model, tok, seg, pos, tgt, w)
                return rows.sum() / n

            loss, grads = nn.value_and_grad(m, loss_fn)(m)
            logits = m(mx.array(tok), segment_ids=mx.array(seg))
            mx.eval(loss, grads, logits)
            results[mode, ckpt] = float(loss), dict(tree_flatten(grads)), np.array(logits)
    ref_loss, ref_grads, ref_logits = results["dense", False]
    assert len(ref_grads) > 0 and max(float(mx.abs(g).max()) for g in ref_grads.values()) > 1e-3
    for key, (loss, grads, logits) in results.items():
        assert abs(loss - ref_loss) < 1e-5, key
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert float(mx.abs(g - ref_grads[name]).max()) < 1e-5, (key, name)
        assert np.abs(logits - ref_logits).max() < 1e-5, key


@pytest.mark.parametrize("shape", ["swa", "mixtral"])
def test_frozen_mlp_chunks_with_adapters_on_attention_only(shape, monkeypatch):
    """LoRA on q, k, v, o only: the chunked MLP (Mixtral: the router and experts) has no trainable parameter
    (a case MLX's custom VJP inside `mx.checkpoint` once got wrong); loss and gradients still equal the
    dense path."""
    monkeypatch.setattr(M, "LAYER_CHUNK", 50)
    m = tiny(**SHAPES[shape])
    m.freeze()
    apply_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8)
    tok, seg, pos, tgt, w = packed_batch(2)
    out = {}
    for mode in ("dense", "blockwise"):
        m.attention, m.attention_block, m.checkpoint_layers = mode, BLOCK, True

        def loss_fn(model):
            rows, n = T.row_losses(model, tok, seg, pos, tgt, w)
            return rows.sum() / n

        loss, grads = nn.value_and_grad(m, loss_fn)(m)
        mx.eval(loss, grads)
        out[mode] = float(loss), dict(tree_flatten(grads))
    assert abs(out["dense"][0] - out["blockwise"][0]) < 1e-5
    for k, g in out["dense"][1].items():
        assert float(mx.abs(g - out["blockwise"][1][k]).max()) < 1e-5, k


def test_auto_chooses_dense_for_short_rows_and_blocks_for_long():
    assert blocks.choose(512, 4096) is None and blocks.choose(512, 64) is None
    assert blocks.choose(8192, 4096) == 512 and blocks.choose(8192, 256) == 128 and blocks.choose(32768, None) == 128 and blocks.choose(8192, None) == 512
    assert blocks.choose(512, 64, "blockwise") == 64 and blocks.choose(8192, 64, "dense") is None
    assert blocks.choose(100, 64, "blockwise", block=256) == 100
    with pytest.raises(ValueError, match="attention must be one of"):
        blocks.choose(100, 64, "flash")
    d = blocks.describe(32768, 4096)
    assert d["attention"] == "blockwise" and d["attention_block"] == 512 and "32768" in d["attention_reason"]


def test_block_plan_covers_exactly_the_keys_the_rule_allows():
    """Every allowed (query, key) pair lies in its block's band: the band skips only masked keys."""
    _, seg, *_ = packed_batch(3)
    for W in (16, 40, None):
        for C in (7, 24, 64):
            plan = blocks.plan(L, C, W, seg)
            assert [p[0] for p in plan] == list(range(0, L, C))
            allowed = np.asarray(causal_mask(np.arange(L), np.arange(L), W))[None] & (seg[:, :, None] == seg[:, None, :])
            for q0, q1, k0 in plan:
                assert not allowed[:, q0:q1, :k0].any()  # nothing before the band is allowed
                assert allowed[:, q0:q1, k0:q1].any(axis=-1).all()  # every query sees something in its band
            if W is not None:
                assert blocks.peak_scores(L, C, W) <= C * (C + W - 1)


def _reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["swa", "full"])
def test_logits_match_transformers_at_8k_positions(tiny_models, kind):
    """A full forward of 8192 tokens (blockwise) against transformers, all positions; then generation with
    the rotating / growing cache after an 8k prefill against transformers' full forward."""
    path = tiny_models(kind, vocab_size=512)
    model = load_model(path)
    n = 8192
    x = np.random.default_rng(0).integers(3, 512, (1, n + 8))
    with torch.no_grad():
        ref = _reference(path)(torch.tensor(x)).logits.numpy()  # (1, n + 8, V)
    assert model.block_size(n) is not None  # auto: blockwise at 8k
    ours = np.array(model(mx.array(x[:, :n])))
    assert np.abs(ours - ref[:, :n]).max() < 1e-4
    cache = make_cache(model)
    model(mx.array(x[:, :n]), cache=cache)
    steps = [np.array(model(mx.array(x[:, n + i:n + i + 1]), cache=cache)) for i in range(8)]
    assert np.abs(np.concatenate(steps, axis=1) - ref[:, n:]).max() < 1e-4
    if model.args.sliding_window:
        assert all(c.size == model.args.sliding_window for c in cache)


def test_logits_match_transformers_at_32k_positions(tiny_models):
    """32768 tokens through the sliding-window model (blockwise): with 2 layers of window 32 the last
    positions see at most 64 tokens back, so transformers on the row's last 512 tokens at their true
    positions (position_ids 32256..32767) gives the exact reference for the last 448."""
    path = tiny_models("swa", vocab_size=512)
    model = load_model(path)
    n, tail = 32768, 512
    x = np.random.default_rng(1).integers(3, 512, (1, n))
    ours = np.array(model(mx.array(x))[:, -(tail - 64):])
    with torch.no_grad():
        ref = _reference(path)(torch.tensor(x[:, -tail:]),
                               position_ids=torch.arange(n - tail, n)[None]).logits.numpy()
    assert np.abs(ours - ref[:, 64:]).max() < 1e-4
    # exact at 32k positions only with transformers' inv_freq (mx.fast.rope's own base drifts with position)
    assert ref.std() > 0.05


def test_backward_holds_one_block_of_scores():
    """Peak memory of attention's backward at 4096 tokens, window 512: about one block's scores
    (not all blocks' at once, which the per-chunk dependency chain prevents)."""
    H, D, n, W = 8, 16, 4096, 512
    C = blocks.auto_block(W)  # 256
    q, k, v, ct = (mx.random.normal((1, H, n, D)) for _ in range(4))
    mx.eval(q, k, v, ct)
    plan = blocks.plan(n, C, W)

    def peak(fn):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(mx.vjp(fn, [q, k, v], [ct])[1])
        return mx.get_peak_memory() - base

    bw = peak(lambda q, k, v: blockwise.attention(q, k, v, D ** -0.5, plan, W))
    mask = causal_mask(mx.arange(n), mx.arange(n), W)
    dense = peak(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask))
    one_block = H * C * (C + W) * 4
    all_blocks = len(plan) * one_block
    io = 8 * H * n * D * 4  # q, k, v, the cotangent, the three gradients and their accumulators
    assert bw < 12 * one_block + io < all_blocks
    assert bw < 0.1 * dense
