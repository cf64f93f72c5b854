"""`mlx-mistral dashboard RUN_DIR`: the training dashboard of a run, from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("dashboard")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--once", is_flag=True, help="Draw the panel for the run as logged so far and exit.")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between reads of metrics.jsonl while following a run.")
def dashboard_cmd(run_dir: Path, once: bool, interval: float):
    """Draw the training dashboard of RUN_DIR from its metrics.jsonl.

    \b
    While the run goes on, the panel follows the file; once it has ended the final state stays on
    screen. Press q (or Ctrl-C) to quit. When stdin or stdout is not a terminal, or with --once, the
    panel is drawn once and the command exits.
    """
    from ..ui.dashboard import show

    try:
        show(run_dir, once=once, interval=interval)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
