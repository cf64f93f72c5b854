"""Long rows: peak memory and tokens/s of one LoRA training step, blockwise vs dense vs mlx-lm, 1k-32k tokens.

    python bench/bench_long.py [--lengths 1024,...,32768] [--steps 2] [--models long-w4096,long-w256] [--json bench/out/long.json]
    python bench/bench_long.py --report bench/out/long.json   # the tables of a saved run again

Two bench models, random, fp32, 2 layers, hidden 512, 8 query heads of 64 (2 KV heads), MLP 1408, vocab
32000 — small enough that attention dominates at long rows, as it does for a 7B past a few thousand tokens:
`long-w256` (sliding window 256) and `long-w4096` (window 4096, Mistral 7B v0.1's). Every setting trains
LoRA r16 on q, k, v, o with AdamW, batch 1, one document filling the row, per-layer gradient checkpointing
on, in a fresh subprocess (so each peak is its own), with the same weights for every system:
- `blockwise`: mlx-mistral with `attention: blockwise` (auto block size) — chunked MLP and loss too;
- `dense`: mlx-mistral with `attention: dense` (one (L, L) masked score matrix per layer);
- `mlx-lm`: mlx-lm 0.32's Llama model (which serves Mistral) with its LoRA layers and its
  `grad_checkpoint`, and the cross-entropy of mlx-lm's `default_loss`. mlx-lm ignores the sliding window
  (full causal attention), so its numbers are for a different (denser) computation: the peer's cost.
Dense and mlx-lm run up to 8k tokens (where they still fit); any setting the planner (`core.memory`)
puts above 70% of this machine's RAM is skipped (the machines have no swap).

Reported per setting: peak memory (`mx.get_peak_memory`), the peak above the weights, adapters and
optimizer state ("activations", what grows with L), tokens/s over the timed steps, and for blockwise the
ratio of achieved to predicted speed, the prediction being the step's matmul FLOPs (projections, MLP,
head, attention over each block's band, x4 for forward + recomputation + backward) at the FLOP rate of a
2048^3 fp32 matmul measured in the same worker. That absolute ratio is well below 1 on CPU (small
per-block matmuls run below a big GEMM's rate); the report's scaling lines compare each length's
throughput with the next's against the FLOP count's prediction for that step, where the rate cancels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODELS = {
    "long-w256": 256,
    "long-w4096": 4096,
}
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, rope_theta=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
RANK, ALPHA = 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MAX = 8192


def model_args(window: int):
    from mlx_mistral.core.config import ModelArgs

    return ModelArgs(sliding_window=window, **SHAPE)


def step_flops(L: int, window: int, block: int | None) -> float:
    """Matmul FLOPs of one training step (forward, recomputation, backward ~ 4 forwards), attention over
    the blocks' bands (block None: dense L x L)."""
    from mlx_mistral.core import blocks

    h, i, H, kv, D, V = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "vocab_size"))
    proj = 2 * L * h * (2 * H * D + 2 * kv * D) + 2 * L * 3 * h * i
    if block is None:
        band = L * L
    else:
        band = sum((q1 - q0) * (q1 - k0) for q0, q1, k0 in blocks.plan(L, block, window))
    attn = 2 * 2 * H * D * band
    head = 2 * L * h * V
    return 4 * SHAPE["num_hidden_layers"] * (proj + attn) + 3 * head


# ---- worker: one setting in its own process ----------------------------------------------------------
def worker(system: str, model_name: str, L: int, steps: int) -> dict:
    import mlx_mistral.backends.mlx  # noqa: F401  (OpenBLAS before mlx.core)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from mlx_mistral.backends.mlx import trainer as T
    from mlx_mistral.backends.mlx.lora import apply_lora
    from mlx_mistral.backends.mlx.model import Model

    window = MODELS[model_name]
    args = model_args(window)
    mx.random.seed(0)
    ours = Model(args)
    mx.eval(ours.parameters())
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, args.vocab_size, (1, L + 1))
    x, y = tokens[:, :L], tokens[:, 1:]
    seg, w = np.ones((1, L), np.int32), np.ones((1, L), np.float32)
    pos = np.arange(L, dtype=np.int32)[None]

    if system == "mlx-lm":
        from mlx.utils import tree_flatten
        from mlx_lm.models import llama
        from mlx_lm.tuner.trainer import grad_checkpoint
        from mlx_lm.tuner.utils import linear_to_lora_layers

        cfg = dict(SHAPE, model_type="llama", sliding_window=window)
        model = llama.Model(llama.ModelArgs.from_dict(cfg))
        model.load_weights(tree_flatten(ours.parameters()))
        del ours
        model.freeze()
        linear_to_lora_layers(model, SHAPE["num_hidden_layers"],
                              {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                               "keys": [f"self_attn.{t}" for t in TARGETS]})
        grad_checkpoint(model.layers[0])
        xa, ya, wa = mx.array(x), mx.array(y), mx.array(w)

        def loss_fn(model):
            logits = model(xa).astype(mx.float32)  # mlx-lm's default_loss
            ce = nn.losses.cross_entropy(logits, ya) * wa
            return ce.sum() / wa.sum()
        block = None
    else:
        model = ours
        model.freeze()
        apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA)
        model.checkpoint_layers = True
        model.attention = system
        block = model.block_size(L)

        def loss_fn(model):
            rows, n = T.row_losses(model, x, seg, pos, y, w)
            return rows.sum() / n

    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    value_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial_compile(state)
    def step():
        loss, grads = value_grad(model)
        opt.update(model, grads)
        return loss

    mx.eval(state)
    base = mx.get_active_memory()
    t = time.perf_counter()
    mx.eval(step(), state)  # warm-up (compilation)
    warm = time.perf_counter() - t
    mx.reset_peak_memory()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
        mx.eval(loss, state)
    dt = (time.perf_counter() - t) / steps
    peak = mx.get_peak_memory()
    a = mx.random.normal((2048, 2048))
    mx.eval(a)
    t = time.perf_counter()
    for _ in range(3):
        mx.eval(a @ a)
    gemm = 3 * 2 * 2048 ** 3 / (time.perf_counter() - t)
    flops = step_flops(L, window, block if system != "mlx-lm" else None)
    return {"system": system, "model": model_name, "seq_len": L, "block": block, "peak": peak, "base": base,
            "activations": peak - base, "step_s": dt, "warmup_s": warm, "tok_s": L / dt, "loss": float(loss),
            "flops": flops, "gemm_flops_s": gemm, "predicted_s": flops / gemm}


def partial_compile(state):
    import mlx.core as mx

    return lambda f: mx.compile(f, inputs=state, outputs=state)


# ---- driver ------------------------------------------------------------------------------------------
def planned(system: str, model_name: str, L: int) -> int:
    from mlx_mistral.core import memory

    e = memory.estimate(model_args(MODELS[model_name]), batch_size=1, seq_len=L, trainable_params=0,
                        grad_checkpoint=True, attention="dense" if system != "blockwise" else "blockwise")
    return e.total


def ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(lengths, steps, systems, save=None, models=tuple(MODELS)) -> list[dict]:
    """Every setting in its own subprocess; with `save`, the results so far are rewritten (atomically)
    after each one."""
    from mlx_mistral.core.io import write_json
    results = []
    for model_name in models:
        for L in lengths:
            for system in systems:
                if system != "blockwise" and L > DENSE_MAX:
                    continue
                if planned(system, model_name, L) > 0.7 * ram():
                    print(f"skip {system} {model_name} {L}: planned above 70% of RAM", file=sys.stderr)
                    continue
                r = subprocess.run([sys.executable, str(HERE), "--worker", system, model_name, str(L), str(steps)],
                                   capture_output=True, text=True, timeout=3600)
                if r.returncode != 0:
                    print(r.stderr[-2000:], file=sys.stderr)
                    results.append({"system": system, "model": model_name, "seq_len": L, "error": r.returncode})
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{model_name} {system:9s} L={L:6d} peak {res['peak'] / 1e9:6.2f} GB "
                      f"act {res['activations'] / 1e9:6.2f} GB {res['tok_s']:8.0f} tok/s", file=sys.stderr)
                results.append(res)
                if save:
                    write_json(save, results, indent=1)
    return results


def report(results: list[dict]) -> str:
    by = {(r["model"], r["system"], r["seq_len"]): r for r in results if "error" not in r}
    lines = []
    for model_name, window in MODELS.items():
        lines += [f"\n{model_name} (window {window})\n",
                  "| tokens/row | blockwise peak GB (act.) | tok/s | dense peak GB (act.) | tok/s | mlx-lm peak GB (act.) "
                  "| tok/s | blockwise/dense peak | blockwise act. growth | achieved/predicted speed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lengths = sorted({L for (m, _, L) in by if m == model_name})
        prev = None
        for L in lengths:
            cells = []
            for system in ("blockwise", "dense", "mlx-lm"):
                r = by.get((model_name, system, L))
                cells += ([f"{r['peak'] / 1e9:.2f} ({r['activations'] / 1e9:.2f})", f"{r['tok_s']:.0f}"] if r
                          else ["-", "-"])
            b, d = by.get((model_name, "blockwise", L)), by.get((model_name, "dense", L))
            ratio = f"{b['peak'] / d['peak']:.2f}x" if b and d else "-"
            growth = f"{b['activations'] / prev['activations']:.2f}x" if b and prev else "-"
            speed = f"{b['predicted_s'] / b['step_s']:.2f}" if b else "-"
            lines.append(f"| {L} | " + " | ".join(cells) + f" | {ratio} | {growth} | {speed} |")
            prev = b
        lines += [""] + scaling_lines([by[(model_name, "blockwise", L)] for L in lengths
                                       if (model_name, "blockwise", L) in by])
    return "\n".join(lines)


def scaling_lines(rows: list[dict]) -> list[str]:
    """Blockwise throughput from each row length to the next, against what the FLOP count predicts for it:
    the prediction is the ratio of tokens per FLOP of the two steps, so the machine's absolute rate cancels out
    (measured/predicted 1.0: the step time scales exactly as its FLOPs)."""
    out = []
    for a, b in zip(rows, rows[1:]):
        measured = b["tok_s"] / a["tok_s"]
        predicted = (b["seq_len"] / b["flops"]) / (a["seq_len"] / a["flops"])  # tokens per FLOP
        out.append(f"- tok/s at {b['seq_len']} / at {a['seq_len']}: measured {measured:.2f}x, "
                   f"FLOP-predicted {predicted:.2f}x (measured/predicted {measured / predicted:.2f})")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--systems", default="blockwise,dense,mlx-lm")
    p.add_argument("--models", default=",".join(MODELS), help="bench models, in the order to run them")
    p.add_argument("--json")
    p.add_argument("--report")
    p.add_argument("--worker", nargs=4)
    a = p.parse_args()
    if a.worker:
        system, model_name, L, steps = a.worker
        print(json.dumps(worker(system, model_name, int(L), int(steps))))
        return
    if a.report:
        print(report(json.loads(Path(a.report).read_text())))
        return
    models = a.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown bench model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    results = run([int(x) for x in a.lengths.split(",")], a.steps, a.systems.split(","), save=a.json, models=models)
    print(report(results))


if __name__ == "__main__":
    main()
