"""The trainer callback that needs no display: the JSONL log that `dashboard` replays (ui/dashboard.py).

A callback is any callable taking one event dict (see the trainer's module doc for the events).
"""

from __future__ import annotations

import json
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
