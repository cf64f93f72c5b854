"""Training throughput and peak memory: mlx-mistral vs mlx-lm's `mlx_lm.lora`, side by side.

    python bench/bench_train.py --steps 8 --warmup 2 --repeats 3 [--json bench/out/train.json]
    python bench/bench_train.py --report bench/out/train.json   # the tables of a saved run again

(BENCHMARKS.md's figures: `--steps 2 --warmup 1 --repeats 3`, the most the shared 2-core machine allowed.)

Both train the same ~125M-parameter random Mistral (`tiny.build_tiny(dir, "bench-100m")`, fp32, window
256) with LoRA r16 (alpha 32 = mlx-lm's scale 2.0) on q,k,v,o of every layer (mlx-lm `--num-layers -1`),
AdamW (weight decay 0.01, bias correction), batch 4 x seq 512, on the same `{"text": ...}` JSONL file
(loss on every token for both). The texts are made of words that are one token each, so every document
has an exact token length; mlx-lm gets the same model directory plus a `tokenizer_config.json` that adds
the BOS, so both tokenize every document to the same ids (`<s> ... </s>`; the worker checks it).

Two data sets:
- `equal`: every document exactly 512 tokens. One document per row for both: no padding, nothing for
  packing to win; this measures the training step itself.
- `var`: log-normal lengths (median 110, sigma 0.8, clipped to 16..512; mean ~150). mlx-mistral packs
  them into full rows (`packing: swa`); mlx-lm sorts by length, batches neighbours and pads each batch
  to a multiple of 32 (its own scheme, the strongest padding baseline).

Every run is a fresh subprocess; the two systems alternate (order flipped each repeat), each repeat with
its own seed (data order). mlx-lm runs with `LD_PRELOAD` of the same OpenBLAS that the MLX backend
loads, and the same thread settings. The first `--warmup` steps of each run (compilation) are not timed.

Reported, per (data, system): useful tokens per second = loss-bearing (non-padding) target tokens of the
timed steps / their time, median over repeats; MLX peak memory (`mx.get_peak_memory`: our metrics.jsonl,
mlx-lm's training callback); and the process's peak RSS (VmHWM, from `wait4`). For mlx-lm on `var`
the table also gives the tok/s over the steps whose batch shape had been seen before (mx.compile traces
every new shape once; a long run pays that at most 16 times at seq 512).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN, BATCH, RANK, ALPHA = 512, 4, 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
HERE = Path(__file__).resolve()


# ---- data: texts with exact token lengths ------------------------------------------------------------
def one_token_words(tok) -> list[str]:
    """Lower-case words that the tokenizer encodes as exactly one piece (SentencePiece splits on spaces,
    so a text of n such words separated by spaces is n tokens)."""
    words = []
    for i in range(tok.vocab_size):
        p = tok.id_to_piece(i)
        w = p[1:]
        if p.startswith("\u2581") and len(w) >= 2 and w.isascii() and w.isalpha() and w.islower():
            words.append(w)
    return [w for w in words if len(tok.encode(w, bos=False)) == 1]


def doc_lengths(kind: str, n: int, seed: int) -> list[int]:
    """Token lengths (BOS and EOS included) of the `n` documents of data set `kind`."""
    import numpy as np

    if kind == "equal":
        return [SEQ_LEN] * n
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(110), 0.8, n).astype(int), 16, SEQ_LEN).tolist()


def write_dataset(out: Path, kind: str, n: int, tok, seed: int = 0) -> dict:
    """`out/train.jsonl` of `n` documents; returns the lengths and a hash of our tokenization of it."""
    import random

    from mlx_mistral.core.data import load_dataset

    words = one_token_words(tok)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    lengths = doc_lengths(kind, n, seed)
    with open(out / "train.jsonl", "w") as f:
        for k in lengths:
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(k - 2))}) + "\n")
    docs, _, _ = load_dataset(out, tok, "train", cache=False)
    got = [len(d) for d in docs]
    if got != lengths:
        raise RuntimeError(f"{out}: tokenized lengths differ from the planned ones (e.g. {got[:4]} vs {lengths[:4]})")
    return {"lengths": lengths, "hash": token_hash(docs)}


def token_hash(docs) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([int(x) for x in d]).encode())
    return h.hexdigest()[:16]


# ---- configs ----------------------------------------------------------------------------------------------
def ours_config(model: Path, data: Path, out: Path, steps: int, packing: str, seed: int) -> dict:
    return {"model": str(model), "data": str(data), "out": str(out), "seq_len": SEQ_LEN, "packing": packing,
            "dtype": "float32", "fine_tune": "lora", "targets": TARGETS, "num_layers": -1, "lora_rank": RANK,
            "lora_alpha": ALPHA, "lora_dropout": 0.0, "steps": steps, "batch_size": BATCH, "lr": 1.4e-4,
            "warmup_steps": 0, "weight_decay": 0.01, "val_fraction": 0.0, "eval_every": 0, "save_every": 0,
            "log_every": 1, "seed": seed}


def mlx_lm_config(model: Path, data: Path, out: Path, steps: int, seed: int) -> dict:
    return {"model": str(model), "train": True, "data": str(data), "fine_tune_type": "lora", "optimizer": "adamw",
            "optimizer_config": {"adamw": {"weight_decay": 0.01, "bias_correction": True}},
            "num_layers": -1, "batch_size": BATCH, "iters": steps, "learning_rate": 1.4e-4,
            "steps_per_report": 1, "steps_per_eval": 10**9, "save_every": 10**9, "adapter_path": str(out),
            "max_seq_length": SEQ_LEN, "seed": seed,
            "lora_parameters": {"keys": [f"self_attn.{t}" for t in TARGETS], "rank": RANK, "scale": ALPHA / RANK,
                                "dropout": 0.0}}


def mlx_lm_model_dir(model: Path, out: Path) -> Path:
    """The model directory for mlx-lm: links to ours plus a tokenizer_config.json that adds BOS (as
    ours does), so both tokenize every text to the same ids."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    return out


# ---- the mlx-lm worker: `mlx_lm.lora`'s own main(), with a recording callback ------------------------
def mlx_lm_worker(config: str, record: str):
    """Run `mlx_lm.lora -c config` in this process, recording each report (one per step) and each
    batch's shape to `record` (JSON). Only recording is added: mlx-lm's training path is untouched."""
    import mlx_lm.lora as lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import iterate_batches

    rec = {"reports": [], "shapes": [], "real": [], "doc_hash": None}

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info):
            rec["reports"].append({**info, "wall": time.perf_counter()})

    def recording_batches(dataset, *a, **k):
        if rec["doc_hash"] is None:
            rec["doc_hash"] = token_hash(dataset[i][0] for i in range(len(dataset)))
        for batch, lengths in iterate_batches(dataset, *a, **k):
            rec["shapes"].append(list(batch.shape))
            rec["real"].append(int(lengths[:, 1].sum()))
            yield batch, lengths

    real_train = lora.train
    lora.get_reporting_callbacks = lambda *a, **k: Recorder()
    lora.train = lambda *a, **k: real_train(*a, iterate_batches=recording_batches, **k)
    sys.argv = ["mlx_lm.lora", "-c", config]
    lora.main()
    Path(record).write_text(json.dumps(rec))


# ---- the driver ---------------------------------------------------------------------------------------------
def run(cmd: list[str], log: Path, env: dict) -> int:
    """Run `cmd` with output to `log`; returns its peak RSS in bytes (VmHWM, from wait4)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return usage.ru_maxrss * 1024


def run_ours(work: Path, model: Path, data: Path, kind: str, steps: int, seed: int, tag: str, env) -> dict:
    import yaml

    out = work / f"runs/ours-{tag}"
    cfg_path = work / f"ours-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(ours_config(model, data, out, steps, "swa", seed)))
    rss = run([str(Path(sys.executable).parent / "mlx-mistral"), "train", "--config", str(cfg_path),
               "--no-dashboard"], work / f"ours-{tag}.log", env)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    start = next(e for e in events if e["event"] == "start")
    step_s, toks, prev = [], [], (0.0, 0)
    for e in train:
        step_s.append(e["elapsed"] - prev[0])
        toks.append(e["tokens"] - prev[1])
        prev = (e["elapsed"], e["tokens"])
    return {"step_s": step_s, "tokens": toks, "new_shape": [i == 0 for i in range(len(train))],
            "peak_mlx": max(e["peak_memory"] for e in train), "rss": rss, "loss": train[-1]["loss"],
            "efficiency": start["packing_efficiency"]}


def run_mlx_lm(work: Path, model: Path, data: Path, steps: int, seed: int, tag: str, env) -> dict:
    import yaml

    out = work / f"runs/mlx-lm-{tag}"
    cfg_path, record = work / f"mlx-lm-{tag}.yaml", work / f"mlx-lm-{tag}.json"
    cfg_path.write_text(yaml.safe_dump(mlx_lm_config(model, data, out, steps, seed)))
    env = dict(env, LD_PRELOAD=OPENBLAS)
    rss = run([sys.executable, str(HERE), "--worker", str(cfg_path), "--record", str(record)],
              work / f"mlx-lm-{tag}.log", env)
    rec = json.loads(record.read_text())
    reps = rec["reports"]
    toks = [r["trained_tokens"] - (reps[i - 1]["trained_tokens"] if i else 0) for i, r in enumerate(reps)]
    seen, new_shape = set(), []
    for s in rec["shapes"][:len(reps)]:
        new_shape.append(tuple(s) not in seen)
        seen.add(tuple(s))
    shapes = rec["shapes"][:len(reps)]
    return {"step_s": [t / r["tokens_per_second"] for t, r in zip(toks, reps)], "tokens": toks,
            "new_shape": new_shape, "peak_mlx": max(r["peak_memory"] for r in reps) * 1e9, "rss": rss,
            "loss": reps[-1]["train_loss"], "doc_hash": rec["doc_hash"],
            "efficiency": sum(rec["real"][:len(reps)]) / sum(a * b for a, b in shapes)}


def throughput(run: dict, warmup: int, seen_only: bool = False) -> float | None:
    """Useful (loss-bearing) tokens per second over the timed steps."""
    idx = [i for i in range(warmup, len(run["step_s"])) if not (seen_only and run["new_shape"][i])]
    if not idx:
        return None
    return sum(run["tokens"][i] for i in idx) / sum(run["step_s"][i] for i in idx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of both systems")
    ap.add_argument("--data", default="equal,var", help="comma list of equal, var")
    ap.add_argument("--var-docs", type=int, default=2000, help="documents in the var data set")
    ap.add_argument("--work", default=str(HERE.parent / "out" / "train"), help="scratch directory")
    ap.add_argument("--json", help="also write the raw per-run results here")
    ap.add_argument("--report", metavar="JSON", help="print the tables of a saved --json run and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return mlx_lm_worker(a.worker, a.record)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        return report(saved["raw"], argparse.Namespace(**saved["args"]), saved["data"])

    import mlx_mistral.backends.mlx  # noqa: F401  (OpenBLAS before mlx.core)
    from mlx_mistral.core.tiny import build_tiny
    from mlx_mistral.core.tokenizer import Tokenizer

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "bench-100m"
    if not (model / "config.json").exists():
        build_tiny(model, "bench-100m")
    lm_model = mlx_lm_model_dir(model, work / "bench-100m-mlx-lm")
    tok = Tokenizer(model / "tokenizer.model")
    total = a.warmup + a.steps
    kinds = a.data.split(",")
    data = {}
    for kind in kinds:
        n = BATCH * total * 2 if kind == "equal" else a.var_docs
        data[kind] = write_dataset(work / f"data-{kind}", kind, n, tok)
    env = dict(os.environ, MLX_MISTRAL_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false")
    env.pop("LD_PRELOAD", None)
    raw = {k: {"mlx-mistral": [], "mlx-lm": []} for k in kinds}
    t_start = time.perf_counter()
    for r in range(a.repeats):
        for kind in kinds:
            order = ["mlx-mistral", "mlx-lm"] if r % 2 == 0 else ["mlx-lm", "mlx-mistral"]
            for system in order:
                tag = f"{kind}-{r}"
                if system == "mlx-mistral":
                    res = run_ours(work, model, work / f"data-{kind}", kind, total, r, tag, env)
                else:
                    res = run_mlx_lm(work, lm_model, work / f"data-{kind}", total, r, tag, env)
                    if res["doc_hash"] != data[kind]["hash"]:
                        raise RuntimeError(f"mlx-lm tokenized data-{kind} differently from mlx-mistral")
                raw[kind][system].append(res)
                print(f"[{time.perf_counter() - t_start:6.0f}s] repeat {r + 1} {kind:5s} {system:11s} "
                      f"{throughput(res, a.warmup):7.1f} tok/s  peak {res['peak_mlx'] / 2**30:.2f} GiB  "
                      f"rss {res['rss'] / 2**30:.2f} GiB  loss {res['loss']:.3f}", file=sys.stderr, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "data": data, "raw": raw}, indent=1))
    report(raw, a, data)


def mlx_lm_epoch_efficiency(lengths: list[int]) -> float:
    """Real tokens / row capacity of mlx-lm's batching over a whole epoch: length-sorted batches of
    BATCH, each padded to 1 + a multiple of 32 (at most SEQ_LEN), as `mlx_lm.tuner.trainer.iterate_batches`."""
    s = sorted(lengths)
    batches = [s[i:i + BATCH] for i in range(0, len(s) - BATCH + 1, BATCH)]
    cap = sum(BATCH * min(1 + 32 * ((max(b) + 31) // 32), SEQ_LEN) for b in batches)
    return sum(map(sum, batches)) / cap


def report(raw: dict, a, data: dict | None = None):
    med = statistics.median
    print(f"\nbatch {BATCH} x seq {SEQ_LEN}, LoRA r{RANK} (alpha {ALPHA:g}) on q,k,v,o, all 12 layers, fp32, "
          f"{a.steps} timed steps after {a.warmup} warm-up, {a.repeats} alternating repeats (medians)")
    print("| data | system | useful tok/s | tokens in rows | MLX peak (GiB) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for kind, runs in raw.items():
        s = {}
        for system, rs in runs.items():
            s[system] = (med(throughput(x, a.warmup) for x in rs), med(x["peak_mlx"] for x in rs),
                         med(x["rss"] for x in rs), med(x["efficiency"] for x in rs))
            tps, peak, rss, eff = s[system]
            extra = ""
            if system == "mlx-lm" and kind == "var":
                seen = [throughput(x, a.warmup, seen_only=True) for x in rs]
                seen = [v for v in seen if v is not None]
                if seen:
                    extra = f" ({med(seen):.0f} on already-compiled shapes)"
            print(f"| {kind} | {system} | {tps:.0f}{extra} | {100 * eff:.0f}% | {peak / 2**30:.2f} | {rss / 2**30:.2f} |")
        # the two systems ran back to back within a repeat: their ratio is robust to load drifting between repeats
        paired = [throughput(o, a.warmup) / throughput(m, a.warmup) for o, m in zip(runs["mlx-mistral"], runs["mlx-lm"])]
        o, m = s["mlx-mistral"], s["mlx-lm"]
        ratios.append(f"| {kind} | {med(paired):.2f}x ({', '.join(f'{x:.2f}' for x in paired)}) | "
                      f"{o[0] / m[0]:.2f}x | {o[1] / m[1]:.2f}x | {o[2] / m[2]:.2f}x |")
    print("\n| data | tok/s ratio, median of paired repeats (each) | ratio of median tok/s | MLX peak ratio "
          "| RSS ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(ratios))
    if data and "var" in data:
        print(f"\nmlx-lm's batching over a whole epoch of the var data: "
              f"{100 * mlx_lm_epoch_efficiency(data['var']['lengths']):.0f}% of row tokens are real "
              "(the timed steps above are a sample of its batches)")


if __name__ == "__main__":
    main()
