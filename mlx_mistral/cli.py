"""`mlx-mistral`: the command line, a thin layer over the library.

Each command group lives beside its library module; this file wires them together and holds the
commands of the foundation (`generate`, `info`).
"""

from __future__ import annotations

import sys

import click

import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx.core)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(mlx_mistral.__version__, prog_name="mlx-mistral")
def main():
    """Fine-tune Mistral 7B, Mixtral 8x7B and Mistral-Nemo on a Mac (MLX) or an NVIDIA box (torch).

    \b
    Typical session:
      mlx-mistral data inspect ./my-data --model mistralai/Mistral-7B-v0.3 --seq-len 2048
      mlx-mistral plan --model mistralai/Mistral-7B-v0.3 --memory 16GB
      mlx-mistral train --config configs/mistral-7b-v0.3-qlora-16gb.yaml --data ./my-data
      mlx-mistral generate --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --prompt "..."
      mlx-mistral export gguf --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --out my.gguf
    """


@main.command()
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
    from .torch_backend import load, load_adapters, stream_generate

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


@main.command()
def info():
    """Show versions, the BLAS in use and the compute device."""
    import platform

    import mlx.core as mx

    from ._blas import STATUS

    click.echo(f"mlx-mistral {mlx_mistral.__version__} on {platform.platform()}")
    click.echo(f"mlx {mx.__version__}, device {mx.default_device()}")
    click.echo(f"BLAS: {STATUS['loaded'] or 'bundled'} ({STATUS['reason']})")


def _register():
    """Attach the command groups of the other modules (each optional until its module exists)."""
    import importlib

    for mod, name in (("data", "commands"), ("trainer_cli", "commands"), ("dashboard", "commands"),
                      ("convert_cli", "commands"), ("torch_backend", "commands"), ("demo", "commands")):
        try:
            m = importlib.import_module(f"mlx_mistral.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"mlx_mistral.{mod}":
                raise
            continue
        obj = getattr(m, name, None)
        for cmd in (obj if isinstance(obj, (list, tuple)) else [obj] if obj is not None else []):
            main.add_command(cmd)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
