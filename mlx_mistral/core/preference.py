"""Preference losses (DPO, ORPO) as pure functions of per-sequence log-probabilities: numpy, MLX, torch.

Every function takes arrays of one kind (numpy ndarrays, mlx arrays or torch tensors) and is written once:
the few operators used (`logaddexp`, `log1p`, `exp`, `expm1`, `log`, `where`, `zeros_like`, `.sum()`,
`.mean()`) exist under the same names in `numpy`, `mlx.core` and `torch`, so `_xp(x)` picks the module
(from `sys.modules`: this core module never imports a tensor library) and the formula is shared.
Gradients flow through the MLX and torch versions; reference log-probs must be constants (computed under
`stop_gradient` / `no_grad` by the backend).

Conventions are TRL 1.16's (`trl.DPOTrainer`, `trl.experimental.orpo.ORPOTrainer`), checked against TRL's
own code in tests/backends/test_preference_trl.py:
- DPO works on *summed* completion log-probs `logp = sum_t log p(y_t | x, y_<t)` (prompt tokens excluded,
  EOS included). delta = (pc - rc) - (pr - rr); reward_c = beta (pc - rc), reward_r = beta (pr - rr).
  sigmoid: -logsigmoid(beta delta). robust: (-(1-ls) logsigmoid(beta delta) + ls logsigmoid(-beta delta))
  / (1 - 2 ls). cdpo ("conservative DPO", sigmoid with label smoothing, which TRL 1.16's `sigmoid` no longer
  applies; TRL's `aot` reduces to it on one pair): -(1-ls) logsigmoid(beta delta) - ls logsigmoid(-beta delta).
  The loss is the mean over pairs.
- ORPO works on *averaged* completion log-probs `a = logp / n_completion_tokens`:
  log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar)); ratio = logsigmoid(log_odds);
  loss = nll - mean(beta * ratio), where nll is the mean token cross-entropy over *all* target tokens of
  the chosen sequences (prompt included; TRL: "computed over the full prompt and response"), token-weighted
  over the whole batch. Rewards are beta * a (no reference model).

A step's loss over a global batch is assembled from micro-steps: each adds its per-pair losses divided by
the global batch's pair count (and ORPO's NLL sums divided by its chosen-token count), both known from the
data before the step (pairs are packed whole), so accumulation and data parallelism change only speed.
Padding entries (a fixed number of pair slots per micro-step keeps compiled shapes static) carry
`valid = 0` and contribute nothing.
"""

from __future__ import annotations

import math
import sys

import numpy as np

OBJECTIVES = ("dpo", "orpo")
DPO_LOSSES = ("sigmoid", "robust", "cdpo")
LN2 = math.log(2.0)
# per-pair values gathered from every micro-step for the logged metrics (float64, global pair order)
PAIR_KEYS = {"dpo": ("loss", "chosen_rewards", "rejected_rewards", "policy_chosen", "policy_rejected"),
             "orpo": ("or_loss", "chosen_rewards", "rejected_rewards", "policy_chosen", "policy_rejected",
                      "ratio", "log_odds", "nll_sum", "nll_n")}


def _xp(x):
    """The array module of `x`: numpy, mlx.core or torch (same-named operators in all three). The module is
    already imported wherever such an array exists, so it is looked up, never imported here."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return sys.modules["torch"]
    if mod.startswith("mlx"):
        return sys.modules["mlx.core"]
    return np


def logsigmoid(x):
    """log(sigmoid(x)) = -log(1 + exp(-x)), stable for any sign (torch's F.logsigmoid formula)."""
    xp = _xp(x)
    return -xp.logaddexp(xp.zeros_like(x), -x)


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, switching at -ln 2 as TRL's ORPO does (Maechler's rule)."""
    xp = _xp(x)
    return xp.where(x < -LN2, xp.log1p(-xp.exp(x)), xp.log(-xp.expm1(x)))


def check_options(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """ValueError for a DPO setting TRL would ignore or reject (never drop one silently)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"DPO loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "sigmoid" and label_smoothing:
        raise ValueError("label_smoothing has no effect on TRL 1.16's DPO loss 'sigmoid'; use dpo_loss 'robust' "
                         "(Robust DPO) or 'cdpo' (conservative DPO) to smooth labels")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


# ---- DPO ---------------------------------------------------------------------------------------------------
def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO losses (P,) and per-pair quantities, all from *summed* completion log-probs (P,).

    Returns `(losses, terms)`: `terms` has `chosen_rewards`, `rejected_rewards` (beta * log-ratio) and the
    policy log-probs, each (P,)."""
    check_options(beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen - ref_chosen  # (P,)
    rejected_logratios = policy_rejected - ref_rejected  # (P,)
    z = beta * (chosen_logratios - rejected_logratios)  # (P,) beta * delta
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -logsigmoid(z)
    elif loss_type == "cdpo":
        losses = -(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z)
    else:  # robust (Chowdhury et al. 2024): unbiased under label flips with probability ls
        losses = (-(1 - ls) * logsigmoid(z) + ls * logsigmoid(-z)) / (1 - 2 * ls)
    terms = {"chosen_rewards": beta * chosen_logratios, "rejected_rewards": beta * rejected_logratios,
             "policy_chosen": policy_chosen, "policy_rejected": policy_rejected}
    return losses, terms


def reward_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """TRL's reward metrics (means over pairs); values are 0-d arrays of the inputs' kind."""
    c, r = chosen_rewards, rejected_rewards
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
            "rewards/accuracies": _xp(c).where(c > r, 1.0, 0.0).mean(),  # strict: a tie (step 0) is not correct
            "rewards/margins": (c - r).mean(),
            "logps/chosen": policy_chosen.mean(), "logps/rejected": policy_rejected.mean()}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """(mean loss over pairs, TRL's reward metrics): the whole DPO computation on one batch."""
    losses, t = dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type,
                          label_smoothing)
    return losses.mean(), reward_metrics(t["chosen_rewards"], t["rejected_rewards"], t["policy_chosen"],
                                         t["policy_rejected"])


def dpo_token_metrics(chosen: dict, rejected: dict) -> dict:
    """TRL DPO's token-level metrics from per-sequence token statistics (a backend's `sequence_stats` with
    `token_stats`): `entropy` over all completion tokens, `logits/chosen|rejected` (mean over completion
    tokens of the mean logit over the vocabulary), `mean_token_accuracy` (argmax == target, chosen only)."""
    n_c, n_r = chosen["n"].sum(), rejected["n"].sum()
    return {"entropy": (chosen["entropy"].sum() + rejected["entropy"].sum()) / (n_c + n_r),
            "logits/chosen": chosen["mean_logit"].sum() / n_c,
            "logits/rejected": rejected["mean_logit"].sum() / n_r,
            "mean_token_accuracy": chosen["top1"].sum() / n_c}


# ---- ORPO --------------------------------------------------------------------------------------------------
def orpo_terms(chosen_logp_sum, chosen_n, rejected_logp_sum, rejected_n, beta: float = 0.1):
    """Per-pair ORPO odds-ratio terms from summed completion log-probs and completion token counts (P,).

    Returns `(or_losses, terms)` with `or_losses = -beta * logsigmoid(log_odds)` (P,); the NLL part is
    token-weighted over the batch (see `orpo_loss`)."""
    ac = chosen_logp_sum / chosen_n  # (P,) average log-prob per completion token
    ar = rejected_logp_sum / rejected_n  # (P,)
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))  # (P,)
    ratio = logsigmoid(log_odds)  # (P,)
    terms = {"chosen_rewards": beta * ac, "rejected_rewards": beta * ar, "policy_chosen": ac,
             "policy_rejected": ar, "ratio": ratio, "log_odds": log_odds}
    return -beta * ratio, terms


def orpo_loss(chosen_logp_sum, chosen_n, rejected_logp_sum, rejected_n, chosen_nll_sum, chosen_nll_n,
              beta: float = 0.1):
    """(loss, metrics) of ORPO on one batch, TRL's definition and metric names.

    `chosen_nll_sum` (P,): summed token cross-entropy over every target of each chosen sequence (prompt and
    completion); `chosen_nll_n` (P,) their counts. loss = sum(nll) / sum(n) - mean(beta * logsigmoid(log_odds))."""
    or_losses, t = orpo_terms(chosen_logp_sum, chosen_n, rejected_logp_sum, rejected_n, beta)
    nll = chosen_nll_sum.sum() / chosen_nll_n.sum()
    metrics = reward_metrics(t["chosen_rewards"], t["rejected_rewards"], t["policy_chosen"], t["policy_rejected"])
    metrics.update({"nll_loss": nll, "log_odds_ratio": t["ratio"].mean(), "log_odds_chosen": t["log_odds"].mean()})
    return nll + or_losses.mean(), metrics


# ---- one micro-step of a global batch -------------------------------------------------------------------------
def micro_loss(objective: str, stats: dict, ref_logp, valid, n_pairs: int, nll_tokens: int, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """(this micro-step's share of the step loss, per-pair values `PAIR_KEYS[objective]`).

    `stats`: per-sequence sums of a backend's forward, (2S,) each, chosen at 2j and rejected at 2j + 1 of S
    pair slots: `logp`, `n` (completion targets) and, for ORPO, `full_logp`, `full_n` (every target).
    `ref_logp` (2S,): the reference's summed completion log-probs (DPO; constants). `valid` (S,): 1 for a
    real pair slot, 0 for padding. `n_pairs`, `nll_tokens`: the global batch's pair count and ORPO's chosen
    target tokens."""
    c_logp, r_logp = stats["logp"][0::2], stats["logp"][1::2]  # (S,)
    if objective == "dpo":
        losses, t = dpo_terms(c_logp, r_logp, ref_logp[0::2], ref_logp[1::2], beta, loss_type, label_smoothing)
        return (losses * valid).sum() / n_pairs, {"loss": losses, **t}
    if objective != "orpo":
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    pad = 1 - valid  # empty slots: log-prob -1 over one token, so neither 0/0 nor log(1 - e^0) appears
    nll_sum, nll_n = -stats["full_logp"][0::2], stats["full_n"][0::2]  # (S,)
    or_losses, t = orpo_terms(c_logp - pad, stats["n"][0::2] + pad, r_logp - pad, stats["n"][1::2] + pad, beta)
    loss = (nll_sum * valid).sum() / nll_tokens + (or_losses * valid).sum() / n_pairs
    return loss, {"or_loss": or_losses, "nll_sum": nll_sum, "nll_n": nll_n, **t}


def step_metrics(objective: str, per_pair: dict) -> tuple[float, dict]:
    """(step loss, TRL's metrics) in float64 from the per-pair values of a whole global batch (numpy, global
    pair order): the numbers a step logs do not depend on how its pairs were split into micro-steps."""
    p = {k: np.asarray(v, np.float64) for k, v in per_pair.items()}
    m = reward_metrics(p["chosen_rewards"], p["rejected_rewards"], p["policy_chosen"], p["policy_rejected"])
    if objective == "dpo":
        loss = p["loss"].mean()
    else:
        nll = p["nll_sum"].sum() / max(p["nll_n"].sum(), 1.0)
        loss = nll + p["or_loss"].mean()
        m.update({"nll_loss": nll, "log_odds_ratio": p["ratio"].mean(), "log_odds_chosen": p["log_odds"].mean()})
    return float(loss), {k: float(v) for k, v in m.items()}


def to_floats(metrics: dict) -> dict:
    """Plain Python floats (for events and logs) from 0-d numpy / mlx / torch values."""
    return {k: float(v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): (low, high)."""
    if n <= 0:
        raise ValueError("accuracy_interval needs n > 0")
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half
