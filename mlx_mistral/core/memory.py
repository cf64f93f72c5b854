"""Memory planner: predict a training run's peak memory from the config alone, and find what fits.

Pure functions of `ModelArgs` and the training settings; nothing is allocated. The estimate sums:
- weights at their bits: quantized matrices (every linear, the embedding and the head, as `quantize_model`
  does) cost bits/8 bytes per weight plus a scale and a bias per group of `group_size` in the base dtype;
  norms stay in the base dtype;
- trainable state: fp32 parameters (LoRA; for full fine-tuning the fp32 weights themselves), their
  gradients, AdamW's two moments, and an accumulation buffer when `grad_accum > 1`;
- activations kept for the backward pass, per token per layer (the projections' outputs, the MLP's four
  intermediate-size tensors, norms and residuals) plus the attention probabilities (heads x keys per
  token); with checkpointing only each layer's input is kept and one layer is recomputed at a time;
- the logits and their gradient (batch x seq x vocab, fp32, two live copies in the loss; three in a DPO
  step).
DPO and ORPO (`objective`) train on the same packed rows, so the step is SFT's: DPO's reference pass (adapters
off, or precomputed once for full fine-tuning) keeps no activations and is freed before the policy pass,
and no second model is held; measured, a DPO step keeps one more (B, L, vocab) fp32 buffer than SFT and
ORPO do (`DPO_EXTRA_LOGIT_COPIES`).
The constants were fitted to `mx.get_peak_memory()` on the CPU backend (tests/core/test_memory.py checks
them to within 20% on tiny and small models); treat predictions for large models as estimates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelArgs

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Fitted constants (see module doc): live copies of the (B, L, vocab) fp32 logits in the loss and its
# gradient; (B, H, L, L) attention tensors a layer keeps for the backward pass; layers' worth of
# activations alive while one checkpointed layer is recomputed and differentiated.
LOGIT_COPIES = 2.0
ATTN_COPIES = 2.0
RECOMPUTE_LAYERS = 2.0
DPO_EXTRA_LOGIT_COPIES = 1.0
OBJECTIVES = ("sft", "dpo", "orpo")


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per component; `total` is the predicted peak."""

    weights: int
    trainable: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.optimizer + self.activations + self.logits

    def as_dict(self) -> dict:
        return {"weights": self.weights, "trainable": self.trainable, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "total": self.total}


def weight_bytes(args: ModelArgs, bits: int | None = None, group_size: int = 64, dtype: str = "float32") -> int:
    """Bytes of the base weights: matrices at `bits` (None: the dtype), norms at the dtype."""
    db = _DTYPE_BYTES[dtype]
    n_all = args.param_count()
    n_norm = args.num_hidden_layers * 2 * args.hidden_size + args.hidden_size
    n_mat = n_all - n_norm
    if not bits:
        return n_all * db
    per_weight = bits / 8 + 2 * db / group_size  # packed value + (scale, bias) per group
    return int(n_mat * per_weight) + n_norm * db


def activation_bytes(args: ModelArgs, batch: int, seq_len: int, checkpoint: bool, dtype: str = "float32") -> int:
    """Activations kept for the backward pass (excluding the logits)."""
    db = _DTYPE_BYTES[dtype]
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    if args.is_moe:  # each token runs k experts; the router's probabilities are small
        i = i * args.num_experts_per_tok
    # attention probabilities are dense over all L keys: the window is a mask, not a shorter tensor
    per_token = (6 * h + 2 * q + 3 * kv + q + 4 * i) * db + ATTN_COPIES * args.num_attention_heads * seq_len * 4
    layer = batch * seq_len * per_token
    mask = batch * seq_len * seq_len  # boolean (B, 1, L, L), shared by the layers
    if checkpoint:
        return int(args.num_hidden_layers * batch * seq_len * h * db + RECOMPUTE_LAYERS * layer + mask)
    return int(args.num_hidden_layers * layer + mask)


def estimate(args: ModelArgs, *, batch_size: int, seq_len: int, fine_tune: str = "lora", trainable_params: int = 0,
             bits: int | None = None, group_size: int = 64, dtype: str = "float32", grad_checkpoint: bool = False,
             grad_accum: int = 1, objective: str = "sft") -> Estimate:
    """Predicted peak memory of one training step. `fine_tune`: "lora" (adapters) or "full";
    `trainable_params`: the LoRA parameter count (ignored for full fine-tuning, where every parameter trains
    in fp32); `objective`: sft, dpo or orpo."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if fine_tune == "full":
        if bits:
            raise ValueError("full fine-tuning keeps fp32 weights: it cannot use a quantized base")
        weights = weight_bytes(args, None, group_size, "float32")
        n = args.param_count()
        trainable = 4 * n * (2 if grad_accum > 1 else 1)  # gradients (+ accumulation buffer)
        optimizer = 8 * n
        act_dtype = "float32"
    else:
        weights = weight_bytes(args, bits, group_size, dtype)
        n = trainable_params
        trainable = 4 * n * (3 if grad_accum > 1 else 2)  # fp32 weights, gradients (+ accumulation)
        optimizer = 8 * n
        act_dtype = dtype
    acts = activation_bytes(args, batch_size, seq_len, grad_checkpoint, act_dtype)
    copies = LOGIT_COPIES + (DPO_EXTRA_LOGIT_COPIES if objective == "dpo" else 0.0)
    logits = int(copies * batch_size * seq_len * args.vocab_size * 4)
    return Estimate(int(weights), int(trainable), int(optimizer), acts, logits)


def parse_size(text: str) -> int:
    """'16GB', '16 GiB', '512MB', '24g' -> bytes (GB = 1e9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 16GB or 24GiB")
    num, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    power = " kmgt".index(unit or " ")
    return int(num * (1024 if binary else 1000) ** power)


def propose(args: ModelArgs, budget: int, *, seq_lens=(512, 1024, 2048, 4096, 8192), batch_sizes=(1, 2, 4, 8, 16),
            headroom: float = 0.85, **kw) -> list[dict]:
    """Settings that fit `headroom * budget`, best first: the most tokens per step, then without
    checkpointing (faster) before with it. Each entry: seq_len, batch_size, grad_checkpoint, estimate."""
    fits = []
    for L in seq_lens:
        for B in batch_sizes:
            for ckpt in (False, True):
                e = estimate(args, batch_size=B, seq_len=L, grad_checkpoint=ckpt, **kw)
                if e.total <= headroom * budget:
                    fits.append({"seq_len": L, "batch_size": B, "grad_checkpoint": ckpt, "estimate": e})
    fits.sort(key=lambda f: (-f["seq_len"] * f["batch_size"], f["grad_checkpoint"], -f["seq_len"]))
    return fits
