"""Blockwise attention, the chunked MLP and the chunked loss on torch against the dense path, and the model
against transformers at 8k and 32k positions.

The dense path (SDPA with `packed_mask`) is itself checked against transformers in test_torch_model.py; here
blockwise must equal it within 1e-5 (fp32) in logits, loss and every gradient (LoRA adapters and the base
weights alike), on rows >= 8 windows long, with block sizes aligned to neither the window nor the documents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlx_mistral
from mlx_mistral.backends.torch import blockwise
from mlx_mistral.backends.torch import model as tm
from mlx_mistral.backends.torch.lora import apply_lora, lora_modules
from mlx_mistral.backends.torch.trainer import TorchTrainer, prepare_model, token_losses
from mlx_mistral.core import blocks
from mlx_mistral.core.loop import Rows
from mlx_mistral.core.packing import pack
from mlx_mistral.core.train_config import TrainConfig

VOCAB = 32000


def random_segments(rng, B: int, L: int, max_doc: int, pad: int = 0) -> np.ndarray:
    """(B, L) segment ids: documents of random lengths 1..max_doc, then `pad` padding (0) at each row's end."""
    seg = np.zeros((B, L), np.int64)
    for b in range(B):
        pos, s = 0, 1
        while pos < L - pad:
            n = min(int(rng.integers(1, max_doc + 1)), L - pad - pos)
            seg[b, pos:pos + n] = s
            pos, s = pos + n, s + 1
    return seg


# ---- the attention function alone -------------------------------------------------------------------------
@pytest.mark.parametrize("window,block,n_kv", [(16, 24, 2), (40, 7, 1), (None, 33, 2), (64, 64, 4)])
def test_block_attention_equals_dense_sdpa(window, block, n_kv):
    B, H, L, D = 2, 4, 8 * (window or 24) + 5, 8
    rng = np.random.default_rng(block)
    gen = torch.Generator().manual_seed(block)
    q = torch.randn(B, H, L, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, n_kv, L, D, generator=gen, requires_grad=True) for _ in range(2))
    seg = torch.tensor(random_segments(rng, B, L, max_doc=3 * (window or 40), pad=11))
    plan = blockwise.BlockPlan.build(L, block, window, seg)
    assert len(plan.blocks) >= 5 and any(k0 > 0 for _, _, k0 in plan.blocks)
    got = blockwise.attention(q, k, v, plan, D ** -0.5)  # (B, H, L, D)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=tm.packed_mask(seg, window), scale=D ** -0.5,
                                          enable_gqa=n_kv != H)
    assert (got - want).abs().max() < 1e-5
    g = torch.randn(B, H, L, D, generator=gen)
    ours = torch.autograd.grad((got * g).sum(), (q, k, v))
    theirs = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() < 1e-5 and b.abs().max() > 0.1


def test_chunked_applies_row_wise_functions_exactly():
    x = torch.randn(3, 50, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    fn = lambda t: torch.tanh(t @ w)  # noqa: E731
    got = blockwise.chunked(fn, x, 7)
    want = fn(x)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-6
    for a, b in zip(torch.autograd.grad(got.sum(), (x, w)), torch.autograd.grad(want.sum(), (x, w))):
        assert (a - b).abs().max() < 1e-5


# ---- the model: blockwise == dense, in logits, loss and every gradient -----------------------------------
# (tiny kind, overrides, block size, row length): windows 16-32, rows >= 8 windows, blocks aligned to neither
CASES = {
    "swa": ("swa", dict(sliding_window=16), 24, 8 * 16 + 21),
    "full": ("full", {}, 40, 203),
    "mixtral": ("mixtral", {}, 40, 8 * 32 + 9),
    "nemo": ("nemo", {}, 17, 8 * 24 + 3),  # head_dim 32 != hidden 80 / 4 heads
    "mqa": ("mqa", {}, 24, 8 * 16 + 5),
}


def adapted(tiny_models, kind, overrides):
    """The tiny model with LoRA on every linear (random lora_b) and its base weights trainable too."""
    model, _ = mlx_mistral.load(tiny_models(kind, **overrides), backend="torch", dtype="float32")
    apply_lora(model, rank=4, alpha=8, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.05)
    return model.requires_grad_(True)


def batch(seed: int, L: int, window: int | None):
    rng = np.random.default_rng(seed)
    seg = random_segments(rng, 2, L, max_doc=3 * (window or 60), pad=13)
    tokens = rng.integers(3, VOCAB, (2, L))
    targets = rng.integers(3, VOCAB, (2, L))
    weights = (seg > 0).astype(np.int64)
    weights[:, ::7] = 0  # some masked prompt tokens
    pos = tm.positions_from_segments(torch.tensor(seg))
    return tuple(torch.tensor(a) for a in (tokens, seg)) + (pos,) + tuple(torch.tensor(a) for a in (targets, weights))


def run(model, mode, block, arrays, loss_chunk=None, checkpoint=False):
    model.attention_mode, model.attention_block = mode, block
    model.checkpoint_layers = checkpoint
    model.zero_grad(set_to_none=True)
    tokens, seg, pos, targets, weights = arrays
    with torch.no_grad():
        logits = model(tokens, segment_ids=seg, positions=pos)  # (B, L, vocab)
    s, n = token_losses(model, *arrays, loss_chunk=loss_chunk)
    (s / n).backward()  # the trainer's loss: the mean over loss tokens
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.attention_mode, model.attention_block, model.checkpoint_layers = "auto", None, False
    return logits, float(s.detach()), float(n), grads


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_equals_dense_in_logits_loss_and_gradients(tiny_models, case):
    kind, overrides, block, L = CASES[case]
    model = adapted(tiny_models, kind, overrides)
    w = model.args.sliding_window
    assert w is None or (16 <= w <= 64 and L >= 8 * w and block % w and w % block)
    arrays = batch(len(case), L, w)
    plan = blockwise.BlockPlan.build(L, block, w, arrays[1])
    assert model.attention_path(L, "cpu") == ("sdpa", None)  # short rows: auto stays dense
    dense = run(model, "dense", None, arrays)
    blk = run(model, "blockwise", block, arrays, loss_chunk=53, checkpoint=True)
    assert len(plan.blocks) >= 5 and blk[3].keys() == dense[3].keys()
    assert (blk[0] - dense[0]).abs().max() < 1e-5 and dense[0].std() > 0.05
    assert abs(blk[1] - dense[1]) < 1e-5 * max(1.0, abs(dense[1])) and blk[2] == dense[2]
    names = [k for k in dense[3] if k.endswith(("lora_a", "lora_b"))]
    assert len(names) == 2 * len(lora_modules(model)) >= 2 * 4 * model.args.num_hidden_layers
    for k, g in dense[3].items():
        assert (blk[3][k] - g).abs().max() < 1e-5, k
    assert all(dense[3][k].abs().max() > 0 for k in names)


def test_chunked_loss_equals_dense_cross_entropy(tiny_models):
    model = adapted(tiny_models, "swa", {})
    arrays = batch(5, 150, model.args.sliding_window)
    tokens, seg, pos, targets, weights = arrays
    at = weights > 0
    params = [p for p in model.parameters()]
    logits = model(tokens, segment_ids=seg, positions=pos)[at]  # (N, vocab): the dense reference
    wf = weights[at].float()
    want = (F.cross_entropy(logits, targets[at], reduction="none") * wf).sum()
    gw = torch.autograd.grad(want, params)
    for chunk in (1000, 61):
        got, n = token_losses(model, *arrays, loss_chunk=chunk)
        assert abs(float(got.detach()) - float(want.detach())) < 1e-5 * float(want.detach()) and float(n) == float(wf.sum())
        for a, b in zip(torch.autograd.grad(got, params), gw):
            assert (a - b).abs().max() < 1e-5
    assert blockwise.loss_chunk(32768) == 512 and blockwise.loss_chunk(32000) == 512
    assert blockwise.loss_chunk(131072) == 128 and blockwise.loss_chunk(10 ** 9) == 1


def test_attention_path_choice_and_errors(tiny_models):
    model, _ = mlx_mistral.load(tiny_models("swa"), backend="torch", dtype="float32")
    w = model.args.sliding_window
    assert model.attention_path(512, "cpu") == ("sdpa", None)
    assert model.attention_path(4096, "cpu") == ("blockwise", blocks.auto_block(w))
    model.attention_mode = "dense"
    assert model.attention_path(4096, "cpu") == ("sdpa", None)
    model.attention_mode, model.attention_block = "blockwise", 24
    assert model.attention_path(100, "cpu") == ("blockwise", 24)
    model.attn_impl = "flex"
    assert model.attention_path(100, "cpu") == ("blockwise", 24)  # the explicit choice wins
    model.attention_mode = "auto"
    assert model.attention_path(4096, "cpu") == ("flex", None)  # CUDA's path keeps its block mask
    model.attention_mode = "sparse"
    with pytest.raises(ValueError, match="attention must be one of auto, dense, blockwise"):
        model(torch.zeros(1, 8, dtype=torch.long))
    model.attention_mode, model.attention_block = "blockwise", 0
    with pytest.raises(ValueError, match="attention_block must be a positive"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_trainer_blockwise_steps_equal_dense(tiny_models, tmp_path):
    path = tiny_models("swa", sliding_window=16)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, VOCAB, int(rng.integers(10, 300))).astype(np.int32) for _ in range(12)]
    rows = Rows.from_packed(pack(docs, 160))  # 10 windows per row
    out = {}
    for mode in ("dense", "blockwise"):
        cfg = TrainConfig(steps=2, batch_size=2, grad_accum=1, seq_len=160, lr=2e-3, warmup_steps=0,
                          eval_every=0, save_every=0, lora_rank=4, lora_alpha=8, lora_dropout=0.0, compile=False,
                          grad_checkpoint=mode == "blockwise", attention=mode, attention_block=24,
                          out=str(tmp_path / mode)).validate()
        model, _ = mlx_mistral.load(path, backend="torch", dtype="float32")
        lc = prepare_model(model, cfg, str(path))
        events = []
        TorchTrainer(model, cfg, rows, callbacks=[events.append], lora_config=lc, model_name=str(path)).run()
        out[mode] = events
    start = {m: next(e for e in ev if e["event"] == "start") for m, ev in out.items()}
    assert (start["blockwise"]["attention"], start["blockwise"]["attention_block"]) == ("blockwise", 24)
    assert (start["dense"]["attention"], start["dense"]["attention_block"]) == ("sdpa", None)
    losses = {m: [e["loss"] for e in ev if e["event"] == "train"] for m, ev in out.items()}
    assert len(losses["dense"]) == 2
    assert np.abs(np.array(losses["dense"]) - np.array(losses["blockwise"])).max() < 1e-5


# ---- RoPE and attention at 8k and 32k positions, against transformers -----------------------------------
LONG = [8192, pytest.param(32768, marks=pytest.mark.slow)]  # 32k: ~10-40 s on 2 busy CPU cores


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    cache = {}

    def get(window):
        if window not in cache:
            cache[window] = long_models(tmp_path_factory.mktemp(f"long-{window}"), window)
        return cache[window]

    return get


def long_models(tmp_path, window):
    """A tiny transformers Mistral (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256) and ours from it."""
    from transformers import MistralConfig, MistralForCausalLM

    from mlx_mistral.backends.torch.loader import load_model

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                        max_position_embeddings=65536, rope_theta=10000.0)
    ref = MistralForCausalLM(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    ref.save_pretrained(tmp_path)
    return ref.eval(), load_model(tmp_path, dtype="float32", device="cpu")


def test_rope_equals_transformers_inv_freq():
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    cfg = MistralConfig(hidden_size=128, num_attention_heads=4, rope_theta=1e6, max_position_embeddings=40000)
    pos = torch.arange(32768 - 512, 32768)[None]  # (1, 512)
    cos, sin = MistralRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    ours = tm.rope_cos_sin(pos, 32, 1e6, torch.float32)
    assert (ours[0][:, 0] - cos).abs().max() == 0 and (ours[1][:, 0] - sin).abs().max() == 0


@pytest.mark.parametrize("window", [64, None])
@pytest.mark.parametrize("length", LONG)
def test_logits_at_long_positions_match_transformers(long_pair, window, length):
    """Full forward at `length` tokens (auto picks blockwise) against transformers: with a window, the last
    256 logits depend only on the last 256 + 2 (W - 1) tokens, so transformers runs on a 512-token suffix at
    the true positions; without one, our full row runs at 8k and both run a 512-token row at the last
    positions at 32k (a 32k full-attention row is minutes on CPU)."""
    ref, ours = long_pair(window)
    x = torch.tensor(np.random.default_rng(length).integers(0, 256, (1, length)))
    pos = torch.arange(length)[None]
    tail = slice(length - 512, length)
    with torch.no_grad():
        if window is None and length > 8192:
            got = ours(x[:, tail], positions=pos[:, tail])[0, -256:]  # (256, vocab)
        else:
            assert ours.attention_path(length, "cpu")[0] == "blockwise"
            got = ours(x)[0, -256:]
        if window is None and length <= 8192:
            want = ref(x).logits[0, -256:]
        else:
            want = ref(x[:, tail], position_ids=pos[:, tail]).logits[0, -256:]
    assert want.std() > 0.05
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("length", LONG)
def test_rotating_cache_decoding_after_long_prefill(long_pair, length):
    """Prefill `length` tokens through the window-64 rotating cache in chunks, decode 4 more one at a time:
    equal to transformers on the row's suffix at its true positions, and at 8k to our full (blockwise)
    forward (at 32k that forward is test_logits_at_long_positions_match_transformers')."""
    ref, ours = long_pair(64)
    n = length + 4
    x = torch.tensor(np.random.default_rng(1).integers(0, 256, (1, n)))
    with torch.no_grad():
        cache = tm.make_cache(ours)
        for s in range(0, length, 2048):
            ours(x[:, s:min(s + 2048, length)], cache=cache)
        steps = torch.cat([ours(x[:, i:i + 1], cache=cache) for i in range(length, n)], dim=1)[0]  # (4, vocab)
        assert all(c.size == 64 for c in cache) and cache[0].offset == n
        full = ours(x)[0, -4:] if length <= 8192 else None
        want = ref(x[:, n - 512:], position_ids=torch.arange(n - 512, n)[None]).logits[0, -4:]
    assert full is None or (steps - full).abs().max() < 1e-4
    assert (steps - want).abs().max() < 1e-4
