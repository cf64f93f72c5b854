"""Run the thesis experiment: pre-train (or reuse) a small Mistral, fine-tune it every way, measure, report.

    python -m bench.thesis.run --config bench/thesis/config.yaml --out bench/thesis/results [--mini]

1. Corpus (corpus.py): stdlib sources, split by package, Mistral v1 tokens remapped to a small vocabulary.
2. Base: a Mistral (GQA, sliding window) pre-trained from a random init with the project's trainer
   (`fine_tune: full`, SWA packing) and cached under `cache/base-<key>/`, key = everything it depends on.
3. For each seed, each approach (interleaved, so load drift on a shared machine spreads over all of them):
   LoRA on the base with the project's trainer, the same loss-token budget for every approach; then
   eval perplexity and loss by position on held-out documents each run alone, training peak memory and
   tokens/s, decoding latency with the adapter unfused and fused, trainable parameters.
4. `OUT/results.json` (every number, per run and aggregated) and `OUT/results.md` (the tables).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
import yaml
from mlx.utils import tree_map

from mlx_mistral.backends import _blas
from mlx_mistral.backends.mlx.loader import load_model
from mlx_mistral.backends.mlx.lora import fuse
from mlx_mistral.backends.mlx.model import Model
from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model
from mlx_mistral.core.config import ModelArgs
from mlx_mistral.core.io import write_json, write_text
from mlx_mistral.core.loop import Rows
from mlx_mistral.core.packing import pack
from mlx_mistral.core.train_config import TrainConfig
from mlx_mistral.ui.callbacks import JSONLLogger

from .corpus import BOS, EOS, build_corpus, save_vocab
from .metrics import bucket_losses, decode_latency, document_losses, perplexity
from .report import aggregate, render

SECTIONS = {
    "corpus": {"vocab_size", "heldout_fraction", "min_len", "max_len", "n_eval", "split_seed", "max_files"},
    "model": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "sliding_window", "rope_theta"},
    "pretrain": {"seq_len", "batch_size", "steps", "lr", "warmup_steps", "seed"},
    "finetune": {"tokens", "seq_len", "batch_size", "warmup_fraction", "targets", "alpha_over_rank"},
    "eval": {"chunk", "prompt_tokens", "new_tokens", "repeats"},
}
APPROACH_KEYS = {"name", "label", "lora_rank", "rank_policy", "packing", "lr"}


# ---- configuration ----------------------------------------------------------------------------------------
def load_experiment(path: str | Path, mini: bool = False) -> dict:
    """The experiment config from YAML (with its `mini` overrides applied when asked); every section and
    key is checked, an unknown or missing one is a ValueError naming it."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the experiment config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    mini_over = cfg.pop("mini", None) or {}
    known_top = set(SECTIONS) | {"seeds", "approaches"}
    for key in cfg:
        if key not in known_top:
            raise ValueError(f"{path}: unknown top-level key {key!r}; known: {', '.join(sorted(known_top))}")
    if mini:
        for section, over in mini_over.items():
            if section not in SECTIONS and section != "seeds":
                raise ValueError(f"{path}: mini.{section} is not a section that can be overridden")
            if section == "seeds":
                cfg["seeds"] = over
            else:
                cfg[section] = {**cfg.get(section, {}), **over}
    for section, keys in SECTIONS.items():
        got = set(cfg.get(section) or {})
        if got - keys or keys - got:
            bad = sorted(got - keys) or sorted(keys - got)
            what = "unknown" if got - keys else "missing"
            raise ValueError(f"{path}: section {section!r} has {what} key(s) {', '.join(bad)}")
    if not cfg.get("seeds") or not all(isinstance(s, int) for s in cfg["seeds"]):
        raise ValueError(f"{path}: 'seeds' must be a non-empty list of integers")
    names = set()
    for i, a in enumerate(cfg.get("approaches") or []):
        if set(a) != APPROACH_KEYS:
            raise ValueError(f"{path}: approaches[{i}] must have exactly the keys {', '.join(sorted(APPROACH_KEYS))}"
                             f" (has {', '.join(sorted(a))})")
        if a["name"] in names:
            raise ValueError(f"{path}: approaches[{i}]: duplicate name {a['name']!r}")
        names.add(a["name"])
    if not names:
        raise ValueError(f"{path}: 'approaches' is empty")
    return cfg


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram / 2**30, "platform": platform.platform(),
            "python": platform.python_version(), "mlx": mx.__version__, "device": str(mx.default_device()),
            "blas": _blas.STATUS.get("loaded") or _blas.STATUS.get("reason"), "load_start": _load()}


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Progress:
    """Trainer callback: a line every `every` steps, and the events kept for the measurements."""

    def __init__(self, name: str, every: int):
        self.name, self.every, self.events = name, every, []

    def __call__(self, e: dict):
        self.events.append(e)
        if e["event"] == "train" and (e["step"] % self.every == 0 or e["step"] == 1):
            log(f"  {self.name} step {e['step']} loss {e['loss']:.3f} {e['tokens_per_sec']:.0f} tok/s "
                f"peak {e['peak_memory'] / 2**20:.0f} MB")

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


def steady_tokens_per_sec(train_events: list[dict]) -> float:
    """Median tokens/s of the steps after the first two (which include compilation)."""
    rates = [e["tokens_per_sec"] for e in train_events[2:]] or [e["tokens_per_sec"] for e in train_events]
    return float(statistics.median(rates))


# ---- the base model --------------------------------------------------------------------------------------------
def base_args(cfg: dict, vocab_size: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, bos_token_id=BOS, eos_token_id=EOS, rms_norm_eps=1e-5,
                     max_position_embeddings=32768, tie_word_embeddings=False, **cfg["model"])


def pretrain_base(cfg: dict, corpus, cache: Path) -> tuple[Path, dict]:
    """The cached base model directory (trained now if absent) and its summary."""
    args = base_args(cfg, len(corpus.vocab))
    key = _key({"corpus": {k: corpus.info[k] for k in ("content_hash", "tokenizer_hash", "vocab_size",
                                                          "split_seed", "heldout_fraction", "min_len", "max_len")},
                "model": args.to_hf_config(), "pretrain": cfg["pretrain"], "version": 1})
    base_dir = cache / f"base-{key}"
    done = base_dir / "pretrain.json"
    if done.exists():
        info = json.loads(done.read_text())
        log(f"base model: reusing {base_dir} ({info['params']:,} params, {info['tokens']:,} tokens)")
        return base_dir, {**info, "reused": True}
    if base_dir.exists():
        shutil.rmtree(base_dir)  # an interrupted pre-training: start it again
    p = cfg["pretrain"]
    log(f"base model: pre-training {args.param_count():,} params for {p['steps']} steps into {base_dir}")
    mx.random.seed(p["seed"])
    model = Model(args)
    # transformers' initialisation: normal(0, 0.02) for every matrix, ones for the norms
    model.update(tree_map(lambda w: w if w.ndim == 1 else mx.random.normal(w.shape) * 0.02, model.parameters()))
    tcfg = TrainConfig(model=str(base_dir), fine_tune="full", seq_len=p["seq_len"], batch_size=p["batch_size"],
                       steps=p["steps"], lr=p["lr"], warmup_steps=p["warmup_steps"], seed=p["seed"],
                       packing="swa", eval_every=0, save_every=0, keep_checkpoints=1, out=str(base_dir)).validate()
    prepare_model(model, tcfg, str(base_dir))
    packed = pack(corpus.pretrain, p["seq_len"], mode="swa")
    rows = Rows.from_packed(packed)
    prog = Progress("pretrain", 20)
    t0 = time.perf_counter()
    end = Trainer(model, tcfg, rows, None, base_dir, callbacks=[JSONLLogger(base_dir / "metrics.jsonl"), prog],
                  lora_config=None, model_name="thesis-base").run()
    if end["reason"] != "done":
        raise RuntimeError(f"pre-training ended with {end['reason']}: {end['message']}")
    seconds = time.perf_counter() - t0
    shutil.rmtree(base_dir / "checkpoints", ignore_errors=True)  # optimizer state: not needed to reuse the base
    save_vocab(base_dir / "vocab.json", corpus)
    info = {"params": args.param_count(), "tokens": int(end["tokens"]), "steps": p["steps"], "seconds": seconds,
            "final_loss": end["final_loss"], "tokens_per_sec": steady_tokens_per_sec(prog.of("train")),
            "peak_memory_gb": end["peak_memory"] / 2**30, "rows": packed.rows,
            "packing_efficiency": packed.efficiency, "key": key}
    write_json(done, info)  # last: its presence marks a complete base
    log(f"base model: {info['tokens']:,} tokens in {seconds:.0f} s, final loss {end['final_loss']:.3f}")
    return base_dir, {**info, "reused": False}


# ---- measurements ---------------------------------------------------------------------------------------------
def evaluate(model, docs, window: int, chunk: int) -> dict:
    model.eval()
    losses = [document_losses(model, d, chunk) for d in docs]
    ppl = perplexity(losses)
    return {"eval_ppl": ppl, "eval_loss": math.log(ppl), "buckets": bucket_losses(losses, window),
            "doc_ppl": [perplexity([x]) for x in losses]}


def run_one(cfg: dict, approach: dict, seed: int, corpus, base_dir: Path, run_dir: Path) -> dict:
    """Fine-tune the base with one approach and seed, then measure it (see the module doc)."""
    f, e = cfg["finetune"], cfg["eval"]
    window = cfg["model"]["sliding_window"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    model = load_model(base_dir, dtype="float32")
    packed = pack(corpus.finetune, f["seq_len"], mode=approach["packing"])
    rows = Rows.from_packed(packed)
    per_batch = rows.weights.sum() / len(rows) * f["batch_size"]  # loss tokens per optimizer step
    steps = max(1, math.ceil(f["tokens"] / per_batch))
    tcfg = TrainConfig(model=str(base_dir), fine_tune="lora", seq_len=f["seq_len"], batch_size=f["batch_size"],
                       packing=approach["packing"], targets=f["targets"], lora_rank=approach["lora_rank"],
                       lora_alpha=f["alpha_over_rank"] * approach["lora_rank"], rank_policy=approach["rank_policy"],
                       steps=steps, lr=approach["lr"], warmup_steps=max(1, round(f["warmup_fraction"] * steps)),
                       seed=seed, eval_every=0, save_every=0, keep_checkpoints=1, out=str(run_dir)).validate()
    lora_config = prepare_model(model, tcfg, str(base_dir))
    prog = Progress(f"{approach['name']} s{seed}", 10)
    end = Trainer(model, tcfg, rows, None, run_dir, callbacks=[JSONLLogger(run_dir / "metrics.jsonl"), prog],
                  lora_config=lora_config, model_name=str(base_dir)).run()
    if end["reason"] != "done":
        raise RuntimeError(f"{approach['name']} seed {seed}: training ended with {end['reason']}: {end['message']}")
    start = prog.of("start")[0]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer state; the adapters stay

    ev = evaluate(model, corpus.eval, window, e["chunk"])
    prompt = corpus.eval[0][:e["prompt_tokens"]]
    probe = mx.array(np.asarray(corpus.eval[0][:2 * window + 7], np.int32))[None]  # past the window
    unfused_logits = model(probe)
    mx.eval(unfused_logits)
    lat_unfused = decode_latency(model, prompt, e["new_tokens"], e["repeats"])
    fuse(model)
    fused_logits = model(probe)
    lat_fused = decode_latency(model, prompt, e["new_tokens"], e["repeats"])
    diff = float(mx.abs(fused_logits - unfused_logits).max())
    mx.clear_cache()
    return {"approach": approach["name"], "seed": seed, "steps": steps, "train_tokens": int(end["tokens"]),
            "final_train_loss": end["final_loss"], "tokens_per_sec": steady_tokens_per_sec(prog.of("train")),
            "peak_memory_gb": end["peak_memory"] / 2**30, "trainable_params": int(start["trainable_params"]),
            "packing_efficiency": packed.efficiency, "packed_rows": packed.rows, "n_split": packed.n_split,
            "latency_unfused_ms": lat_unfused, "latency_fused_ms": lat_fused, "fuse_max_abs_diff": diff,
            "train_seconds": end["elapsed"], **ev}


def base_reference(cfg: dict, corpus, base_dir: Path) -> dict:
    e = cfg["eval"]
    model = load_model(base_dir, dtype="float32")
    ev = evaluate(model, corpus.eval, cfg["model"]["sliding_window"], e["chunk"])
    ev["latency_ms"] = decode_latency(model, corpus.eval[0][:e["prompt_tokens"]], e["new_tokens"], e["repeats"])
    return ev


# ---- the experiment ---------------------------------------------------------------------------------------------
def run_experiment(cfg: dict, out: Path, cache: Path, command: str, mode: str) -> dict:
    t0 = time.perf_counter()
    machine = machine_info()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_start']}, BLAS {machine['blas']}")
    corpus = build_corpus(cache, **cfg["corpus"])
    log("corpus: " + ", ".join(f"{k} {corpus.info[k]['docs']} docs / {corpus.info[k]['tokens']:,} tokens"
                               for k in ("pretrain", "finetune", "eval")))
    base_dir, base_info = pretrain_base(cfg, corpus, cache)
    base = base_reference(cfg, corpus, base_dir)
    log(f"base model: eval perplexity {base['eval_ppl']:.2f}, {base['latency_ms']:.2f} ms/token")
    results = {"mode": mode, "command": command, "config": cfg, "seeds": cfg["seeds"], "machine": machine,
               "corpus": corpus.info, "corpus_files": corpus.names, "base_info": base_info, "base": base,
               "runs": [], "summaries": [], "elapsed_s": 0.0}
    runs_root = cache / f"runs-{mode}"
    for seed in cfg["seeds"]:
        for a in cfg["approaches"]:
            log(f"run {a['name']} seed {seed}")
            r = run_one(cfg, a, seed, corpus, base_dir, runs_root / f"{a['name']}-s{seed}")
            log(f"  -> eval ppl {r['eval_ppl']:.3f}, {r['tokens_per_sec']:.0f} tok/s, peak "
                f"{r['peak_memory_gb'] * 1024:.0f} MB, {r['latency_unfused_ms']:.2f} -> "
                f"{r['latency_fused_ms']:.2f} ms/token")
            results["runs"].append(r)
            results["summaries"] = aggregate(results["runs"], cfg["approaches"])
            results["elapsed_s"] = time.perf_counter() - t0
            write_json(out / "results.json", results)  # after every run: a partial result survives a crash
    results["machine"]["load_end"] = _load()
    results["elapsed_s"] = time.perf_counter() - t0
    write_json(out / "results.json", results)
    write_text(out / "results.md", render(results))
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {out / 'results.md'}")
    return results


@click.command()
@click.option("--config", "config_path", default="bench/thesis/config.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="Experiment config (YAML).")
@click.option("--out", default="bench/thesis/results", show_default=True, type=click.Path(file_okay=False),
              help="Where results.json and results.md go.")
@click.option("--cache", default="bench/thesis/.cache", show_default=True, type=click.Path(file_okay=False),
              help="Tokenized corpus, the pre-trained base (reused) and the fine-tuning run directories.")
@click.option("--mini", is_flag=True, help="The miniature run of the config's `mini` section (~20 s on 2 cores).")
@click.option("--seeds", default=None, help="Comma-separated fine-tuning seeds, overriding the config's.")
def main(config_path, out, cache, mini, seeds):
    """Generic vs Mistral-aware fine-tuning, measured on a small Mistral pre-trained here."""
    try:
        cfg = load_experiment(config_path, mini)
        if seeds:
            cfg["seeds"] = [int(s) for s in seeds.split(",")]
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    command = "python -m bench.thesis.run " + " ".join(sys.argv[1:])
    run_experiment(copy.deepcopy(cfg), Path(out), Path(cache), command, "mini" if mini else "full")


if __name__ == "__main__":
    main()
