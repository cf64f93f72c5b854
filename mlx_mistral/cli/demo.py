"""`mlx-mistral demo`: the main job end to end on the embedded default (recipes/demo.py), what `make demo` runs."""

from __future__ import annotations

import time

import click

_STYLES = {"step": dict(fg="cyan", bold=True), "info": {}, "note": dict(fg="yellow")}


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for everything the demo makes (replaced if it exists).")
@click.option("--no-dashboard", is_flag=True, help="Plain log lines instead of the live dashboard.")
@click.option("--skip-export", is_flag=True, help="Stop after generation.")
def demo(out, no_dashboard, skip_export):
    """Run the main job on the embedded default: tiny Mistral + bundled chat data -> pre-train briefly ->
    GQA-matched LoRA fine-tune (live dashboard) -> evaluate -> generate -> export HF, PEFT and GGUF."""
    from ..recipes.demo import run_demo

    t0 = time.time()
    try:
        made = run_demo(out, display="plain" if no_dashboard else "auto", skip_export=skip_export,
                        report=lambda kind, text: click.secho(text, **_STYLES[kind]))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo()
    click.secho(f"demo finished in {time.time() - t0:.0f} s; it made:", bold=True)
    for what, path in made.items():
        click.echo(f"  {what:48s} {path}")
    click.echo("next: mlx-mistral dashboard " + str(made["LoRA run (adapters, checkpoints, metrics.jsonl)"])
               + "    (replay the run's panel)")
