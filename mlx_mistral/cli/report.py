"""`mlx-mistral report RUN`: one self-contained HTML page of a run."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (default: RUN/report.html).")
def report_cmd(run_dir: Path, out: Path | None):
    """Write one HTML page of RUN: loss, validation, learning rate, memory and throughput curves (inline
    SVG), the final numbers, packing and context statistics, resumes and the config.

    The page needs nothing else to open (no scripts, no downloads). A run still training gets the page of
    what it has logged so far; a resumed run's repeated steps show their last values.
    """
    from ..recipes.report import write_report

    try:
        r = write_report(run_dir, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(r, indent=2))
