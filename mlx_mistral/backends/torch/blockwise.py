"""Blockwise attention and chunked row-wise layers on torch: the plan of core/blocks.py run with torch ops.

Notable:
- A block of queries [q0, q1) attends to its key band [k0, q1) only; its small (C, q1 - k0) mask is
  `core.masks.allowed` on row indices and segment ids, exactly the dense rule, so packing isolation and the
  window hold as in `model.packed_mask`. The band never cuts off a key that rule allows (core/blocks.py).
- GQA without repeated K/V: the block's queries are reshaped to (B, n_kv, rep * C, D), so the rep query
  heads of a K/V head share one matmul against its keys.
- With gradients on, every block runs under `torch.utils.checkpoint` (non-reentrant, so it nests inside
  the per-layer checkpoint): the backward recomputes one block's scores at a time, H x C x (C + W) floats,
  instead of holding H x L x L. Scores and softmax are fp32 (transformers' eager attention does the same).
- `chunked` runs a row-wise function (the MLP, the LM head and its cross-entropy) a chunk of tokens at a
  time, each chunk checkpointed, so no (L, intermediate) or (L, vocab) tensor is ever held whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...core import blocks
from ...core.masks import allowed


@dataclass(frozen=True)
class BlockPlan:
    """One forward pass's blockwise attention, shared by every layer: the blocks (q0, q1, k0) of
    `core.blocks.plan`, the window, the (B, L) segment ids (None: one document per row) and the token chunk
    of the MLP."""

    blocks: tuple[tuple[int, int, int], ...]
    block: int
    window: int | None
    segment_ids: torch.Tensor | None
    ffn_chunk: int

    @classmethod
    def build(cls, L: int, block: int, window: int | None, segment_ids: torch.Tensor | None,
              ffn_chunk: int | None = None) -> "BlockPlan":
        seg = None if segment_ids is None else np.asarray(segment_ids.detach().cpu())
        return cls(blocks.plan(L, block, window, seg), block, window, segment_ids,
                   ffn_chunk or default_ffn_chunk(block))


def default_ffn_chunk(block: int) -> int:
    """Tokens per MLP chunk: 4 query blocks, at least 256 (a (chunk, intermediate) tensor stays small)."""
    return max(256, 4 * block)


def _block(q, k, v, segment_ids, q0: int, q1: int, k0: int, window: int | None, scale: float):
    """Attention of queries [q0, q1) over keys [k0, q1): (B, H, C, D)."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    rep, C, K = H // n_kv, q1 - q0, q1 - k0
    qb = q[:, :, q0:q1].reshape(B, n_kv, rep * C, D)  # (B, n_kv, rep*C, D): head h = g * rep + r
    kb, vb = k[:, :, k0:q1], v[:, :, k0:q1]  # (B, n_kv, K, D)
    s = (qb @ kb.transpose(-1, -2)).float().view(B, n_kv, rep, C, K) * scale  # (B, n_kv, rep, C, K)
    qi = torch.arange(q0, q1, device=q.device)[:, None]  # (C, 1)
    ki = torch.arange(k0, q1, device=q.device)[None, :]  # (1, K)
    if segment_ids is None:
        ok = allowed(qi, ki, window)  # (C, K)
    else:
        ok = allowed(qi, ki, window, segment_ids[:, q0:q1, None], segment_ids[:, None, k0:q1])  # (B, C, K)
        ok = ok[:, None, None]  # (B, 1, 1, C, K)
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).to(vb.dtype)  # (B, n_kv, rep, C, K)
    out = p.view(B, n_kv, rep * C, K) @ vb  # (B, n_kv, rep*C, D)
    return out.view(B, H, C, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the plan's blocks: q (B, H, L, D), k and v (B, n_kv, L, D) ->
    (B, H, L, D), equal to the dense masked attention."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    for q0, q1, k0 in plan.blocks:
        args = (q, k, v, plan.segment_ids, q0, q1, k0, plan.window, scale)
        outs.append(checkpoint(_block, *args, use_reentrant=False) if grad else _block(*args))  # (B, H, C, D)
    return torch.cat(outs, dim=2)  # (B, H, L, D)


def chunked(fn, x: torch.Tensor, chunk: int, *rest: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`fn(x, *rest)` for a function that treats every token alone, a `chunk` of tokens along `dim` at a
    time (each chunk checkpointed when gradients are on), concatenated along `dim`."""
    n = x.shape[dim]
    if n <= chunk:
        return fn(x, *rest)
    grad = torch.is_grad_enabled()
    outs = []
    for i in range(0, n, chunk):
        part = [t.narrow(dim, i, min(chunk, n - i)) for t in (x, *rest)]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part))
    return torch.cat(outs, dim=dim)


# ---- the loss, a chunk of tokens at a time ----------------------------------------------------------------
loss_chunk = blocks.loss_chunk  # tokens per chunk of the LM head and cross-entropy: one policy for both backends


def token_nll(head, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """-log p(target) (N,) fp32 of hidden states `h` (N, hidden) under the LM head `head`, computed `chunk`
    tokens at a time: the (N, vocab) logits never exist at once."""

    def nll(hc, tc):  # (c, hidden), (c,) -> (c,)
        return F.cross_entropy(head(hc).float(), tc, reduction="none")

    return chunked(nll, h, chunk, targets, dim=0)
