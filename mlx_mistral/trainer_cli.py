"""`mlx-mistral train | eval | plan`: a thin layer over trainer.py, lora.py and memory.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import click

import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx.core)


def _fail(e: Exception, hint: str | None = None):
    raise click.BadParameter(str(e), param_hint=hint) if hint else click.ClickException(str(e))


def resolve_model(spec: str, run_dir: Path, seed: int = 0, group=None) -> Path:
    """A model directory from a path / Hub id, or "tiny:<preset>": a random model built once into
    `run_dir/base` (see tiny.py)."""
    from .distributed import barrier
    from .loader import resolve_path

    if spec.startswith("tiny:"):
        from .tiny import build_tiny

        base = run_dir / "base"
        if (group is None or group.rank() == 0) and not (base / "config.json").exists():
            build_tiny(base, spec.split(":", 1)[1], seed=seed)
        barrier(group)
        return base
    return resolve_path(spec)


def load_rows(data: str, tok, cfg, split: str):
    """Packed `Rows` of one split of a dataset directory (None when the split does not exist)."""
    from .data import load_dataset, progress_bar, resolve_split
    from .packing import pack
    from .trainer import Rows

    try:
        resolve_split(data, split)
    except ValueError:
        if split == "train":
            raise
        return None, None
    with progress_bar(f"tokenizing {split}") as progress:
        docs, masks, _ = load_dataset(data, tok, split, progress=progress)
    packed = pack(docs, cfg.seq_len, masks, overlap=cfg.overlap, mode=cfg.packing)
    return Rows.from_packed(packed), packed


@click.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (see configs/).")
@click.option("--model", help="Model directory, Hub id, or tiny:<preset> for a random model built on the fly.")
@click.option("--data", help="Dataset: a directory with train.jsonl (valid.jsonl optional) or a .jsonl file.")
@click.option("--out", help="Run directory (adapters, checkpoints, metrics.jsonl).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--seq-len", type=click.IntRange(min=2), help="Tokens per packed row.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per micro-step (per process).")
@click.option("--lora-rank", type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--rank-policy", type=click.Choice(["uniform", "gqa"]),
              help="uniform: rank r everywhere; gqa: k/v get r * n_kv_heads / n_heads (alpha/r kept).")
@click.option("--packing", type=click.Choice(["swa", "naive", "none"]), help="How documents fill rows.")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize the base at load (QLoRA).")
@click.option("--fine-tune", type=click.Choice(["lora", "full"]), help="Train adapters or every parameter.")
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]),
              help="auto: MLX on Apple silicon, torch with CUDA; on other machines see the README.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--no-dashboard", is_flag=True, help="Plain log lines instead of the live dashboard.")
def train(config_path, model, data, out, steps, seq_len, batch_size, lora_rank, rank_policy, packing, quantize,
          fine_tune, backend, resume, no_dashboard):
    """Fine-tune with LoRA / QLoRA (or fully) on packed rows; writes a run directory.

    Settings come from the dataclass defaults, then --config, then these flags. With --resume the run's
    own config.yaml is the base instead (flags still override) and training continues exactly.
    """
    from .trainer import load_config

    overrides = {"model": model, "data": data, "out": out, "steps": steps, "seq_len": seq_len,
                 "batch_size": batch_size, "lora_rank": lora_rank, "rank_policy": rank_policy, "packing": packing,
                 "quantize": int(quantize) if quantize else None, "fine_tune": fine_tune, "backend": backend}
    if resume:
        if not out:
            raise click.BadParameter("--resume needs --out RUN_DIR (the run to continue)", param_hint="--out")
        saved = Path(out) / "config.yaml"
        if not saved.exists():
            raise click.BadParameter(f"{saved} does not exist: nothing to resume", param_hint="--out")
        config_path = saved
    try:
        cfg = load_config(config_path, overrides)
    except ValueError as e:
        _fail(e, "--config")
    for key in ("model", "data"):
        if not getattr(cfg, key):
            raise click.BadParameter(f"no {key}: pass --{key} or set '{key}:' in the config", param_hint=f"--{key}")
    end = run_training(cfg, resume=resume, no_dashboard=no_dashboard)
    if end["reason"] == "nan":
        raise click.ClickException(end["message"])
    if end["reason"] == "interrupted":
        click.echo(end["message"], err=True)
        raise SystemExit(130)


def run_training(cfg, resume: bool = False, no_dashboard: bool = True, extra_callbacks=()) -> dict:
    """Load, prepare, train; returns the trainer's "end" event (the CLI's body, usable from scripts)."""
    from .callbacks import JSONLLogger
    from .dashboard import make_callback
    from .distributed import init_group
    from .torch_backend import pick_backend, training_backend
    from .trainer import split_rows, write_run_config

    try:
        backend = pick_backend(cfg.backend)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--backend") from None
    load, prepare_model, Trainer = training_backend(backend)
    group = init_group() if backend == "mlx" else None  # torch joins torchrun's group in its trainer
    rank0 = group is None or group.rank() == 0
    run_dir = Path(cfg.out)
    try:
        model_dir = resolve_model(cfg.model, run_dir, cfg.seed, group)
        model, tok = load(model_dir, dtype="float32" if cfg.fine_tune == "full" else cfg.dtype)
        train_rows, packed = load_rows(cfg.data, tok, cfg, "train")
        val_rows, _ = load_rows(cfg.data, tok, cfg, "valid")
        if val_rows is None and cfg.val_fraction > 0:
            train_rows, val_rows = split_rows(packed, cfg.val_fraction, cfg.seed)
        lora_cfg = prepare_model(model, cfg, str(model_dir))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if rank0:
        write_run_config(run_dir, cfg)
        if lora_cfg is None:  # full fine-tuning: the run directory becomes a loadable model directory
            shutil.copy(tok.path, run_dir / tok.path.name)
    callbacks = list(extra_callbacks)
    display = None
    if rank0:
        callbacks.insert(0, JSONLLogger(run_dir / "metrics.jsonl"))
        display = make_callback(plain=True if no_dashboard else None, total_steps=cfg.steps)
        callbacks.append(display)
    trainer = Trainer(model, cfg, train_rows, val_rows, run_dir, callbacks, lora_config=lora_cfg,
                      model_name=str(model_dir), group=group)
    try:
        if display is not None and hasattr(display, "__enter__"):
            with display:
                return trainer.run(resume=resume)
        return trainer.run(resume=resume)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if rank0:
            callbacks[0].close()


@click.command("eval")
@click.option("--model", "model_path", required=True, help="Base model directory or Hub id.")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run directory with adapters.")
@click.option("--data", required=True, help="Dataset directory or .jsonl file.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))
@click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(min=2))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]),
              help="auto: MLX on Apple silicon, torch with CUDA; on other machines see the README.")
def eval_cmd(model_path, adapter, data, split, seq_len, batch_size, backend):
    """Loss and perplexity of a model (with an adapter) on a dataset split."""
    from .torch_backend import dataset_loss, load, load_adapters
    from .trainer import TrainConfig

    try:
        model, tok = load(model_path, backend=backend or "auto")
        if adapter:
            load_adapters(model, adapter)
        cfg = TrainConfig(seq_len=seq_len, packing="swa")
        rows, _ = load_rows(data, tok, cfg, split)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if rows is None:
        raise click.BadParameter(f"{data} has no {split} split ({split}.jsonl)", param_hint="--split")
    model.eval()
    loss, count = dataset_loss(model, rows, batch_size)
    click.echo(f"{split}: loss {loss:.4f}  ppl {math.exp(min(loss, 700)):.3f}  ({int(count)} loss tokens)")


@click.command("plan")
@click.option("--model", "model_spec", required=True,
              help="Model directory, Hub id, config.json, or a bundled config name (e.g. mistral-7b-v0.3).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Training YAML to plan for.")
@click.option("--memory", "budget", required=True, help="Memory budget, e.g. 16GB.")
def plan(model_spec, config_path, budget):
    """Predict peak training memory and propose the largest setting that fits the budget."""
    from .config import ModelArgs, bundled_config
    from .lora import count_params, plan_modules
    from .memory import estimate, parse_size, propose
    from .trainer import load_config

    try:
        cfg = load_config(config_path)
        budget_b = parse_size(budget)
        p = Path(model_spec)
        if p.exists():
            args = ModelArgs.from_dir(p)
        elif "/" not in model_spec:
            args = bundled_config(model_spec)
        else:
            from .loader import resolve_path

            args = ModelArgs.from_dir(resolve_path(model_spec))
        n = 0 if cfg.fine_tune == "full" else count_params(plan_modules(
            args, cfg.targets, cfg.num_layers, cfg.lora_rank, cfg.lora_alpha, cfg.rank_policy, cfg.rank_floor,
            cfg.rank_pattern or None, cfg.alpha_pattern or None))
        bits = cfg.quantize or (args.quantization or {}).get("bits")
        kw = dict(fine_tune=cfg.fine_tune, trainable_params=n, bits=bits, group_size=cfg.quantize_group_size,
                  dtype=cfg.dtype, grad_accum=cfg.grad_accum)
        e = estimate(args, batch_size=cfg.batch_size, seq_len=cfg.seq_len, grad_checkpoint=cfg.grad_checkpoint, **kw)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    gb = 1e9
    click.echo(f"{args.model_type}: {args.param_count() / 1e9:.2f}B parameters, {cfg.fine_tune}"
               f"{f' ({n:,} trainable, {cfg.rank_policy} rank {cfg.lora_rank})' if n else ''}, "
               f"weights at {bits or cfg.dtype}{' bits' if bits else ''}")
    click.echo(f"at batch {cfg.batch_size} x seq {cfg.seq_len}, checkpointing {'on' if cfg.grad_checkpoint else 'off'}:")
    for k, v in e.as_dict().items():
        click.echo(f"  {k:<12}{v / gb:8.2f} GB")
    verdict = "fits" if e.total <= 0.85 * budget_b else "does NOT fit"
    click.echo(f"  {verdict} in {budget} (planning to 85%: {0.85 * budget_b / gb:.1f} GB)")
    fits = propose(args, budget_b, **kw)
    if fits:
        f = fits[0]
        click.echo(f"largest setting that fits: --seq-len {f['seq_len']} --batch-size {f['batch_size']}"
                   f"{' with grad_checkpoint: true' if f['grad_checkpoint'] else ''} "
                   f"(predicted {f['estimate'].total / gb:.2f} GB)")
    else:
        click.echo("nothing fits: quantize (--quantize 4), use fewer LoRA layers, or a smaller model")


commands = [train, eval_cmd, plan]
