"""`mlx-mistral demo`: the main job end to end on the embedded default (recipes/demo.py), what `make demo` runs."""

from __future__ import annotations

import time

import click

_STYLES = {"step": dict(fg="cyan", bold=True), "info": {}, "note": dict(fg="yellow")}


def _report(console):
    """The demo's report callback: lines styled by kind; the before/after comparison drawn by ui/demo_view.py."""
    def report(kind, payload):
        if kind == "compare":
            from ..ui.demo_view import before_after

            for part in before_after(payload, console.width):
                console.print(part)
        else:
            click.secho(payload, **_STYLES[kind])
    return report


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for everything the demo makes. A folder an earlier demo made has its results "
                   "replaced; any other non-empty folder is refused.")
@click.option("--no-dashboard", is_flag=True, help="Plain log lines instead of the live dashboard.")
@click.option("--skip-export", is_flag=True, help="Stop after the before/after comparison.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the random base's weights and of both runs' data order.")
def demo(out, no_dashboard, skip_export, seed):
    """Run the main job on the embedded default, in about four minutes on 2 CPU cores: build a tiny random
    Mistral and pre-train it on plain Q/A about the Python standard library -> answer held-out questions ->
    GQA-matched LoRA fine-tune (live dashboard) towards answers tagged with the module asked about,
    "[json] ..." -> the same questions again, with the tag-format rate, the right-module rate and the test
    loss before and after -> export HF, PEFT and GGUF."""
    from rich.console import Console

    from ..recipes.demo import run_demo

    t0 = time.time()
    try:
        made = run_demo(out, display="plain" if no_dashboard else "auto", skip_export=skip_export, seed=seed,
                        report=_report(Console()))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo()
    click.secho(f"demo finished in {time.time() - t0:.0f} s; it made:", bold=True)
    for what, path in made.items():
        click.echo(f"  {what:48s} {path}")
    click.echo("next: mlx-mistral dashboard " + str(made["LoRA run (adapters, checkpoints, metrics.jsonl)"])
               + "    (replay the run's panel)")
