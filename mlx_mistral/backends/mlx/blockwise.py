"""Long rows at linear memory on MLX: blockwise attention, chunked layers and a chunked loss.

One mechanism serves all three, `serial_map`: a function applied chunk by chunk along the sequence, whose
backward pass recomputes one chunk, differentiates it and accumulates its gradients before the next chunk
starts. Recomputing per chunk is not enough on its own: MLX evaluates a step as one lazy graph, and
nothing in the gradient graph orders the chunks, so every chunk's recomputed scores can be alive at once
(measured: with per-block `mx.checkpoint`, the peak at window 4096, 8k tokens was exactly all blocks'
scores, L·(C+W)·H·8 bytes). Here chunk i+1's inputs are made to depend (`mx.depends`) on chunk i's
accumulated gradients, so MLX must finish chunk i — and can free its intermediates — before it starts
chunk i+1. The live memory of the backward is then one chunk's intermediates plus the accumulators.

- `attention`: queries in blocks from `core.blocks.plan`; block (q0, q1, k0) attends to keys [k0, q1) with
  the exact rule of the dense mask (`core.masks.allowed` on row indices, the window and segment ids).
  Each block's softmax is complete (the band holds every key the block may see), so a block's backward
  needs nothing from other blocks. GQA: queries are grouped (B, n_kv, rep, C, D) against (B, n_kv, 1, K, D)
  keys, so K/V are never repeated.
- `chunked`: a layer part (the MLP with its norm) applied to chunks of tokens, so a layer's recomputation
  never holds (L, intermediate) tensors.
- `chunked_loss`: the head and cross-entropy a chunk of tokens at a time: no (B, L, vocab) logits.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ...core.masks import allowed


def _take(x: mx.array, sl):
    """x[..., start:end, ...] on `sl` = (axis, start, end); None: x itself."""
    if sl is None:
        return x
    axis, s, e = sl
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(s, e)
    return x[tuple(idx)]


def serial_map(fn, params, inputs: list, slices: list, differentiable: list, out_axis: int | None):
    """Apply `fn(i, params, *chunk_inputs)` to chunks i = 0..n-1 and concatenate the results along
    `out_axis` (None: sum them), with a backward pass that runs one chunk at a time.

    `params`: a tree of arrays `fn` is differentiated by (a module's trainable parameters); `inputs`: arrays,
    input j of chunk i being `slices[i][j]` = (axis, start, end) of it or None for all of it; chunks may
    overlap (their gradients add up); with `out_axis`, chunk i's output covers input 0's slice of chunk i.
    `differentiable[j]`: False for integer inputs (segment ids, targets).
    """
    flat = tree_flatten(params)
    if not flat:
        # A custom function whose only differentiable input is one array was differentiated with the wrong
        # primals inside `mx.checkpoint` (MLX 0.32; seen with a frozen MLP): one dummy parameter avoids it.
        flat = [("_dummy", mx.zeros((1,), mx.float32))]
    names, n_p, n = [k for k, _ in flat], len(flat), len(slices)

    def run(i, pv, xs):
        tree = {} if names == ["_dummy"] else tree_unflatten(list(zip(names, pv)))
        return fn(i, tree, *xs)

    def out_slice(i):
        # chunk outputs tile the output along out_axis in the order and lengths of input 0's slices
        _, s, e = slices[i][0]
        return (out_axis, s - slices[0][0][1], e - slices[0][0][1])

    @mx.custom_function
    def f(*args):
        pv, xs = list(args[:n_p]), list(args[n_p:])
        outs, prev = [], None
        for i in range(n):
            xi = [_take(x, slices[i][j]) for j, x in enumerate(xs)]
            if prev is not None:
                xi = list(mx.depends(xi, prev))  # chunk i+1 after chunk i: one chunk's intermediates at a time
            o = run(i, pv, xi)
            outs.append(o)
            prev = [o]
        if out_axis is None:
            total = outs[0]
            for o in outs[1:]:
                total = total + o
            return total
        return mx.concatenate(outs, axis=out_axis)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        pv, xs = list(primals[:n_p]), list(primals[n_p:])
        d_idx = [j for j in range(len(xs)) if differentiable[j]]
        gp = [mx.zeros_like(p) for p in pv]
        gx = {j: mx.zeros_like(xs[j]) for j in d_idx}
        prev = None
        for i in range(n):
            xi = [_take(x, slices[i][j]) for j, x in enumerate(xs)]
            ct = _take(cotangent, out_slice(i) if out_axis is not None else None)
            if prev is not None:
                xi = list(mx.depends(xi, prev))

            def g(*dargs, i=i, xi=xi):
                xx = list(xi)
                for j, a in zip(d_idx, dargs[n_p:]):
                    xx[j] = a
                return run(i, list(dargs[:n_p]), xx)

            _, grads = mx.vjp(g, pv + [xi[j] for j in d_idx], [ct])
            gp = [a + b for a, b in zip(gp, grads[:n_p])]
            for j, gj in zip(d_idx, grads[n_p:]):
                sl = slices[i][j]
                if sl is None:
                    gx[j] = gx[j] + gj
                else:
                    axis, s, _ = sl
                    start = [0] * gx[j].ndim
                    start[axis] = s
                    gx[j] = mx.slice_update(gx[j], _take(gx[j], sl) + gj, mx.array(start), list(range(gx[j].ndim)))
            prev = gp + list(gx.values())
        return tuple(gp + [gx[j] if j in gx else mx.zeros_like(x) for j, x in enumerate(xs)])

    return f(*[v for _, v in flat], *inputs)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, blocks, window: int | None,
              segment_ids: mx.array | None = None) -> mx.array:
    """Exact (masked, windowed, packed) attention, blockwise: (B, H, L, D) from q (B, H, L, D) and
    k, v (B, n_kv, L, D); `blocks` from `core.blocks.plan`; `segment_ids` (B, L) for packed rows."""
    B, H, L, D = q.shape
    n_kv = k.shape[1]
    rep = H // n_kv

    def block(i, _params, qb, kb, vb, *seg):
        q0, q1, k0 = blocks[i]
        C, K = q1 - q0, q1 - k0
        qi, ki = mx.arange(q0, q1)[:, None], mx.arange(k0, q1)[None, :]  # (C, 1), (1, K)
        if seg:
            ok = allowed(qi, ki, window, seg[0][:, :, None], seg[1][:, None, :])[:, None, None]  # (B, 1, 1, C, K)
        else:
            ok = allowed(qi, ki, window)  # (C, K)
        qg = qb.reshape(B, n_kv, rep, C, D).astype(mx.float32) * scale  # (B, n_kv, rep, C, D)
        s = qg @ kb[:, :, None].astype(mx.float32).swapaxes(-1, -2)  # (B, n_kv, rep, C, K)
        p = mx.softmax(mx.where(ok, s, -mx.inf), axis=-1)  # (B, n_kv, rep, C, K)
        o = p.astype(vb.dtype) @ vb[:, :, None]  # (B, n_kv, rep, C, D)
        return o.reshape(B, H, C, D)

    inputs = [q, k, v] + ([segment_ids, segment_ids] if segment_ids is not None else [])
    slices = []
    for q0, q1, k0 in blocks:
        sl = [(2, q0, q1), (2, k0, q1), (2, k0, q1)]
        if segment_ids is not None:
            sl += [(1, q0, q1), (1, k0, q1)]
        slices.append(sl)
    diff = [True, True, True] + ([False, False] if segment_ids is not None else [])
    return serial_map(block, {}, inputs, slices, diff, out_axis=2)


def chunked(fn, params, x: mx.array, chunk: int) -> mx.array:
    """`fn(params, x_chunk)` over chunks of `chunk` tokens of x (B, L, ...), concatenated: for per-token
    functions (the MLP and its norm), exact, with one chunk's intermediates alive in the backward."""
    L = x.shape[1]
    slices = [[(1, s, min(L, s + chunk))] for s in range(0, L, chunk)]
    return serial_map(lambda i, p, xc: fn(p, xc), params, [x], slices, [True], out_axis=1)


def chunked_loss(head, params, h: mx.array, targets: mx.array, weights: mx.array, chunk: int) -> mx.array:
    """Per-row sums (B,) of weighted cross-entropy of `head(params, h_chunk)` logits against `targets`,
    a chunk of `chunk` tokens at a time (fp32); the (B, L, vocab) logits never exist."""
    L = h.shape[1]
    slices = [[(1, s, min(L, s + chunk))] * 3 for s in range(0, L, chunk)]

    def part(i, p, hc, tc, wc):
        logits = head(p, hc).astype(mx.float32)  # (B, c, vocab)
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]  # (B, c)
        return (ce * wc.astype(mx.float32)).sum(axis=1)  # (B,)

    return serial_map(part, params, [h, targets, weights], slices, [True, False, False], out_axis=None)
