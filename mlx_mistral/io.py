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


def write_json(path: str | Path, obj, indent: int = 2):
    """Write `obj` as JSON to `path` atomically."""
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str):
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(text)


def save_safetensors(path: str | Path, arrays: dict, metadata: dict | None = None):
    """Save a dict of `mx.array` (or numpy arrays) as safetensors, atomically."""
    import mlx.core as mx

    arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in arrays.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:  # mx.save_safetensors wants this suffix
        mx.save_safetensors(str(tmp), arrays, metadata={k: str(v) for k, v in (metadata or {}).items()})
