"""An offline Hugging Face Hub cache built in a test: repos laid out as `snapshot_download` leaves them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def offline_hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hub cache in tmp, offline (env for child processes, constants for this one, read at import)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main", kind: str = "datasets") -> str:
    """Put a repo's files (a `kind` of "datasets" or "models") in the Hub cache; returns the commit."""
    storage = cache / (f"{kind}--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for rel, content in files.items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return commit
