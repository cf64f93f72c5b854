"""Progress bars on a terminal, as the callbacks the library takes (tokenizing, writing exports)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def bytes_bar(label: str = "tokenizing", console=None):
    """A transient rich progress bar; yields the `progress(bytes_done, bytes_total)` callback that
    `core.data.load_dataset` takes (None off a terminal: a log file or a pipe gets no bar, not even a
    blank line). Nothing is drawn on a cache hit."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    console = console or Console()
    if not console.is_terminal:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def steps_bar(description: str):
    """A rich progress bar on a terminal (plain lines otherwise), as the `progress(done, total, what)`
    callback the exporters take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[what]}"), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(description, total=None, what="")

        def update(done: int, total: int, what: str):
            bar.update(task, completed=done, total=total, what=what)

        yield update
