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
               "grad_checkpoint", "attention", "attention_block", "seed", "eval_every", "save_every", "log_every", "report_to")


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


def _resolve_model(spec: str):
    """(ModelArgs, the config file or directory read): a local directory or config file, a bundled config
    name, or a Hub id, whose config.json (or params.json) alone is fetched, never its weights."""
    from ..core.config import BUNDLED, ModelArgs, bundled_config
    from ..core.hub import fetch_config, is_repo_id

    p = Path(spec).expanduser()
    if p.exists():
        return ModelArgs.from_dir(p), p
    if "/" not in spec:
        return bundled_config(spec), BUNDLED / f"{spec}.json"
    if not is_repo_id(spec):
        raise ValueError(f"{spec} is neither an existing path, a bundled config name nor a Hub id (owner/name)")
    p = fetch_config(spec)
    return ModelArgs.from_dir(p), p


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


@click.command("plan")
@click.option("--model", "model_spec", required=True,
              help="Model directory, config.json, Hub id (only its config.json is fetched), or a bundled config "
                   "name (e.g. mistral-7b-v0.3).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Training YAML to plan for (its settings are the defaults the flags below override).")
@click.option("--memory", "budget", required=True, help="Memory budget, e.g. 16GB (planned to 85% of it).")
@click.option("--seq-len", type=click.IntRange(min=2), help="Tokens per packed row  [default: the config's, else 2048].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per micro-step  [default: the config's, else 1].")
@click.option("--quantize", type=click.Choice(["4", "8"]),
              help="Quantize the base to 4 or 8 bits (QLoRA)  [default: the config's; without a config, 4 when "
                   "the unquantized base does not fit the budget].")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None,
              help="Recompute each layer in the backward pass  [default: the config's; without a config, on].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Base weights' and activations' dtype  [default: the config's; without a config, the "
                   "checkpoint's, bfloat16 when it names none].")
@click.option("--attention", type=click.Choice(["auto", "dense", "blockwise"]),
              help="dense: (L, L) scores per layer; blockwise: query blocks over their key band, memory linear in "
                   "the row; auto: dense for short rows  [default: the config's, else auto].")
@click.option("--attention-block", type=click.IntRange(min=1),
              help="Query block size of blockwise attention  [default: about half the window, 64..512].")
def plan(model_spec, config_path, budget, seq_len, batch_size, quantize, grad_checkpoint, dtype, attention,
         attention_block):
    """Predict the peak memory of a training step, show where it goes and which attention path is used,
    and find the longest row that fits the budget.

    Without --config, settings no flag gives are chosen to fit: batch 1, gradient checkpointing on, the
    checkpoint's dtype, and a 4-bit base when the unquantized one does not fit (the output says which)."""
    from ..core.adapters import count_params, plan_for_config
    from ..core.memory import ROW_LENGTHS, estimate, longest_row, parse_size, propose
    from ..core.train_config import load_config, resolve_dtype
    from ..core.weights import storage_dtype

    given = {"seq_len": seq_len, "batch_size": batch_size, "quantize": int(quantize) if quantize else None,
             "grad_checkpoint": grad_checkpoint, "dtype": dtype}
    given = {k: v for k, v in given.items() if v is not None}
    chosen = []  # defaults picked here (no config): said in the output
    try:
        budget_b = parse_size(budget)
        args, source = _resolve_model(model_spec)
        cfg = load_config(config_path, given)
        stored = storage_dtype(source)
        if config_path or "dtype" in given:
            cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, stored)[0])  # auto: the checkpoint's
        else:
            cfg = replace(cfg, dtype=stored or "bfloat16")
            chosen.append(f"--dtype {cfg.dtype} ({'the checkpoint' + chr(39) + 's' if stored else 'the checkpoint names none'})")
        if not config_path:
            if "batch_size" not in given:
                cfg = replace(cfg, batch_size=1)
                chosen.append("--batch-size 1")
            if "grad_checkpoint" not in given:
                cfg = replace(cfg, grad_checkpoint=True)
                chosen.append("--grad-checkpoint")
        attention = attention or getattr(cfg, "attention", "auto")
        attention_block = attention_block or getattr(cfg, "attention_block", None)
        n = 0 if cfg.trains_full else count_params(plan_for_config(args, cfg))
        kw = dict(fine_tune="full" if cfg.trains_full else "lora", objective=cfg.objective, trainable_params=n,
                  group_size=cfg.quantize_group_size, dtype=cfg.dtype, grad_accum=cfg.grad_accum,
                  attention=attention, attention_block=attention_block)
        bits = cfg.quantize or (args.quantization or {}).get("bits")

        def step(bits_, **over):
            return estimate(args, **{**kw, "bits": bits_, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                                     "grad_checkpoint": cfg.grad_checkpoint, **over})

        e = step(bits)
        if not (config_path or "quantize" in given or bits or cfg.trains_full) and e.total > 0.85 * budget_b:
            bits, unquantized = 4, e.total
            e = step(bits)
            chosen.append(f"--quantize 4 (unquantized: {_gb(unquantized)}, over the budget)")
        kw["bits"] = bits
        longest = longest_row(args, budget_b, batch_size=cfg.batch_size, grad_checkpoint=cfg.grad_checkpoint, **kw)
        others = {}
        for path in ("dense", "blockwise"):
            if path != attention:
                others[path] = longest_row(args, budget_b, batch_size=cfg.batch_size,
                                           grad_checkpoint=cfg.grad_checkpoint, **{**kw, "attention": path,
                                                                                 "attention_block": attention_block})
        fits = propose(args, budget_b, seq_lens=[x for x in ROW_LENGTHS if x & (x - 1) == 0
                                                 and x <= args.max_position_embeddings], **kw)
    except ValueError as err:
        raise click.ClickException(str(err)) from None

    click.echo(f"{model_spec} ({args.model_type}, {args.param_count() / 1e9:.2f}B parameters, window "
               f"{args.sliding_window or 'none'}): {cfg.fine_tune}"
               f"{f' ({n:,} trainable, {cfg.rank_policy} rank {cfg.lora_rank})' if n else ''}, "
               f"weights at {f'{bits} bits' if bits else cfg.dtype}")
    if chosen:
        click.echo("chosen to fit (no --config; a flag overrides each): " + ", ".join(chosen))
    how = (f"blockwise, query blocks of {e.block}" if e.block else "dense (L x L scores per layer)")
    if attention == "auto":
        how += " (auto)"
    click.echo(f"batch {cfg.batch_size} x seq {cfg.seq_len}, checkpointing {'on' if cfg.grad_checkpoint else 'off'}, "
               f"{'float32' if cfg.trains_full else cfg.dtype} activations, attention {how}:")
    for k, v in e.as_dict().items():
        click.echo(f"  {k:<12}{v / 1e9:8.2f} GB")
    verdict = "fits" if e.total <= 0.85 * budget_b else "does NOT fit"
    click.echo(f"  {verdict} in {budget} (planning to 85%: {_gb(0.85 * budget_b)})")
    at = f"batch {cfg.batch_size}, checkpointing {'on' if cfg.grad_checkpoint else 'off'}"
    if longest:
        L, le = longest
        extra = [f"--attention {p} {f'--seq-len {r[0]}' if r else 'fits no row'}" for p, r in others.items()]
        click.echo(f"longest row that fits at {at}: --seq-len {L} ({_gb(le.total)}, attention "
                   f"{f'blockwise, blocks of {le.block}' if le.block else 'dense'})"
                   + (f"; with {', '.join(extra)}" if extra else ""))
    else:
        tips = [t for t, needed in (("--quantize 4", not bits and not cfg.trains_full),
                                    ("--grad-checkpoint", not cfg.grad_checkpoint),
                                    ("--batch-size 1", cfg.batch_size > 1),
                                    ("--attention blockwise", attention == "dense")) if needed]
        click.echo(f"no row of {ROW_LENGTHS[0]} tokens or more fits at {at}"
                   + (f": try {', '.join(tips)}" if tips else ""))
    if fits:
        f = fits[0]
        click.echo(f"most tokens per step: --seq-len {f['seq_len']} --batch-size {f['batch_size']} "
                   f"--{'' if f['grad_checkpoint'] else 'no-'}grad-checkpoint ({_gb(f['estimate'].total)})")
    elif not longest:
        click.echo("nothing fits at any batch size or row length: a smaller model (--model) or a larger --memory")
