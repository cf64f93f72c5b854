"""Mistral, Mixtral and Mistral-Nemo in torch: the MLX backend's model, for NVIDIA GPUs (and CPUs).

Notable:
- The same `ModelArgs` and the same parameter names as the MLX model (transformers' names; Mixtral's
  experts stacked (E, out, in) as `block_sparse_moe.switch_mlp.{gate,up,down}_proj.weight`), so one
  weight-name table and one adapter file serve both backends.
- Attention for packed rows with a sliding window, built once per step and shared by every layer: on CUDA
  `flex_attention` with a block mask from segment ids and the window (blocks outside the window or in
  another document are skipped, not computed); elsewhere, for long rows, blockwise attention (blockwise.py:
  query blocks over their key bands, each checkpointed, so memory is linear in the row length, and the MLP
  runs a chunk of tokens at a time), and for short rows SDPA with the boolean mask. `attention_mode`
  ("auto", "dense", "blockwise") and `attention_block` force a path or a block size. No path repeats K/V
  for GQA. With `targets`, the forward returns token losses computed a chunk of tokens at a time instead of
  (B, L, vocab) logits.
- RoPE with per-token positions (restarting per document), cos/sin computed in fp32 as transformers does.
- Mixtral: softmax router in fp32, top-k, weights renormalised (transformers' routing); token rows are
  sorted by expert and each expert runs one matmul over its rows (a loop over experts, none over tokens).
- Generation through a KV cache that keeps at most `sliding_window` positions per layer.
- Masks follow the one rule of core/masks.py, in SDPA's boolean masks and flex_attention's `mask_mod` alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core import blocks
from ...core.config import ModelArgs
from ...core.masks import allowed, causal_mask
from . import blockwise
from .blockwise import BlockPlan


# ---- masks and positions (the rule is core/masks.py's) ------------------------------------------------
def packed_mask(segment_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, L, L) for packed rows: same segment AND causal AND within `window` (padding, segment 0,
    attends to the padding before it, so no row is fully masked)."""
    idx = torch.arange(segment_ids.shape[-1], device=segment_ids.device)
    seg = segment_ids[:, :, None], segment_ids[:, None, :]  # (B, L, 1), (B, 1, L)
    return allowed(idx[:, None], idx[None, :], window, *seg)[:, None]  # (B, 1, L, L)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every change of segment id along the row: (B, L) int64."""
    B, L = segment_ids.shape
    idx = torch.arange(L, device=segment_ids.device).expand(B, L)
    prev = F.pad(segment_ids[:, :-1], (1, 0), value=-1)  # (B, L) the id before each token
    starts = torch.where(segment_ids != prev, idx, 0)  # (B, L) start index at each document start
    return idx - starts.cummax(dim=1).values


def flex_block_mask(segment_ids: torch.Tensor | None, window: int | None, B: int, L: int, device):
    """A `flex_attention` BlockMask for causal (+ window, + same-segment) attention over L tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        if segment_ids is None:
            return allowed(q, kv, window)
        return allowed(q, kv, window, segment_ids[b, q], segment_ids[b, kv])

    return create_block_mask(mask_mod, B if segment_ids is not None else None, None, L, L, device=device)


def flex_available(device: torch.device) -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda"


_FLEX = {}


def _flex_attention(q, k, v, block_mask, scale):
    """`flex_attention`, compiled on CUDA (uncompiled it materialises the scores, as a reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        fn = _FLEX.setdefault("compiled", torch.compile(flex_attention, dynamic=False))
    else:
        fn = flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


# ---- KV cache ------------------------------------------------------------------------------------------
class KVCache:
    """Keys/values of past tokens; with a `window`, only the last `window` positions are kept."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.keys = self.values = None
        self.offset = 0  # tokens seen so far

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def key_positions(self, new: int, device=None) -> torch.Tensor:
        """Absolute positions of the keys `update_and_fetch` returns for `new` more tokens (new > 1)."""
        return torch.arange(self.offset - self.size, self.offset + new, device=device)

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor):
        L = k.shape[2]
        if self.keys is not None:
            k = torch.cat([self.keys, k], dim=2)  # (B, n_kv, size + L, D)
            v = torch.cat([self.values, v], dim=2)
        self.offset += L
        if self.window is not None:
            self.keys, self.values = k[:, :, -self.window:], v[:, :, -self.window:]
            if L == 1:  # a single step sees exactly the stored window: no mask needed
                return self.keys, self.values
        else:
            self.keys, self.values = k, v
        return k, v  # everything the new queries may need; the mask trims it to the window


def make_cache(model: "Model") -> list[KVCache]:
    return [KVCache(model.args.sliding_window) for _ in model.model.layers]


# ---- layers ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin (B, 1, L, D) for per-token `positions` (B, L), computed in fp32 (HF's rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float) / head_dim))  # (D/2,)
    freqs = positions[..., None].float() * inv_freq  # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim ** -0.5
        h = args.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x, mask, cos, sin, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, L, D)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, L, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, n_kv, Lk, D)
        if isinstance(mask, BlockPlan):
            out = blockwise.attention(q, k, v, mask, self.scale)  # (B, H, L, D)
        elif mask is not None and not isinstance(mask, (torch.Tensor, str)):  # a flex BlockMask
            out = _flex_attention(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask if isinstance(mask, torch.Tensor) else None, is_causal=isinstance(mask, str),
                scale=self.scale, enable_gqa=self.n_kv != self.n_heads)  # (B, H, L, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwitchLinear(nn.Module):
    """E stacked linear maps, `weight` (E, out, in)."""

    def __init__(self, n_in: int, n_out: int, n_experts: int):
        super().__init__()
        s = 1 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(n_experts, n_out, n_in).uniform_(-s, s))


class SwitchGLU(nn.Module):
    """E SwiGLU experts; rows are grouped by expert so each expert is one matmul over its rows."""

    def __init__(self, hidden: int, inter: int, n_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden, inter, n_experts)
        self.up_proj = SwitchLinear(hidden, inter, n_experts)
        self.down_proj = SwitchLinear(inter, hidden, n_experts)

    def forward(self, x: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
        N, k = inds.shape  # x (N, hidden), inds (N, k)
        flat = inds.reshape(-1)  # (N*k,) expert of each (token, slot)
        order = flat.argsort(stable=True)  # (N*k,) rows grouped by expert
        rows = x[order // k]  # (N*k, hidden)
        counts = torch.bincount(flat, minlength=self.gate_proj.weight.shape[0]).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                xe = rows[start:start + n]  # (n, hidden)
                h = F.silu(xe @ self.gate_proj.weight[e].T) * (xe @ self.up_proj.weight[e].T)  # (n, inter)
                outs.append(h @ self.down_proj.weight[e].T)  # (n, hidden)
                start += n
        y = torch.cat(outs)[order.argsort()]  # (N*k, hidden) back in (token, slot) order
        return y.view(N, k, -1)


class SparseMoE(nn.Module):
    """Mixtral's block: softmax router (fp32), top-k experts, weights renormalised to sum to 1."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def forward(self, x):
        B, L, D = x.shape
        x = x.reshape(-1, D)  # (N, hidden)
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        scores, inds = probs.topk(self.k, dim=-1)  # (N, k)
        scores = scores / scores.sum(dim=-1, keepdim=True)
        y = self.switch_mlp(x, inds)  # (N, k, hidden)
        return (y * scores[..., None]).sum(dim=1).to(x.dtype).view(B, L, D)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_moe:
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, mask, cos, sin, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cos, sin, cache)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        if isinstance(mask, BlockPlan):  # long rows: never an (L, intermediate) tensor
            return h + blockwise.chunked(lambda t: ffn(self.post_attention_layernorm(t)), h, mask.ffn_chunk)
        return h + ffn(self.post_attention_layernorm(h))


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """The causal LM: `model(tokens)` -> logits (B, L, vocab), as `model.Model` in MLX."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.checkpoint_layers = False  # per-layer activation checkpointing (set by the trainer)
        self.attn_impl = "auto"  # "auto" (flex on CUDA, else sdpa), "flex" or "sdpa"
        self.attention_mode = "auto"  # "auto", "dense" or "blockwise" (core/blocks.py; set by the trainer)
        self.attention_block = None  # query block size of the blockwise path (None: core.blocks.auto_block)
        self.ffn_chunk = None  # tokens per MLP chunk on the blockwise path (None: blockwise.default_ffn_chunk)

    @property
    def layers(self):
        return self.model.layers

    def attention_path(self, L: int, device) -> tuple[str, int | None]:
        """How a full forward pass over rows of `L` tokens attends: ("blockwise", block size), ("flex", None)
        or ("sdpa", None). Blockwise when `attention_mode` is "blockwise", or "auto" off CUDA for long rows
        (`core.blocks.choose`); on CUDA "auto" keeps flex_attention, whose block mask skips the same blocks."""
        impl = self.attn_impl
        if impl not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attn_impl must be 'auto', 'flex' or 'sdpa', got {impl!r}")
        if impl == "auto":
            impl = "flex" if flex_available(device) else "sdpa"
        mode = self.attention_mode
        if mode == "blockwise" or (mode == "auto" and impl == "sdpa"):
            c = blocks.choose(L, self.args.sliding_window, mode, self.attention_block)
            if c is not None:
                return "blockwise", c
        elif mode not in blocks.MODES:
            raise ValueError(f"attention must be one of {', '.join(blocks.MODES)}, got {mode!r}")
        return impl, None

    def build_mask(self, B: int, L: int, device, segment_ids=None, cache=None):
        """This step's attention mask for every layer: a `BlockPlan`, a bool tensor, a flex BlockMask,
        "causal" or None."""
        w = self.args.sliding_window
        if cache is not None:
            if L == 1:
                return None  # the cache returns only keys the new token may see
            c = cache[0]
            return causal_mask(torch.arange(c.offset, c.offset + L, device=device), c.key_positions(L, device), w)
        impl, block = self.attention_path(L, device)
        if impl == "blockwise":
            return BlockPlan.build(L, block, w, segment_ids, self.ffn_chunk)
        if impl == "flex":
            return flex_block_mask(segment_ids, w, B, L, device)
        if segment_ids is not None:
            return packed_mask(segment_ids, w)  # (B, 1, L, L)
        if w is not None and L > w:
            idx = torch.arange(L, device=device)
            return causal_mask(idx, idx, w)  # (L, L)
        return "causal"

    def forward(self, tokens=None, segment_ids=None, positions=None, cache=None, inputs_embeds=None,
                logits_at=None, targets=None, loss_chunk=None):
        """Logits (B, L, vocab). Packed rows pass `segment_ids` (0 = padding) and optionally `positions`
        (default: restart at 0 per segment). `inputs_embeds` (B, L, hidden) replaces the token lookup.
        `logits_at` (B, L) bool: only those positions' logits, (N, vocab) (the trainer's loss positions).
        `targets` (N,) with `logits_at`: instead of logits, the token losses -log p(target) (N,) fp32,
        computed `loss_chunk` tokens at a time (default `blockwise.loss_chunk(vocab)`), each chunk
        checkpointed, so the (N, vocab) logits never exist at once."""
        device = self.model.embed_tokens.weight.device
        if inputs_embeds is None:
            h = self.model.embed_tokens(torch.as_tensor(tokens, device=device))  # (B, L, hidden)
        else:
            h = inputs_embeds
        B, L, _ = h.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("packed rows (segment_ids) cannot be used with a KV cache")
            segment_ids = torch.as_tensor(segment_ids, device=device)
            if positions is None:
                positions = positions_from_segments(segment_ids)
        if positions is None:
            start = cache[0].offset if cache is not None else 0
            positions = torch.arange(start, start + L, device=device).expand(B, L)
        positions = torch.as_tensor(positions, device=device)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, h.dtype)  # (B, 1, L, D)
        mask = self.build_mask(B, L, device, segment_ids, cache)
        for i, layer in enumerate(self.model.layers):
            if self.checkpoint_layers and cache is None and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, mask, cos, sin, use_reentrant=False)
            else:
                h = layer(h, mask, cos, sin, cache[i] if cache is not None else None)
        h = self.model.norm(h)
        if logits_at is not None:
            h = h[logits_at]  # (N, hidden): the LM head is a quarter of a small model's FLOPs
        if targets is not None:
            if logits_at is None:
                raise ValueError("targets (token losses) need logits_at, the (B, L) positions they belong to")
            chunk = loss_chunk or blockwise.loss_chunk(self.args.vocab_size)
            return blockwise.token_nll(self.head, h, torch.as_tensor(targets, device=device), chunk)  # (N,)
        return self.head(h)  # (B, L, vocab)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of final hidden states (..., hidden)."""
        if self.args.tie_word_embeddings:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)
