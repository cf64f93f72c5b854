"""Run directories: owned by one process, never reused silently, cleaned of a dead process's temp files.

- `claim(path, resume=..., overwrite=...)` checks the folder is writable *before* any model is loaded,
  takes an exclusive `flock` on `RUN/.lock` (the kernel drops it when the process dies, so a crash or
  kill -9 never leaves the run stuck), and then decides: a fresh or empty folder is used; a folder that
  holds a run is refused unless `resume` (continue it) or `overwrite` (remove the run's files, listed);
  a folder with files no run writes is never emptied.
- Once the lock is held, every temp file in the run is a dead process's (ours are written under the
  lock), so `claim` removes them: `checkpoints/.step-*.tmp*` folders (GB-sized for a full fine-tune) and
  the `.NAME.*` files of interrupted atomic writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

#: What a run writes at its top level (anything else is the user's and is never removed).
RUN_FILES = ("config.yaml", "metrics.jsonl", "adapters.safetensors", "adapter_config.json", "model.safetensors",
             "model.safetensors.index.json", "config.json", "tokenizer.model", "tekken.json", "checkpoints", "base",
             "report.html", "data_format.json", ".lock")
LOCK = ".lock"


@dataclass
class RunLock:
    """An exclusive claim on a run directory; `release()` (or process exit) gives it up."""

    path: Path
    fd: int | None
    removed_temps: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)

    def release(self):
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def run_files(path: Path) -> list[str]:
    """The run's own entries present in `path` (sorted), the lock excepted."""
    return sorted(n for n in RUN_FILES if n != LOCK and (path / n).exists())


def foreign_files(path: Path) -> list[str]:
    """Entries of `path` that no run writes (temp files of atomic writes count as the run's)."""
    return sorted(p.name for p in path.iterdir() if p.name not in RUN_FILES and not _is_temp(p.name))


def _is_temp(name: str) -> bool:
    return name.startswith(".") and (".tmp" in name or name.endswith(".safetensors"))


def check_writable(path: str | Path) -> Path:
    """Create `path` (and parents) and prove a file can be written there; ValueError naming it otherwise."""
    path = Path(path).expanduser()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot use {path} as a run directory: {parent} is a file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the run directory {path}: {e.strerror or e}") from None
    return path


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            holder = (f" (pid {info.get('pid')} on {info.get('host')}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('since', 0)))})")
        except (OSError, ValueError):
            pass
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ValueError(f"{path} is in use by another training process{holder}; wait for it to finish "
                             "or choose another --out") from None
        raise ValueError(f"cannot lock the run directory {path}: {e.strerror or e}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
    return fd


def remove_stale_temps(path: Path) -> list[str]:
    """Delete the temp files and folders of interrupted writes under `path` (call only under the lock)."""
    removed = []
    for p in [*path.glob(".*"), *(path / "checkpoints").glob(".*")]:
        if p.name == LOCK or not _is_temp(p.name) and not p.name.startswith(".step-"):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(path)))
    return sorted(removed)


def claim(path: str | Path, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Take the run directory `path` for one training process (see the module doc); ValueError says why not."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or start it over")
    path = check_writable(path)
    fd = _lock(path)
    lock = RunLock(path, fd)
    try:
        lock.removed_temps = remove_stale_temps(path)
        present = run_files(path)
        foreign = foreign_files(path)
        if resume:
            if "config.yaml" not in present:
                raise ValueError(f"--resume: {path} holds no run (no config.yaml); start it without --resume")
        elif present or foreign:
            if not overwrite or foreign:
                what = ", ".join(present + foreign)
                hint = ("; it also holds files no run writes, so it is never emptied: choose another --out"
                        if foreign else "; --resume continues it, --overwrite removes those files and starts over, "
                        "or choose another --out")
                raise ValueError(f"{path} is not empty ({what}){hint}")
            for name in present:
                p = path / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            lock.overwritten = present
    except BaseException:
        lock.release()
        raise
    return lock
