"""Mistral, Mixtral and Mistral-Nemo in MLX, exact to transformers' implementation.

Notable:
- Sliding-window attention everywhere: in packed training rows (mask from segment ids, built once per
  step), in full-sequence forward passes, and in generation through a rotating KV cache that never holds
  more than `sliding_window` positions per layer.
- Grouped-query attention through `mx.fast.scaled_dot_product_attention`, which takes K/V with fewer heads
  natively: repeated K/V are never materialised.
- RoPE with per-token positions (packed rows restart positions per document): q/k are reshaped to
  (B*L, H, 1, D) so `mx.fast.rope` takes one offset per token.
- Nemo's explicit `head_dim` (128 while hidden/heads is 160).
- Mixtral's sparse MoE: softmax router, top-k, renormalised weights (as transformers), experts applied
  with `mx.gather_mm` over stacked weights: no Python loop over tokens or experts.
Parameter names follow transformers (`model.layers.N.self_attn.q_proj`), except Mixtral's experts which
are stacked as mlx-lm stores them (`block_sparse_moe.switch_mlp.gate_proj.weight`, (E, out, in)); the
renaming from any checkpoint format is core/weights.py's.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

import numpy as np

from ...core import blocks as block_plan
from ...core.config import ModelArgs
from ...core.masks import allowed, causal_mask
from . import blockwise

# Tokens per chunk of a chunked layer part (the MLP in a checkpointed layer's recomputation) and of the
# chunked loss: (chunk, intermediate) and (chunk, vocab) are the largest tensors they hold. LOSS_CHUNK None:
# `core.blocks.loss_chunk(vocab)`, the policy both backends and the planner share (512 at vocab 32k).
LAYER_CHUNK = 1024
LOSS_CHUNK: int | None = None


# ---- masks and positions (the rule is core/masks.py's) ------------------------------------------------
def packed_mask(segment_ids: mx.array, window: int | None = None) -> mx.array:
    """Boolean (B, 1, L, L) mask for packed rows: same segment AND causal AND within `window`.

    Documents are contiguous in a row, so row indices order tokens within a document exactly as their
    positions do; the window is measured on them.
    """
    idx = mx.arange(segment_ids.shape[-1])
    seg = segment_ids[:, :, None], segment_ids[:, None, :]  # (B, L, 1), (B, 1, L)
    return allowed(idx[:, None], idx[None, :], window, *seg)[:, None]  # (B, 1, L, L)


def positions_from_segments(segment_ids: mx.array) -> mx.array:
    """Positions that restart at 0 at every change of segment id along the row: (B, L) int32."""
    B, L = segment_ids.shape
    idx = mx.broadcast_to(mx.arange(L, dtype=mx.int32), (B, L))
    prev = mx.concatenate([mx.full((B, 1), -1, segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    starts = mx.where(segment_ids != prev, idx, 0)  # (B, L) start index at each document start
    return idx - mx.cummax(starts, axis=1)


# ---- KV caches ---------------------------------------------------------------------------------------
class KVCache:
    """Growing cache for full-attention models; storage grows in steps of `step` positions."""

    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # tokens seen so far == stored entries

    @property
    def size(self) -> int:
        return self.offset

    def key_positions(self, new: int) -> mx.array:
        """Absolute positions of the keys `update_and_fetch` will return for `new` more tokens."""
        return mx.arange(self.offset + new)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, H, L, D = k.shape  # (B, n_kv, L, D)
        prev = self.offset
        if self.keys is None or prev + L > self.keys.shape[2]:
            n = ((prev + L + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, n, D), k.dtype)
            new_v = mx.zeros((B, H, n, v.shape[3]), v.dtype)
            if self.keys is not None:
                new_k[:, :, :prev] = self.keys[:, :, :prev]
                new_v[:, :, :prev] = self.values[:, :, :prev]
            self.keys, self.values = new_k, new_v
        self.keys[:, :, prev:prev + L] = k
        self.values[:, :, prev:prev + L] = v
        self.offset += L
        return self.keys[:, :, :self.offset], self.values[:, :, :self.offset]


class RotatingKVCache:
    """Sliding-window cache: holds at most `window` positions; single-token steps overwrite the oldest."""

    def __init__(self, window: int):
        self.window = window
        self.keys = self.values = None
        self.offset = 0  # tokens seen so far
        self._next = 0  # slot the next single-token step overwrites once the buffer is full

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _ordered(self):
        if self._next == 0:
            return self.keys, self.values
        k = mx.concatenate([self.keys[:, :, self._next:], self.keys[:, :, :self._next]], axis=2)
        v = mx.concatenate([self.values[:, :, self._next:], self.values[:, :, :self._next]], axis=2)
        return k, v

    def key_positions(self, new: int) -> mx.array:
        return mx.arange(self.offset - self.size, self.offset + new)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        L = k.shape[2]
        if L == 1 and self.size == self.window:
            # Every stored key is within the window of the new query: overwrite the oldest, no mask.
            self.keys[:, :, self._next:self._next + 1] = k
            self.values[:, :, self._next:self._next + 1] = v
            self._next = (self._next + 1) % self.window
            self.offset += 1
            return self.keys, self.values
        if self.keys is not None:
            old_k, old_v = self._ordered()
            k = mx.concatenate([old_k, k], axis=2)  # (B, n_kv, size + L, D)
            v = mx.concatenate([old_v, v], axis=2)
        self.keys, self.values = k[:, :, -self.window:], v[:, :, -self.window:]
        self._next = 0
        self.offset += L
        return k, v  # everything the new queries may need; the mask trims it to the window


def make_cache(model: "Model") -> list:
    """One cache per layer: rotating for sliding-window models, growing otherwise."""
    w = model.args.sliding_window
    return [RotatingKVCache(w) if w else KVCache() for _ in model.layers]


# ---- layers ------------------------------------------------------------------------------------------
def rope_freqs(theta: float, dim: int) -> mx.array:
    """The wavelengths `mx.fast.rope` takes as `freqs`: 1 / transformers' fp32 `inv_freq`.

    `mx.fast.rope(base=theta)` derives its frequencies in its own arithmetic, which drifts from
    transformers' rotation with position (4.7e-4 at 8192 positions); from transformers' own fp32
    `inv_freq = 1 / theta ** (arange(0, dim, 2) / dim)` it stays within 5e-7."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)  # (dim/2,)
    return mx.array(np.float32(1.0) / inv_freq)


def apply_rope(x: mx.array, freqs: mx.array, positions: mx.array | None, offset: int) -> mx.array:
    """RoPE (HF's rotate-half layout) on (B, H, L, D), with per-token `positions` (B, L) if given."""
    B, H, L, D = x.shape
    if positions is None:
        return mx.fast.rope(x, D, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
    y = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)  # (B*L, H, 1, D): one offset per token
    y = mx.fast.rope(y, D, traditional=False, base=None, scale=1.0, offset=positions.reshape(-1), freqs=freqs)
    return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)  # (B, H, L, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim ** -0.5
        self.window = args.sliding_window
        self._freqs = rope_freqs(args.rope_theta, self.head_dim)  # underscore: not a parameter
        h = args.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def __call__(self, x, mask, positions=None, cache=None, blocks=None):
        """`mask`: the dense mask (or None / "causal"); with `blocks` (a `core.blocks.plan`), the packed
        rows' segment ids (B, L) or None, and attention runs blockwise."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv, L, D)
        v = self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv, L, D)
        offset = cache.offset if cache is not None else 0
        q = apply_rope(q, self._freqs, positions, offset)
        k = apply_rope(k, self._freqs, positions, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, n_kv, Lk, D)
        if blocks is not None:
            out = blockwise.attention(q, k, v, self.scale, blocks, self.window, mask)  # (B, H, L, D)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (B, H, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SwitchLinear(nn.Module):
    """E stacked linear maps (E, out, in); each token row is multiplied by the experts it selects."""

    def __init__(self, n_in: int, n_out: int, n_experts: int):
        super().__init__()
        s = 1 / math.sqrt(n_in)
        self.weight = mx.random.uniform(-s, s, (n_experts, n_out, n_in))

    def __call__(self, x, indices):
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        return QuantizedSwitchLinear.from_switch(self, group_size, bits)


class QuantizedSwitchLinear(nn.Module):
    """`SwitchLinear` with affine-quantized weights (used by `gather_qmm`)."""

    def __init__(self, n_in, n_out, n_experts, group_size=64, bits=4):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        w = mx.zeros((n_experts, n_out, n_in))
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits)
        self.freeze()

    @classmethod
    def from_switch(cls, sw: SwitchLinear, group_size, bits):
        E, out, n_in = sw.weight.shape
        q = cls(n_in, out, E, group_size, bits)
        q.weight, q.scales, q.biases = mx.quantize(sw.weight, group_size, bits)
        q.freeze()
        return q

    def __call__(self, x, indices):
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices, transpose=True,
                             group_size=self.group_size, bits=self.bits)


class SwitchGLU(nn.Module):
    def __init__(self, hidden: int, inter: int, n_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden, inter, n_experts)
        self.up_proj = SwitchLinear(hidden, inter, n_experts)
        self.down_proj = SwitchLinear(inter, hidden, n_experts)

    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))  # (B, L, 1, 1, hidden)
        h = nn.silu(self.gate_proj(x, indices)) * self.up_proj(x, indices)  # (B, L, k, 1, inter)
        return self.down_proj(h, indices).squeeze(-2)  # (B, L, k, hidden)


class SparseMoE(nn.Module):
    """Mixtral's block: softmax router, top-k experts, weights renormalised to sum to 1."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def __call__(self, x):
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)  # (B, L, E)
        inds = mx.stop_gradient(mx.argpartition(-probs, kth=self.k - 1, axis=-1)[..., :self.k])  # (B, L, k)
        scores = mx.take_along_axis(probs, inds, axis=-1)
        scores = scores / scores.sum(axis=-1, keepdims=True)  # (B, L, k)
        y = self.switch_mlp(x, inds)  # (B, L, k, hidden)
        return (y * scores[..., None].astype(y.dtype)).sum(axis=-2)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_moe:
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, positions=None, cache=None, blocks=None, chunk=None):
        """`chunk`: run the MLP (with its norm) on chunks of this many tokens (exact: it is per token)."""
        h = x + self.self_attn(self.input_layernorm(x), mask, positions, cache, blocks)
        ffn = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        norm = self.post_attention_layernorm
        if chunk is None or h.shape[1] <= chunk:
            return h + ffn(norm(h))

        def part(params, hc):
            ffn.update(params.get("ffn", {}))
            norm.update(params.get("norm", {}))
            return ffn(norm(hc))

        params = {"ffn": ffn.trainable_parameters(), "norm": norm.trainable_parameters()}
        return h + blockwise.chunked(part, params, h, chunk)


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """The causal LM: `model(tokens)` -> logits (B, L, vocab)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.checkpoint_layers = False  # per-layer gradient checkpointing (set by the trainer)
        self.attention = "auto"  # auto / dense / blockwise, and the block size (None: auto); see core/blocks.py
        self.attention_block = None
        self.chunk_layers = True  # chunked MLP in checkpointed layers (off with dropout: its masks are per shape)

    @property
    def layers(self):
        return self.model.layers

    def build_mask(self, L: int, segment_ids=None, cache=None):
        """The attention mask for this step (shared by every layer), or None / "causal" when implied."""
        w = self.args.sliding_window
        if segment_ids is not None:
            return packed_mask(segment_ids, w)  # (B, 1, L, L)
        if cache is not None:
            if L == 1:
                return None  # a rotating cache only returns keys inside the window
            c = cache[0]
            return causal_mask(mx.arange(c.offset, c.offset + L), c.key_positions(L), w)  # (L, Lk)
        if w is not None and L > w:
            return causal_mask(mx.arange(L), mx.arange(L), w)  # (L, L)
        return "causal"

    def block_size(self, L: int, cache=None) -> int | None:
        """The query block size for rows of L tokens, or None when this pass runs dense attention."""
        if cache is not None:
            return None  # generation: the rotating cache already bounds the keys to the window
        return block_plan.choose(L, self.args.sliding_window, self.attention, self.attention_block)

    def __call__(self, tokens=None, segment_ids=None, positions=None, cache=None, inputs_embeds=None):
        """Logits (B, L, vocab). Packed rows pass `segment_ids` (0 = padding) and optionally `positions`
        (default: restart at 0 per segment). `inputs_embeds` (B, L, hidden) replaces the token lookup."""
        return self.logits(self.hidden_states(tokens, segment_ids, positions, cache, inputs_embeds))

    def logits(self, h: mx.array) -> mx.array:
        """(B, L, vocab) from the final hidden states."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def head_parameters(self) -> dict:
        """The trainable parameters `logits` uses (for a chunked loss that differentiates them)."""
        if self.args.tie_word_embeddings:
            return {"model": {"embed_tokens": self.model.embed_tokens.trainable_parameters()}}
        return {"lm_head": self.lm_head.trainable_parameters()}

    def hidden_states(self, tokens=None, segment_ids=None, positions=None, cache=None, inputs_embeds=None):
        """The final normed hidden states (B, L, hidden); see `__call__`."""
        h = self.model.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds  # (B, L, hidden)
        L = h.shape[1]
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("packed rows (segment_ids) cannot be used with a KV cache")
            segment_ids = mx.array(segment_ids)
            if positions is None:
                positions = positions_from_segments(segment_ids)
        if positions is not None:
            positions = mx.array(positions).astype(mx.int32)
        C = self.block_size(L, cache)
        if C is None:
            mask, plan, chunk = self.build_mask(L, segment_ids, cache), None, None
        else:  # blockwise: each block builds its own small mask from the segment ids
            mask, plan = segment_ids, block_plan.plan(L, C, self.args.sliding_window)
            chunk = LAYER_CHUNK if self.checkpoint_layers and self.chunk_layers else None
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            if self.checkpoint_layers and c is None:
                h = _checkpointed(layer, plan, chunk)(h, mask, positions)
            else:
                h = layer(h, mask, positions, c, plan)
        return self.model.norm(h)  # (B, L, hidden)


def _checkpointed(layer: TransformerBlock, plan=None, chunk=None):
    """Recompute `layer` in the backward pass instead of storing its activations."""

    def inner(params, h, mask, positions):
        layer.update(params)
        return layer(h, mask, positions, None, plan, chunk)

    fn = mx.checkpoint(inner)
    return lambda h, mask, positions: fn(layer.trainable_parameters(), h, mask, positions)
