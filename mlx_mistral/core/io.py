"""Atomic writes: every checkpoint, adapter and export goes to a temp file, then is renamed into place.

A crash (or Ctrl-C, or a full disk) therefore leaves either the old file or the new one under the
final name, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temp path beside `path`; on success fsync and rename it to `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix + ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | Path, what: str = "JSON") -> dict:
    """A JSON object from `path`; ValueError naming the file for a missing, unreadable or invalid one."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid {what} (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(obj).__name__}")
    return obj


def write_json(path: str | Path, obj, indent: int = 2):
    """Write `obj` as JSON to `path` atomically."""
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str):
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(text)


def save_safetensors(path: str | Path, arrays: dict, metadata: dict | None = None):
    """Save a dict of numpy arrays as safetensors, atomically (the backends save their own tensors with
    their own writers: `backends.mlx.loader.save_safetensors`, `backends.torch.loader.save_safetensors`)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(arrays, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def read_safetensors(path: str | Path, read):
    """`read(path)` (a backend's safetensors reader), with one clear error for a truncated or corrupt file."""
    try:
        return read(str(path))
    except Exception as e:  # each reader raises its own error types for a truncated / corrupt file
        raise ValueError(f"cannot read {path}: {e} (is the file truncated or not safetensors?)") from None
