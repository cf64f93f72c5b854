"""`write_report(run_dir)`: what `mlx-mistral report RUN` runs: read metrics.jsonl and config.yaml, render
the page (ui/report.py), write it atomically (default `RUN/report.html`). Works on a run still training:
the page shows what is logged so far."""

from __future__ import annotations

import time
from pathlib import Path

from ..core.io import write_text
from ..ui.metrics import METRICS_FILE, read_events, summary
from ..ui.report import render_report


def write_report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write the HTML report of `run_dir` to `out` (default RUN/report.html); returns {"out", "status",
    "step", "events", "bad_lines"}. ValueError when `run_dir` has no metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory: give a run directory (the --out of train)")
    events, bad = read_events(run_dir / METRICS_FILE)
    cfg_path = run_dir / "config.yaml"
    page = render_report(events, cfg_path.read_text() if cfg_path.is_file() else None, title=run_dir.resolve().name,
                         bad_lines=bad, now=time.time())
    out = Path(out) if out else run_dir / "report.html"
    write_text(out, page)
    s = summary(events)
    return {"out": str(out), "status": s["status"], "step": s["step"], "events": len(events), "bad_lines": bad}
