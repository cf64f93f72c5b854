"""Checkpoint directories, shared by both trainers: `checkpoints/step-NNNNNNN/` holding
`weights.safetensors`, `optimizer.safetensors` and `state.json` (no pickle).

A checkpoint is written into a temp directory and renamed into place, so a directory with a
`state.json` is always complete; only the last `keep` complete ones are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .io import write_json


def complete(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists())


def latest(run_dir: str | Path) -> Path | None:
    done = complete(run_dir)
    return done[-1] if done else None


def write(run_dir: str | Path, step: int, state: dict, write_tensors: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step`: `write_tensors(tmp_dir)` writes the safetensors files, then `state.json`,
    then the directory is renamed into place and older checkpoints beyond `keep` are removed."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_tensors(tmp)
    write_json(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_state(path: Path, global_batch: int) -> dict:
    """`state.json` of a checkpoint, refusing one saved with another global batch (the data order differs)."""
    state = json.loads((path / "state.json").read_text())
    if state.get("global_batch") != global_batch:
        raise ValueError(f"{path}: saved with a global batch of {state.get('global_batch')} rows, this run "
                         f"has {global_batch} (batch_size x grad_accum x ranks); resume with the same settings")
    return state


def check_names(where: str, found, expected, what: str):
    """ValueError `{where}: {what} (e.g. ...)` unless the tensor names `found` are exactly `expected`."""
    if set(found) != set(expected):
        raise ValueError(f"{where}: {what} (e.g. {sorted(set(found) ^ set(expected))[:3]})")
