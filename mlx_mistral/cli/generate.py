"""`mlx-mistral generate`: streaming generation on either backend."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "model_path", required=True, help="Model directory or Hugging Face repo id.")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True),
              help="Run directory whose LoRA adapters to apply (adapters.safetensors + adapter_config.json).")
@click.option("--prompt", required=True, help="Prompt text (a BOS is prepended).")
@click.option("--max-tokens", default=100, show_default=True, type=click.IntRange(min=1),
              help="Most new tokens to generate.")
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Cast weights to this dtype (default: as stored).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]),
              help="auto: MLX on Apple silicon, torch with CUDA; on other machines see the README.")
def generate(model_path, adapter, prompt, max_tokens, temp, top_p, seed, dtype, backend):
    """Generate text from a prompt, streaming tokens as they come."""
    from ..backends import load, load_adapters, stream_generate

    try:
        model, tok = load(model_path, backend=backend, dtype=dtype)
        if adapter:
            load_adapters(model, adapter)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    ids = tok.encode(prompt, bos=True)
    out: list[int] = []
    shown = ""
    for t in stream_generate(model, ids, max_tokens, temp=temp, top_p=top_p, seed=seed,
                             stop_ids={tok.eos_id}):
        if t == tok.eos_id:
            break
        out.append(t)
        text = tok.decode(out)
        click.echo(text[len(shown):], nl=False)
        shown = text
    click.echo()
