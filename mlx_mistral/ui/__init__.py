"""What the user sees: the training dashboard and its charts, plain log lines, progress bars, and the
JSONL log the dashboard replays. Fed by the trainer's event dicts; no click (the commands are cli/)."""
