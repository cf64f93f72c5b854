"""A run's `metrics.jsonl` read after the fact: the curves and the final numbers that `report` draws and the
model card of `upload` quotes (the live reader that follows a run is the dashboard's, ui/dashboard.py).

Notable:
- One event per line ("start", "train", "eval", "checkpoint", "end", "resume"; core/loop.py). A line
  still being written (no newline yet, as a running or killed run leaves) is not read; a line that is not
  a JSON object is counted in `bad_lines` and skipped.
- A resumed run logs the steps after its checkpoint again: its "start" (`start_step` N) or "resume" (`step`
  N) event drops every point past N, and a step logged twice keeps its last value.
- Nothing here draws or formats: ui/report.py renders; recipes/upload.py hands `summary` to export/card.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from .dashboard import METRICS_FILE, MetricsReader

TRAIN_SERIES = ("loss", "lr", "grad_norm", "tokens_per_sec", "it_per_sec", "peak_memory", "active_memory")
EVAL_SERIES = ("val_loss", "val_ppl")


def read_events(path: str | Path) -> tuple[list[dict], list[int]]:
    """(events, numbers of the lines that are not JSON objects) of a metrics.jsonl, read once with the
    dashboard's reader (a last line without its newline is still being written and is left out).
    ValueError when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found: is this a run directory (it holds metrics.jsonl once training starts)?")
    reader = MetricsReader(path)
    events, _ = reader.poll()
    return events, reader.bad_lines


def _restart_step(ev: dict) -> int | None:
    """The step a "start" or "resume" event continues from (the points after it are logged again)."""
    kind = ev.get("event")
    if kind == "start":
        return int(ev.get("start_step") or 0)
    if kind == "resume" and isinstance(ev.get("step"), (int, float)):
        return int(ev["step"])
    return None


def resumes(events: list[dict]) -> list[tuple[int, dict]]:
    """[(step resumed from, changed settings)] of every resume: a "start" with a start_step, and the
    "resume" event that may follow it (its "changed" settings) counted once."""
    out: list[tuple[int, dict]] = []
    after_start = False
    for ev in events:
        step = _restart_step(ev)
        if step is None or (ev.get("event") == "start" and step == 0):
            after_start = after_start and ev.get("event") not in ("train", "eval")
            continue
        if ev.get("event") == "resume" and after_start and out and out[-1][0] == step:
            out[-1] = (step, dict(ev.get("changed") or {}))
        else:
            out.append((step, dict(ev.get("changed") or {})))
        after_start = ev.get("event") == "start"
    return out


def series(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...] sorted by step} of every train / eval metric, one value per step (the
    last logged), points dropped by a resume left out; non-finite values are kept (a NaN stop shows)."""
    points: dict[str, dict[int, float]] = {k: {} for k in TRAIN_SERIES + EVAL_SERIES}
    for ev in events:
        restart = _restart_step(ev)
        if restart is not None:
            for p in points.values():
                for s in [s for s in p if s > restart]:
                    del p[s]
            continue
        kind = ev.get("event")
        names = TRAIN_SERIES if kind == "train" else EVAL_SERIES if kind == "eval" else ()
        step = ev.get("step")
        if not isinstance(step, (int, float)):
            continue
        for name in names:
            v = ev.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                points[name][int(step)] = float(v)
    return {k: sorted(p.items()) for k, p in points.items() if p}


def summary(events: list[dict]) -> dict:
    """The run's state and final numbers: status ("running", "done", "interrupted", "nan"), steps,
    final / best losses, tokens, time, peak memory, throughput, how often it was resumed, and the last
    "start" event (settings, packing and context statistics)."""
    starts = [e for e in events if e.get("event") == "start"]
    last_start = starts[-1] if starts else {}
    i_start = max((i for i, e in enumerate(events) if e.get("event") == "start"), default=-1)
    end = next((e for e in reversed(events[i_start + 1:]) if e.get("event") == "end"), None)
    s = series(events)
    out: dict = {"status": end.get("reason", "done") if end else ("running" if starts else "not started"),
                 "start": last_start, "end": end, "resumes": len(resumes(events)),
                 "total_steps": last_start.get("total_steps"),
                 "step": (end or {}).get("step", s["loss"][-1][0] if "loss" in s else 0)}
    if "loss" in s:
        out["final_loss"] = s["loss"][-1][1]
    if "val_loss" in s:
        finite = [(st, v) for st, v in s["val_loss"] if math.isfinite(v)]
        out["final_val_loss"] = s["val_loss"][-1][1]
        if finite:
            out["best_val_step"], out["best_val_loss"] = min(finite, key=lambda p: p[1])
    if "peak_memory" in s:
        out["peak_memory"] = max(v for _, v in s["peak_memory"])
    if "tokens_per_sec" in s:
        rates = sorted(v for _, v in s["tokens_per_sec"])
        out["median_tokens_per_sec"] = rates[len(rates) // 2]
    trains = [e for e in events if e.get("event") == "train"]
    last = end or (trains[-1] if trains else {})
    for key in ("tokens", "elapsed"):
        if isinstance(last.get(key), (int, float)):
            out[key] = last[key]
    return out
