"""Trainer callbacks that need no UI: the JSONL log and a plain-text logger for non-TTY output.

A callback is any callable taking one event dict (see the trainer's module doc for the events).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class JSONLLogger:
    """Append every event as one JSON line to `path` (flushed per event, so a crash loses nothing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def __call__(self, event: dict):
        self._f.write(json.dumps(event, default=float) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


def format_event(e: dict) -> str | None:
    """One human line per event (None for events not worth a line)."""
    kind = e.get("event")
    if kind == "start":
        return (f"start {e['model']} ({e['fine_tune']}, {e['trainable_params']:,} trainable of "
                f"{e['total_params']:,}) steps {e['start_step']}->{e['total_steps']}, "
                f"seq {e['seq_len']} x batch {e['batch_size']} x accum {e['grad_accum']}, "
                f"packing {e['packing']} ({e['packing_efficiency']:.1%} full)")
    if kind == "train":
        return (f"step {e['step']:>6}  loss {e['loss']:.4f}  lr {e['lr']:.3g}  |g| {e['grad_norm']:.3g}  "
                f"{e['tokens_per_sec']:.0f} tok/s  peak {e['peak_memory'] / 2**30:.2f} GiB")
    if kind == "eval":
        return f"step {e['step']:>6}  val_loss {e['val_loss']:.4f}  val_ppl {e['val_ppl']:.2f}"
    if kind == "checkpoint":
        return f"step {e['step']:>6}  checkpoint {e['path']}"
    if kind == "end":
        return f"end ({e['reason']}) at step {e['step']}: {e['message']}"
    return None


class PlainLogger:
    """Write `format_event` lines to a stream (default stdout)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def __call__(self, event: dict):
        line = format_event(event)
        if line:
            print(line, file=self.stream, flush=True)
