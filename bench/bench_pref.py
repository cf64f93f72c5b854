"""DPO throughput and peak memory: our torch backend vs TRL's DPOTrainer, on CPU.

    python bench/bench_pref.py [--rounds 1] [--json out.json]      # about 3.5 minutes a round on 2 cores

The same random Mistral (`tiny.build_tiny(dir, "demo")`: hidden 128, 4 layers, vocab 32000, window 64), the
same pairs (the bundled demo preference set, mlx_mistral/data/demo/preference/train.jsonl, 158 pairs,
tokenized once by our chat code and handed to both as token ids), LoRA r16 alpha 32 on every linear layer,
DPO sigmoid beta 0.1, fp32, AdamW at lr 5e-6, reference = the base with adapters disabled on both sides.
- ours: `TorchTrainer` with `fine_tune: dpo`; pairs packed whole into rows of 512 tokens (segment ids,
  restarting positions, the window), 4 rows per step (~16-20 pairs).
- TRL 1.16: `DPOTrainer(model, peft_config=...)`; per step `_compute_loss` on the collator's padded batch of
  16 pairs (TRL 1.16 turns `padding_free` off for DPO), backward, its own optimizer (`create_optimizer`).
Each system runs one epoch over all pairs in a fresh subprocess (its peak RSS is its own); systems alternate
within a round; the first step is warm-up and not timed. Reported per system: the median over rounds of
pairs/s over the timed steps, and of peak RSS (ru_maxrss) and of the peak RSS above the RSS after loading the
model (what training itself adds); then ours/TRL ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SEQ_LEN, ROWS, TRL_BATCH, RANK, ALPHA, BETA, LR = 512, 4, 16, 16, 32.0, 0.1, 5e-6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pairs(model_dir: Path):
    from mlx_mistral.core.data import DEMO
    from mlx_mistral.core.pairs import tokenize_pairs_file
    from mlx_mistral.core.tokenizer import load_tokenizer

    return tokenize_pairs_file(DEMO / "preference" / "train.jsonl", load_tokenizer(model_dir))


def run_ours(model_dir: Path, out: Path) -> dict:
    import time

    import torch

    from mlx_mistral.backends.torch.loader import load_model
    from mlx_mistral.backends.torch.trainer import TorchTrainer, prepare_model
    from mlx_mistral.core.loop import batch_rows
    from mlx_mistral.core.pairs import pack_pairs
    from mlx_mistral.core.train_config import TrainConfig

    torch.manual_seed(0)
    pairs = _pairs(model_dir)
    rows = pack_pairs(pairs, SEQ_LEN)
    steps = -(-len(rows) // ROWS)
    cfg = TrainConfig(fine_tune="dpo", beta=BETA, lr=LR, warmup_steps=0, steps=steps, batch_size=ROWS,
                      seq_len=SEQ_LEN, lora_rank=RANK, lora_alpha=ALPHA, targets=TARGETS, weight_decay=0.0,
                      grad_clip=0.0, eval_every=0, save_every=0, out=str(out))
    model = load_model(model_dir, dtype="float32", device="cpu")
    lc = prepare_model(model, cfg, str(model_dir))
    base_rss = _rss()
    tr = TorchTrainer(model, cfg, rows, None, run_dir=out, lora_config=lc)
    times, n_pairs = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        _, update, _ = tr.train_step(step)
        update(LR)
        times.append(time.perf_counter() - t0)
        n_pairs.append(rows.pair_count(batch_rows(cfg.seed, step, tr.global_batch, len(rows))))
    return {"pairs_per_sec": sum(n_pairs[1:]) / sum(times[1:]), "peak_rss": _rss(), "train_rss": _rss() - base_rss,
            "steps": steps, "pairs": len(pairs), "padding_free_tokens": int((rows.segment_ids > 0).sum()),
            "row_tokens": int(rows.tokens.size)}


def run_trl(model_dir: Path, out: Path) -> dict:
    import os
    import time

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaTokenizer, MistralForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    pairs = _pairs(model_dir)
    tok = LlamaTokenizer.from_pretrained(model_dir, legacy=True)
    tok.pad_token = tok.eos_token
    model = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_rss = _rss()
    args = DPOConfig(output_dir=str(out), beta=BETA, loss_type=["sigmoid"], max_length=None,
                     per_device_train_batch_size=TRL_BATCH, learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0,
                     use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to=[],
                     save_strategy="no", seed=0)
    tr = DPOTrainer(model=model, args=args, processing_class=tok,
                    train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]}),
                    peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                           task_type="CAUSAL_LM"))
    tr.model.train()
    opt = tr.create_optimizer()
    times, n_pairs, padded = [], [], 0
    for i in range(0, len(pairs), TRL_BATCH):
        group = pairs[i:i + TRL_BATCH]
        t0 = time.perf_counter()
        batch = tr.data_collator([p.trl_ids() for p in group])
        loss = tr._compute_loss(tr.model, batch, False)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        n_pairs.append(len(group))
        padded += int(batch["input_ids"].numel())
    return {"pairs_per_sec": sum(n_pairs[1:]) / sum(times[1:]), "peak_rss": _rss(), "train_rss": _rss() - base_rss,
            "steps": len(times), "pairs": len(pairs), "batch_tokens": padded}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=3, metavar=("SYSTEM", "MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        system, model_dir, out = a.child
        fn = run_ours if system == "ours" else run_trl
        print(json.dumps(fn(Path(model_dir), Path(out))))
        return
    from mlx_mistral.core.tiny import build_tiny

    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "model", "demo")
        for r in range(a.rounds):
            for system in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                p = subprocess.run([sys.executable, __file__, "--child", system, str(model_dir),
                                    str(Path(tmp) / f"{system}-{r}")], capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit(f"{system} failed:\n{p.stderr[-3000:]}")
                results[system].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {s: {k: statistics.median(x[k] for x in v) for k in ("pairs_per_sec", "peak_rss", "train_rss")}
           for s, v in results.items()}
    for s, m in med.items():
        print(f"{s:5s} pairs/s {m['pairs_per_sec']:7.2f}  peak RSS {m['peak_rss'] / 2**20:7.0f} MiB  "
              f"training adds {m['train_rss'] / 2**20:6.0f} MiB")
    o, t = med["ours"], med["trl"]
    print(f"ours/TRL: pairs/s x{o['pairs_per_sec'] / t['pairs_per_sec']:.2f}, "
          f"peak RSS x{o['peak_rss'] / t['peak_rss']:.2f}, training RSS x{o['train_rss'] / t['train_rss']:.2f}")
    ours0, trl0 = results["ours"][0], results["trl"][0]
    print(f"tokens through the model per epoch: ours {ours0['row_tokens']} in rows "
          f"({ours0['padding_free_tokens']} real), TRL {trl0['batch_tokens']} in padded batches")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": results, "median": med}, indent=2))


if __name__ == "__main__":
    main()
