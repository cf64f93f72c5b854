"""`mlx-mistral train | eval | plan`: thin commands over the library (recipes/finetune.py, core)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from .config_flags import config_options, config_overrides


def _fail(e: Exception, hint: str | None = None):
    raise click.BadParameter(str(e), param_hint=hint) if hint else click.ClickException(str(e))


# Config keys that `train` takes as flags (help, type and range come from core/train_config.py).
TRAIN_FLAGS = ("model", "data", "out", "backend", "dtype", "quantize", "fine_tune", "seq_len", "packing", "loss_on",
               "lora_rank", "lora_alpha", "rank_policy", "steps", "batch_size", "grad_accum", "lr", "warmup_steps",
               "grad_checkpoint", "seed", "eval_every", "save_every", "log_every", "report_to")


@click.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (see configs/).")
@config_options(TRAIN_FLAGS)
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its latest checkpoint (flags may change steps, logging, "
                   "evaluation and saving; anything the checkpoint depends on is refused).")
@click.option("--overwrite", is_flag=True,
              help="Start over in an --out that holds a run: its run files (checkpoints, adapters, "
                   "metrics.jsonl, config.yaml) are removed; a folder with other files is never emptied.")
@click.option("--no-dashboard", is_flag=True, help="Plain log lines instead of the live dashboard.")
def train(config_path, resume, overwrite, no_dashboard, **flags):
    """Fine-tune with LoRA / QLoRA (or fully) on packed rows, supervised or by preference (DPO, ORPO);
    writes a run directory.

    Settings come from the dataclass defaults, then --config, then these flags (every config key is
    listed in the README; the ones without a flag go in the YAML). With --resume the run's own
    config.yaml is the base instead (flags still override) and training continues exactly.

    \b
    --loss-on, per record shape of the data:
      value     chat {"messages"}          prompt/completion    text
      default   every assistant turn       the completion       all
      last      the last assistant turn    the completion       all
      all       every token                every token          all
    (an assistant turn's loss includes its EOS, so the model learns to stop)
    """
    from ..backends import pick_backend
    from ..core.train_config import load_config
    from ..recipes.finetune import finetune

    overrides = config_overrides(flags)
    out = overrides.get("out")
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
    if not cfg.model:
        raise click.BadParameter("no model: pass --model or set 'model:' in the config", param_hint="--model")
    if not (cfg.data or cfg.datasets):
        raise click.BadParameter("no data: pass --data or set 'data:' (or a 'datasets:' list) in the config",
                                 param_hint="--data")
    try:
        pick_backend(cfg.backend)
    except ValueError as e:
        _fail(e, "--backend")
    try:
        end = finetune(cfg, resume=resume, overwrite=overwrite, display="plain" if no_dashboard else "auto")
    except ValueError as e:
        _fail(e)
    from ..core.loop import EXIT_CODES

    if end["reason"] in ("nan", "stalled"):
        raise click.ClickException(end["message"])
    if end["reason"] in ("interrupted", "terminated"):
        click.echo(end["message"], err=True)
        raise SystemExit(EXIT_CODES[end["reason"]])


@click.command("eval")
@click.option("--model", "model_path", required=True, help="Base model directory or Hub id.")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run directory with adapters.")
@click.option("--data", required=True, help="Dataset directory or .jsonl file.")
@click.option("--split", default="all", show_default=True, type=click.Choice(["all", "train", "valid", "test"]),
              help="all: every split the dataset has.")
@click.option("--seq-len", default=None, type=click.IntRange(min=2),
              help="Tokens per packed row  [default: the run's, else 2048].")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]),
              help="auto: MLX on Apple silicon, torch with CUDA; on other machines see the README.")
def eval_cmd(model_path, adapter, data, split, seq_len, batch_size, backend):
    """Loss and perplexity of a model (with an adapter) on each split of a dataset, on the rows and loss masks
    training used (the run's config.yaml: packing, row length, and for chats the loss on the assistant turns)."""
    from ..backends import load, load_adapters
    from ..core.data import resolve_split
    from ..recipes.finetune import evaluate

    try:
        model, tok = load(model_path, backend=backend or "auto")
        if adapter:
            load_adapters(model, adapter)
        if split not in ("all", "train"):  # the train split is checked where it is read, with its own message
            try:
                resolve_split(data, split)
            except ValueError:
                raise click.BadParameter(f"{data} has no {split} split ({split}.jsonl)", param_hint="--split") from None
        splits = ("train", "valid", "test") if split == "all" else (split,)
        run_dir = adapter or (model_path if (Path(model_path) / "config.yaml").is_file() else None)
        results = evaluate(model, tok, data, splits, run_dir=run_dir, seq_len=seq_len, batch_size=batch_size)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    for name, r in results.items():
        click.echo(f"{name}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  ({r['tokens']} loss tokens)")


@click.command("plan")
@click.option("--model", "model_spec", required=True,
              help="Model directory, Hub id, config.json, or a bundled config name (e.g. mistral-7b-v0.3).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Training YAML to plan for.")
@click.option("--memory", "budget", required=True, help="Memory budget, e.g. 16GB.")
def plan(model_spec, config_path, budget):
    """Predict peak training memory and propose the largest setting that fits the budget."""
    from ..core.adapters import count_params, plan_for_config
    from ..core.config import BUNDLED, ModelArgs, bundled_config
    from ..core.weights import storage_dtype
    from ..core.memory import estimate, parse_size, propose
    from ..core.train_config import load_config, resolve_dtype

    try:
        cfg = load_config(config_path)
        budget_b = parse_size(budget)
        p = Path(model_spec)
        if p.exists():
            args = ModelArgs.from_dir(p)
        elif "/" not in model_spec:
            args = bundled_config(model_spec)
            p = BUNDLED / f"{model_spec}.json"
        else:
            from ..core.hub import resolve_path

            p = resolve_path(model_spec)
            args = ModelArgs.from_dir(p)
        cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, storage_dtype(p))[0])  # dtype auto: the checkpoint's
        n = 0 if cfg.trains_full else count_params(plan_for_config(args, cfg))
        bits = cfg.quantize or (args.quantization or {}).get("bits")
        kw = dict(fine_tune="full" if cfg.trains_full else "lora", objective=cfg.objective, trainable_params=n, bits=bits, group_size=cfg.quantize_group_size,
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

