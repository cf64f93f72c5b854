"""Checkpoint directories, shared by both trainers: `checkpoints/step-NNNNNNN/` holding
`weights.safetensors`, `optimizer.safetensors` and `state.json` (no pickle).

A checkpoint is written into a temp directory and renamed into place, so a directory with a
`state.json` is always complete. A complete checkpoint is *verified* (an empty `VERIFIED` file) once its
weights have produced a finite loss; until then it may hold the weights of a diverging update. Only the
last `keep` complete ones are kept, and never at the cost of the newest verified one.
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


VERIFIED = "VERIFIED"


def is_verified(path: Path) -> bool:
    return (Path(path) / VERIFIED).exists()


def latest_verified(run_dir: str | Path) -> Path | None:
    good = [p for p in complete(run_dir) if is_verified(p)]
    return good[-1] if good else None


def mark_verified(path: Path):
    """Record that checkpoint `path`'s weights produced a finite loss (an empty file, so a crash mid-way
    leaves it unverified, never half-verified)."""
    (Path(path) / VERIFIED).touch()


def drop_unverified(run_dir: str | Path) -> list[Path]:
    """Delete the complete checkpoints newer than the newest verified one (their weights diverged);
    returns what was deleted."""
    good = latest_verified(run_dir)
    bad = [p for p in complete(run_dir) if good is None or p.name > good.name]
    for p in bad:
        shutil.rmtree(p)
    return bad


def _rotate(run_dir: str | Path, keep: int):
    """Keep the last `keep` complete checkpoints, and the newest verified one even when it is older."""
    done = complete(run_dir)
    good = latest_verified(run_dir)
    for old in done[:-keep]:
        if old != good:
            shutil.rmtree(old)


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
    _rotate(run_dir, keep)
    return final


def read_state(path: Path, global_batch: int) -> dict:
    """`state.json` of a checkpoint, refusing one saved with another global batch (the data order differs)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}/state.json cannot be read ({e}); the checkpoint is damaged: delete {path} "
                         "to resume from the one before it") from None
    if state.get("global_batch") != global_batch:
        raise ValueError(f"{path}: saved with a global batch of {state.get('global_batch')} rows, this run "
                         f"has {global_batch} (batch_size x grad_accum x ranks); resume with the same settings")
    return state


def check_names(where: str, found, expected, what: str):
    """ValueError `{where}: {what} (e.g. ...)` unless the tensor names `found` are exactly `expected`, and,
    where both are mappings of arrays, each tensor has the expected shape (a rank-8 checkpoint never
    loads into a rank-4 run)."""
    if set(found) != set(expected):
        raise ValueError(f"{where}: {what} (e.g. {sorted(set(found) ^ set(expected))[:3]})")
    if isinstance(found, dict) and isinstance(expected, dict):
        for k in sorted(found):
            a, b = getattr(found[k], "shape", None), getattr(expected[k], "shape", None)
            if a is not None and b is not None and tuple(a) != tuple(b):
                raise ValueError(f"{where}: {what}: {k} has shape {tuple(a)} in the checkpoint and {tuple(b)} in "
                                 "this run (another rank, policy, targets or model)")
