"""Training throughput and peak memory: the torch backend vs HF transformers + PEFT (and the MLX backend).

    python bench/bench_torch.py --steps 4 --rounds 2 [--systems torch,hf,mlx,torch+mlx] [--json out.json]

The same ~125M-parameter random Mistral (`tiny.build_tiny(dir, "bench-100m")`, window 256), the same
documents, LoRA r16 alpha 32 on q,k,v,o, fp32, AdamW, batch 4 x seq 512, on CPU. Two data sets:
`equal` (every document exactly 512 tokens: no padding, no packing) and `var` (lengths 16..512, mean ~150:
ours packs them into full rows with SWA-aware packing; HF+PEFT pads each batch of 4 documents to its
longest, the usual `DataCollatorForLanguageModeling` set-up).

Each (system, data) run is a fresh subprocess (so its peak RSS is its own), systems alternate within a
round, and the first step of each run (warm-up) is not timed. `torch` runs the torch backend alone (no
MLX in the process); `torch+mlx` imports the MLX backend first, as a process using both backends does
(the OpenBLAS preload, after torch: see mlx_mistral/backends/_blas.py), then trains on torch. Reported: median real (non-padding) input
tokens per second over the timed steps of all rounds, and the median peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SEQ_LEN, BATCH, RANK, ALPHA = 512, 4, 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def documents(kind: str, n: int = 64, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind == "equal":
        lengths = np.full(n, SEQ_LEN)
    else:
        lengths = np.clip(rng.lognormal(np.log(110), 0.8, n).astype(int), 16, SEQ_LEN)
    return [rng.integers(3, 32000, int(k)).astype(np.int32) for k in lengths]


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- workers: one (system, data) run each, printing one JSON line --------------------------------------
def worker_ours(backend: str, model_dir: str, data: str, steps: int) -> dict:
    import numpy as np

    import mlx_mistral
    from mlx_mistral.core.loop import Rows, batch_rows
    from mlx_mistral.core.packing import pack
    from mlx_mistral.core.train_config import TrainConfig

    rows = Rows.from_packed(pack(documents(data), SEQ_LEN))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=model_dir, steps=steps + 1, batch_size=BATCH, seq_len=SEQ_LEN, lr=1e-4,
                          warmup_steps=0, eval_every=0, save_every=0, log_every=1, lora_rank=RANK,
                          lora_alpha=ALPHA, targets=TARGETS, compile=backend == "mlx", out=out).validate()
        events = []
        if backend == "torch":
            from mlx_mistral.backends.torch.trainer import TorchTrainer, prepare_model

            model, _ = mlx_mistral.load(model_dir, backend="torch", dtype="float32")
            lc = prepare_model(model, cfg, model_dir)
            TorchTrainer(model, cfg, rows, None, callbacks=[events.append], lora_config=lc).run()
        else:
            from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model

            model, _ = mlx_mistral.load(model_dir, dtype="float32")
            lc = prepare_model(model, cfg, model_dir)
            Trainer(model, cfg, rows, None, callbacks=[events.append], lora_config=lc).run()
    ends = [e["elapsed"] for e in events if e["event"] == "train"]
    times = np.diff(ends)  # steps 2.. (step 1 is warm-up)
    real = [int((rows.segment_ids[batch_rows(0, s, BATCH, len(rows))] > 0).sum()) for s in range(1, steps + 1)]
    return {"step_s": times.tolist(), "real_tokens": real, "peak_rss": peak_rss(),
            "loss": [e["loss"] for e in events if e["event"] == "train"][-1]}


def worker_hf(model_dir: str, data: str, steps: int) -> dict:
    import time

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    docs = documents(data)
    order = np.random.default_rng(0).permutation(len(docs))
    times, real = [], []
    for s in range(steps + 1):
        batch = [docs[i] for i in order[(s * BATCH) % len(docs):][:BATCH]]
        n = max(len(d) for d in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        att = torch.zeros(len(batch), n, dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, :len(d)] = torch.from_numpy(d.astype(np.int64))
            att[i, :len(d)] = 1
        labels = ids.masked_fill(att == 0, -100)
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if s:
            times.append(time.perf_counter() - t)
            real.append(int(att.sum()))
    return {"step_s": times, "real_tokens": real, "peak_rss": peak_rss(), "loss": float(loss)}


# ---- the driver ----------------------------------------------------------------------------------------
def run_worker(system: str, model_dir: str, data: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--model-dir", model_dir, "--data", data,
           "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of every system")
    ap.add_argument("--systems", default="torch,hf", help="comma list of torch, hf, mlx")
    ap.add_argument("--data", default="equal,var", help="comma list of equal, var")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        if a.worker in ("mlx", "torch+mlx"):  # HF+PEFT and `torch` run torch alone, without MLX in the process
            import mlx_mistral.backends.mlx  # noqa: F401  (torch, then OpenBLAS, then mlx.core)

        res = worker_hf(a.model_dir, a.data, a.steps) if a.worker == "hf" else \
            worker_ours(a.worker.split("+")[0], a.model_dir, a.data, a.steps)
        print(json.dumps(res))
        return
    from mlx_mistral.core.tiny import build_tiny

    systems, datas = a.systems.split(","), a.data.split(",")
    raw: dict = {d: {s: [] for s in systems} for d in datas}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny(Path(tmp) / "bench-100m", "bench-100m"))
        for r in range(a.rounds):
            for d in datas:
                for s in (systems if r % 2 == 0 else systems[::-1]):
                    raw[d][s].append(run_worker(s, model_dir, d, a.steps))
                    print(f"round {r + 1} {d:5s} {s:5s} done", file=sys.stderr, flush=True)
    names = {"torch": "mlx-mistral torch backend", "hf": "HF transformers + PEFT", "mlx": "mlx-mistral MLX backend",
             "torch+mlx": "mlx-mistral torch backend, MLX backend also loaded"}
    print(f"\nbatch {BATCH} x seq {SEQ_LEN}, LoRA r{RANK} q,k,v,o, fp32, {a.steps} timed steps x {a.rounds} rounds")
    print("| data | system | real tok/s (median) | peak RSS (GiB) | vs HF+PEFT |")
    print("|---|---|---|---|---|")
    summary = {}
    for d in datas:
        for s in systems:
            tps = [t / x for run in raw[d][s] for t, x in zip(run["real_tokens"], run["step_s"])]
            summary[(d, s)] = (statistics.median(tps), statistics.median(run["peak_rss"] for run in raw[d][s]))
        for s in systems:
            tps, rss = summary[(d, s)]
            ratio = f"{tps / summary[(d, 'hf')][0]:.2f}x" if "hf" in systems else "-"
            print(f"| {d} | {names[s]} | {tps:.0f} | {rss / 2**30:.2f} | {ratio} |")
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
