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

Two attention paths (`attention` and `attention_block`, the config keys; `core.blocks.choose` decides):
- dense: one (B, H, L, L) score tensor per layer, the window only a mask (the model above);
- blockwise: queries in blocks of C tokens, each block's backward recomputing its scores over its key band
  (at most C + W - 1 keys; up to L without a window) one block at a time, so attention holds one block's
  scores, B x H x C x band, instead of B x H x L x L. Checkpointed layers are recomputed with the MLP in
  chunks of `mlp_chunk` tokens (no (L, intermediate) tensor, Mixtral's experts included), and the SFT
  loss computes logits `loss_chunk` tokens at a time (no (B, L, vocab) tensor; DPO / ORPO still take whole
  rows' log-probs). What grows with L: each checkpointed layer's input (B, L, hidden) and, in the one layer
  being recomputed, its projections, attention output, residuals and their gradients. Without
  checkpointing every layer keeps its activations as on the dense path, less the scores.
Calibration of the blockwise path: the per-token counts (`BLOCKWISE_LAYER_SCALE`, `LOSS_HIDDEN_COPIES`) are
counts of the tensors the path keeps; `CHUNK_LOGIT_COPIES` and `BLOCKWISE_SCORE_BYTES` were fitted to
`mx.get_peak_memory()` of compiled MLX training steps (the trainer's default) on a 4-layer hidden-256
vocab-32k model, rows of 2k-16k tokens with window 256 and 4k-8k without a window, and 4k-8k without
checkpointing (`NOCKPT_EXTRA_LOGIT_COPIES`), with loss chunks of `core.blocks.loss_chunk(vocab)` (512
tokens): predictions within 0.88-1.18x of the measured peaks (BENCHMARKS.md has the table;
tests/core/test_memory.py checks four long rows to 20%). The measured peaks do not grow smoothly with L
(window 256: 2k -> 4k +0.11 GB, 4k -> 8k +0.03 GB, 8k -> 16k +0.07 GB): MLX's scheduling of the chunks
moves the peak between phases; the planner draws a line through them, above them at 16k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .blocks import choose, loss_chunk as default_loss_chunk, peak_scores
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

# ---- blockwise path (see "Calibration" above) ----
# Bytes per (query, key) pair of the one live block in a backward pass: counted, fp32 scores, masked scores,
# probabilities and their gradient would be 16; fitted, 12 (measured without a window, where the block's
# band is the whole row: rows of 4k fit 8 bytes, two fp32 copies live at once, rows of 8k fit 16, all four;
# 12 keeps both within 20%, and which copies MLX keeps at once is its scheduler's choice, not ours).
BLOCKWISE_SCORE_BYTES = 12.0
# The one recomputed layer's full-length tensors at its peak, the attention's backward, per token: forward,
# the attention norm's output and the residual (2 h), q, k, v and rotated q, k (2 q + 3 kv), the attention
# output (q); backward, the incoming gradient (h), the attention output's (q), the accumulated q, k, v
# gradients and their update (2 q + 4 kv): 3 h + 6 q + 7 kv elements. The MLP chunk: its four
# intermediate-size tensors and two hidden-size ones, with their gradients. BLOCKWISE_LAYER_SCALE is the
# factor a measurement fits on these counts (1.0: the count as is).
BLOCKWISE_LAYER_SCALE = 1.0
# fp32 copies of one projection's LoRA side path alive at once (its input cast to fp32, its fp32 output).
BLOCKWISE_LORA_FP32_COPIES = 2.0
# Tokens per chunk of the checkpointed layer's MLP (MLX's model.LAYER_CHUNK); the SFT loss's chunk is
# `core.blocks.loss_chunk(vocab)`, both backends' policy.
MLP_CHUNK = 1024
# Live (B, chunk, vocab) fp32 copies in one chunk of the loss (counted: logits, their log-softmax, the
# gradient; fitted: 5, as mx.compile keeps about one more chunk's worth and the forward's chunk overlaps the
# backward's), and (B, L, hidden) copies the chunked loss holds (its input, the input's gradient, the
# gradient's update; measured alone: 4.4 copies of the input, of which the input itself is counted elsewhere).
CHUNK_LOGIT_COPIES = 5.0
# More of them without per-layer checkpointing: fitted (4k and 8k rows: 1.65 / 2.05 GB measured, the per-token
# slope as counted), not explained; the step's whole-row activations are alive while the loss chunks run.
NOCKPT_EXTRA_LOGIT_COPIES = 4.0
LOSS_HIDDEN_COPIES = 3.0
# Row lengths `longest_row` tries: powers of two and the 1.5x steps between them, 512 .. 131072.
ROW_LENGTHS = tuple(sorted({b << k for k in range(9) for b in (512, 768)} - {768 << 8}))


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per component; `total` is the predicted peak. `attention`: the attention scores (and
    the dense path's mask); `block`: the query block size of the blockwise path, None for dense."""

    weights: int
    trainable: int
    optimizer: int
    activations: int
    logits: int
    attention: int = 0
    block: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.optimizer + self.activations + self.attention + self.logits

    @property
    def path(self) -> str:
        """"dense" or "blockwise"."""
        return "dense" if self.block is None else "blockwise"

    def as_dict(self) -> dict:
        """The components in bytes, and the total."""
        return {"weights": self.weights, "trainable": self.trainable, "optimizer": self.optimizer,
                "activations": self.activations, "attention": self.attention, "logits": self.logits,
                "total": self.total}


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


def dense_attention_bytes(args: ModelArgs, batch: int, seq_len: int, checkpoint: bool) -> int:
    """The dense path's (B, H, L, L) fp32 attention tensors kept for the backward pass (every layer's, or
    the recomputed layers' with checkpointing) and the boolean (B, 1, L, L) mask the layers share."""
    per_layer = ATTN_COPIES * batch * args.num_attention_heads * seq_len * seq_len * 4
    layers = RECOMPUTE_LAYERS if checkpoint else args.num_hidden_layers
    return int(layers * per_layer + batch * seq_len * seq_len)


def activation_bytes(args: ModelArgs, batch: int, seq_len: int, checkpoint: bool, dtype: str = "float32") -> int:
    """Activations the dense path keeps for the backward pass (excluding the logits), attention included."""
    db = _DTYPE_BYTES[dtype]
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    if args.is_moe:  # each token runs k experts; the router's probabilities are small
        i = i * args.num_experts_per_tok
    # attention probabilities are dense over all L keys: the window is a mask, not a shorter tensor
    layer = batch * seq_len * (6 * h + 2 * q + 3 * kv + q + 4 * i) * db
    attn = dense_attention_bytes(args, batch, seq_len, checkpoint)
    if checkpoint:
        return int(args.num_hidden_layers * batch * seq_len * h * db + RECOMPUTE_LAYERS * layer + attn)
    return int(args.num_hidden_layers * layer + attn)


def blockwise_activation_bytes(args: ModelArgs, batch: int, seq_len: int, checkpoint: bool, block: int,
                               dtype: str = "float32", mlp_chunk: int = MLP_CHUNK, lora: bool = True) -> tuple[int, int]:
    """(activations, attention) of the blockwise path: what the layers keep for the backward pass, and the
    one live block's scores (its band: C + W - 1 keys with a window, up to L without). `lora`: adapters'
    fp32 side paths are counted."""
    db = _DTYPE_BYTES[dtype]
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    if args.is_moe:
        i = i * args.num_experts_per_tok
    attention = int(BLOCKWISE_SCORE_BYTES * batch * args.num_attention_heads
                    * peak_scores(seq_len, block, args.sliding_window))
    if not checkpoint:  # every layer keeps its activations as on the dense path, but no scores
        return int(args.num_hidden_layers * batch * seq_len * (6 * h + 2 * q + 3 * kv + q + 4 * i) * db), attention
    side = BLOCKWISE_LORA_FP32_COPIES * 4 if lora else 0  # bytes per element of a projection's fp32 side path
    inputs = args.num_hidden_layers * batch * seq_len * h * db  # each checkpointed layer's input
    wide = (3 * h + 6 * q + 7 * kv) * db + side * max(h, q)  # per token, whole row
    mlp = 2 * (4 * i + 2 * h) * db + side * max(h, i)  # per token, one MLP chunk
    mlp_tokens = min(mlp_chunk, seq_len)  # Mixtral's experts too: `i` is already k experts wide
    recomputed = BLOCKWISE_LAYER_SCALE * batch * (seq_len * wide + mlp_tokens * mlp)
    return int(inputs + recomputed), attention


def estimate(args: ModelArgs, *, batch_size: int, seq_len: int, fine_tune: str = "lora", trainable_params: int = 0,
             bits: int | None = None, group_size: int = 64, dtype: str = "float32", grad_checkpoint: bool = False,
             grad_accum: int = 1, objective: str = "sft", attention: str = "auto", attention_block: int | None = None,
             mlp_chunk: int = MLP_CHUNK, loss_chunk: int | None = None) -> Estimate:
    """Predicted peak memory of one training step. `fine_tune`: "lora" (adapters) or "full";
    `trainable_params`: the LoRA parameter count (ignored for full fine-tuning, where every parameter trains
    in fp32); `objective`: sft, dpo or orpo; `attention`: auto, dense or blockwise, with `attention_block`
    as the config keys (`core.blocks.choose` decides: the estimate's `block` says what it chose)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    block = choose(seq_len, args.sliding_window, attention, attention_block)
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
    copies = LOGIT_COPIES + (DPO_EXTRA_LOGIT_COPIES if objective == "dpo" else 0.0)
    logits = int(copies * batch_size * seq_len * args.vocab_size * 4)
    if block is None:
        attn = dense_attention_bytes(args, batch_size, seq_len, grad_checkpoint)
        acts = activation_bytes(args, batch_size, seq_len, grad_checkpoint, act_dtype) - attn
    else:
        acts, attn = blockwise_activation_bytes(args, batch_size, seq_len, grad_checkpoint, block, act_dtype,
                                                mlp_chunk, lora=fine_tune != "full")
        if objective == "sft":  # the chunked loss; DPO / ORPO still take whole (B, L, vocab) log-probs
            chunk = min(loss_chunk or default_loss_chunk(args.vocab_size), seq_len)
            copies = CHUNK_LOGIT_COPIES + (0.0 if grad_checkpoint else NOCKPT_EXTRA_LOGIT_COPIES)
            logits = int(copies * batch_size * chunk * args.vocab_size * 4
                         + LOSS_HIDDEN_COPIES * batch_size * seq_len * args.hidden_size * _DTYPE_BYTES[act_dtype])
    return Estimate(int(weights), int(trainable), int(optimizer), int(acts), logits, int(attn), block)


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


def longest_row(args: ModelArgs, budget: int, *, headroom: float = 0.85, lengths=ROW_LENGTHS,
                **settings) -> tuple[int, Estimate] | None:
    """The longest row of `lengths` (up to the model's max_position_embeddings) whose step fits
    `headroom * budget` bytes with `settings` (estimate's keywords but seq_len), and its estimate; None when
    not even the shortest fits. Memory grows with L on both paths, so the first that does not fit ends it."""
    best = None
    for L in sorted(x for x in lengths if x <= args.max_position_embeddings):
        e = estimate(args, seq_len=L, **settings)
        if e.total > headroom * budget:
            break
        best = (L, e)
    return best


def longest_rows_table(args: ModelArgs, budgets=(16e9, 24e9, 32e9), *, headroom: float = 0.85,
                       paths=("dense", "blockwise"), **settings) -> list[dict]:
    """For each budget, the longest row that fits on each attention path (BENCHMARKS' context table): rows
    {"budget": bytes, "dense": (seq_len, total bytes) or None, "blockwise": ...}."""
    rows = []
    for b in budgets:
        row = {"budget": int(b)}
        for path in paths:
            r = longest_row(args, int(b), headroom=headroom, attention=path, **settings)
            row[path] = (r[0], r[1].total) if r else None
        rows.append(row)
    return rows
