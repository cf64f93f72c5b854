"""DPO / ORPO tensor code on torch: the twin of backends/mlx/preference.py (see its docstring).

Logits are computed only where some weight is non-zero (`logits_at`), so prompt-only positions and padding
cost no LM head; per-sequence sums are an `index_add` on the local sequence index. The reference is the same
model with its adapters switched off (`lora.set_adapters_enabled`) under `no_grad`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...core import adapters as core_adapters
from ...core import preference as pref
from .lora import set_adapters_enabled


def sequence_stats(model, tokens, seg, pos, targets, weights, local, n_seq: int, full_weights=None,
                   token_stats: bool = False) -> dict:
    """Per-sequence sums (n_seq,) over one packed batch: `logp`, `n` (+ `full_logp`, `full_n`; + `entropy`,
    `mean_logit`, `top1` with `token_stats`, no gradient). Inputs (B, L) int64 tensors."""
    at = weights > 0 if full_weights is None else (weights > 0) | (full_weights > 0)  # (B, L)
    logits = model(tokens, segment_ids=seg, positions=pos, logits_at=at).float()  # (N, V)
    tgt = targets[at]  # (N,)
    logp = -F.cross_entropy(logits, tgt, reduction="none")  # (N,)
    idx = local[at].long()  # (N,)

    def seg_sum(v):  # (N,) -> (n_seq,)
        return torch.zeros(n_seq, dtype=torch.float32, device=v.device).index_add(0, idx, v)

    w = weights[at].float()  # (N,)
    out = {"logp": seg_sum(logp * w), "n": seg_sum(w)}
    if full_weights is not None:
        fw = full_weights[at].float()  # (N,)
        out["full_logp"], out["full_n"] = seg_sum(logp * fw), seg_sum(fw)
    if token_stats:
        with torch.no_grad():
            lp = F.log_softmax(logits, dim=-1)  # (N, V)
            out["entropy"] = seg_sum(-(lp.exp() * lp).sum(-1) * w)
            out["mean_logit"] = seg_sum(logits.mean(-1) * w)
            out["top1"] = seg_sum((logits.argmax(-1) == tgt).float() * w)
    return out


def adapters_off(model):
    """Inside: every adapter of `model` is switched off, so `model(...)` is the base model."""
    return core_adapters.adapters_off(model, set_adapters_enabled)


@torch.no_grad()
def reference_logps(model, tokens, seg, pos, targets, weights, local, n_seq: int) -> torch.Tensor:
    """Summed completion log-probs (n_seq,) of the base model (adapters off), without gradient."""
    with adapters_off(model):
        return sequence_stats(model, tokens, seg, pos, targets, weights, local, n_seq)["logp"]


def _tensors(arrays, device) -> tuple:
    return tuple(torch.as_tensor(np.asarray(a, np.int64), device=device) for a in arrays)


@torch.no_grad()
def reference_table(model, rows, batch_size: int = 4) -> np.ndarray:
    """(P, 2) float32 [chosen, rejected] summed completion log-probs of `model` as it is now, by pair id."""
    device = next(model.parameters()).device
    out = np.full((rows.n_pairs, 2), np.nan, np.float32)
    for i in range(0, len(rows), batch_size):
        *arrays, local, pair_ids = rows.take(np.arange(i, min(i + batch_size, len(rows))))
        st = sequence_stats(model, *_tensors(arrays[:5], device), *_tensors([local], device), 2 * len(pair_ids))
        logp = st["logp"].cpu().numpy()
        out[pair_ids, 0], out[pair_ids, 1] = logp[0::2], logp[1::2]
    return out


def micro_loss(model, cfg, slots: int, arrays, valid, ref, n_pairs: int, nll_tokens: int, device):
    """(loss share with gradient, per-pair values) of one preference micro-step: the reference pass
    (adapters off) when `ref` is None and the objective is DPO, then the policy pass."""
    tokens, seg, pos, targets, weights, full, local = _tensors(arrays, device)
    if ref is not None:
        ref = torch.as_tensor(ref, device=device)
    elif cfg.objective == "dpo":
        ref = reference_logps(model, tokens, seg, pos, targets, weights, local, 2 * slots)
    st = sequence_stats(model, tokens, seg, pos, targets, weights, local, 2 * slots,
                        full_weights=full if cfg.objective == "orpo" else None)
    return pref.micro_loss(cfg.objective, st, ref, torch.as_tensor(valid, device=device), n_pairs, nll_tokens,
                           cfg.beta, cfg.dpo_loss, cfg.label_smoothing)
