"""Where models come from: a local directory or a Hugging Face Hub repo id, its weight files, its tokenizer.

Both backends load through `open_model`: the directory is resolved here, the backend builds the model from
it, and the tokenizer is checked against the model's vocabulary here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .io import read_json
from .tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer


def _is_repo_id(s: str) -> bool:
    return not s.startswith((".", "/", "~")) and s.count("/") == 1


is_repo_id = _is_repo_id  # "owner/name", not a path: what the model card and upload call a Hub id


def resolve_path(path_or_repo: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id fetched with `snapshot_download`
    (which honours `HF_HUB_OFFLINE` and the local cache)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{p} is a file; pass the model directory")
        return p
    s = str(path_or_repo)
    if not _is_repo_id(s):
        raise ValueError(f"{s} is neither an existing directory nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer.model*",
                                                          "tekken.json"]))
    except Exception as e:  # network, auth, offline cache miss: say what was tried
        raise ValueError(f"could not fetch {s!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                         "Check the id, your token (huggingface-cli login) or HF_HUB_OFFLINE.") from None


def fetch_tokenizer(repo: str) -> Tokenizer:
    """The tokenizer of a Hub repo, fetching only its tokenizer files."""
    from huggingface_hub import snapshot_download

    try:
        d = snapshot_download(repo, allow_patterns=["tokenizer.model*", "tekken.json"])
        return Tokenizer(find_tokenizer_file(d))
    except Exception as e:  # network, auth, missing files: say which
        raise ValueError(f"could not get the tokenizer of {repo}: {e}") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, `model*.safetensors`, Mistral's
    `consolidated*.safetensors`, or any `*.safetensors` but adapters (never pickled `.bin`/`.pt`)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        root = model_dir.resolve()
        outside = [f for f in files if not isinstance(f, str) or Path(f).is_absolute()
                   or root not in (model_dir / f).resolve().parents]
        if outside:
            raise ValueError(f"{index} points outside the model folder ({', '.join(map(str, outside[:3]))}); "
                             "shards must be files inside it")
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise ValueError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("consolidated*.safetensors"))
    if not files:
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.name != "adapters.safetensors")
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights (pickled .bin/.pt checkpoints are "
                         "not read: they can run code). Convert them to safetensors first.")
    return files


def is_mistral_native(model_dir: Path) -> bool:
    """A `params.json` + `consolidated.safetensors` directory (Mistral's own format)."""
    return (model_dir / "params.json").exists() and not (model_dir / "config.json").exists()


def open_model(path_or_repo: str | Path, build: Callable[[Path], object]):
    """`(model, tokenizer)`: `build(model_dir)` (a backend's loader) on the resolved directory, and the
    directory's tokenizer, refused when it has more tokens than the model's embedding."""
    model_dir = resolve_path(path_or_repo)
    model = build(model_dir)
    tok = load_tokenizer(model_dir)
    if tok.vocab_size > model.args.vocab_size:  # ids past the embedding would read out of bounds
        raise ValueError(f"{model_dir}: the tokenizer ({tok.path.name}) has {tok.vocab_size} tokens but the "
                         f"model's vocab_size is {model.args.vocab_size}; they belong to different models")
    return model, tok
