"""DPO / ORPO tensor code on MLX: per-sequence log-probs of packed preference rows and the reference pass.

One forward over packed rows (`core.pairs.PairRows`: several pairs per row, segment ids isolating every
sequence, positions restarting, the model's sliding window) gives logits (B, L, V). Position t predicts
`targets[t]` (the next token of the same segment); its log-prob

    logp[t] = logits[t, targets[t]] - logsumexp(logits[t])            (B, L)

is weighted by the completion mask of the target (`weights`) and summed per sequence by a scatter-add on
the local sequence index (`local`, -1 on padding):

    logp_sum[s] = sum_{t : local[t] == s} weights[t] * logp[t]        (n_seq,)

which is TRL's `(per_token_logps * completion_mask[:, 1:]).sum(1)` on a padded batch, sequence by
sequence. `full_weights` (every target) gives ORPO's NLL the same way. The reference is the same model with
its adapters switched off (`lora.set_adapters_enabled`), never a second copy of the weights; the losses are
core/preference.py's.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...core import adapters as core_adapters
from ...core import preference as pref
from .lora import set_adapters_enabled


def sequence_stats(model, tokens, seg, pos, targets, weights, local, n_seq: int, full_weights=None,
                   token_stats: bool = False) -> dict:
    """Per-sequence sums (n_seq,) over one packed batch: `logp`, `n` (+ `full_logp`, `full_n` with
    `full_weights`; + `entropy`, `mean_logit`, `top1` with `token_stats`, no gradient). Inputs (B, L)."""
    logits = model(tokens, segment_ids=seg, positions=pos).astype(mx.float32)  # (B, L, V)
    lse = mx.logsumexp(logits, axis=-1)  # (B, L)
    logp = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse  # (B, L)
    idx = mx.maximum(local, 0).reshape(-1)  # (B*L,) padding adds its zero weight to sequence 0

    def seg_sum(v):  # (B, L) -> (n_seq,)
        return mx.zeros((n_seq,), mx.float32).at[idx].add(v.reshape(-1))

    w = weights.astype(mx.float32)  # (B, L)
    out = {"logp": seg_sum(logp * w), "n": seg_sum(w)}
    if full_weights is not None:
        fw = full_weights.astype(mx.float32)  # (B, L)
        out["full_logp"], out["full_n"] = seg_sum(logp * fw), seg_sum(fw)
    if token_stats:
        sl = mx.stop_gradient(logits)  # (B, L, V)
        lp = sl - mx.stop_gradient(lse)[..., None]  # (B, L, V) log-softmax
        out["entropy"] = seg_sum(-(mx.exp(lp) * lp).sum(axis=-1) * w)
        out["mean_logit"] = seg_sum(sl.mean(axis=-1) * w)
        out["top1"] = seg_sum((mx.argmax(sl, axis=-1) == targets).astype(mx.float32) * w)
    return out


def adapters_off(model):
    """Inside: every adapter of `model` is switched off, so `model(...)` is the base model."""
    return core_adapters.adapters_off(model, set_adapters_enabled)


def reference_logps(model, tokens, seg, pos, targets, weights, local, n_seq: int):
    """Summed completion log-probs (n_seq,) of the base model (adapters off), as constants."""
    with adapters_off(model):
        out = sequence_stats(model, tokens, seg, pos, targets, weights, local, n_seq)["logp"]
    return mx.stop_gradient(out)


def reference_table(model, rows, batch_size: int = 4) -> np.ndarray:
    """(P, 2) float32 [chosen, rejected] summed completion log-probs of `model` as it is now, by pair id
    (full fine-tuning computes this once before step 1: the reference is the initial model)."""
    out = np.full((rows.n_pairs, 2), np.nan, np.float32)
    for i in range(0, len(rows), batch_size):
        *arrays, local, pair_ids = rows.take(np.arange(i, min(i + batch_size, len(rows))))
        st = sequence_stats(model, *(mx.array(a) for a in arrays[:5]), mx.array(local), 2 * len(pair_ids))
        logp = np.array(st["logp"])
        out[pair_ids, 0], out[pair_ids, 1] = logp[0::2], logp[1::2]
    return out


def micro_fn(cfg, slots: int):
    """`fn(model, tokens, seg, pos, targets, weights, full, local, ref, valid, n_pairs, nll_tokens)` ->
    (loss share, per-pair values): the policy pass of one micro-step (for `nn.value_and_grad`)."""
    def fn(model, tokens, seg, pos, targets, weights, full, local, ref, valid, n_pairs, nll_tokens):
        st = sequence_stats(model, tokens, seg, pos, targets, weights, local, 2 * slots,
                            full_weights=full if cfg.objective == "orpo" else None)
        return pref.micro_loss(cfg.objective, st, ref, valid, n_pairs, nll_tokens, cfg.beta, cfg.dpo_loss,
                               cfg.label_smoothing)

    return fn
