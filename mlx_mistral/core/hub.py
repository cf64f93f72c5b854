"""Where models come from: a local directory or a Hugging Face Hub repo id, its weight files, its tokenizer.

Both backends load through `open_model`: the directory is resolved here, the backend builds the model from
it, and the tokenizer is checked against the model's vocabulary here.
"""

from __future__ import annotations

import json
import re
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


CONFIG_FILES = ("config.json", "params.json")  # Hugging Face layout, then Mistral's own


def fetch_config(repo: str, revision: str | None = None) -> Path:
    """The local path of a Hub model repo's `config.json` (or `params.json` for a Mistral-native repo),
    fetched alone with `hf_hub_download` (honouring `HF_HUB_OFFLINE` and the cache): never its weights."""
    if not _is_repo_id(repo):
        raise ValueError(f"{repo} is not a Hugging Face repo id (owner/name)")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in CONFIG_FILES:
        try:
            return Path(hf_hub_download(repo, name, revision=revision))
        except Exception as e:  # missing file, network, auth, offline cache miss: try the next, then say which
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise ValueError(f"could not fetch the config of {repo!r} from the Hugging Face Hub ({'; '.join(errors)}). "
                     "Check the id, your token (huggingface-cli login) or HF_HUB_OFFLINE.")


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


# ---- datasets -----------------------------------------------------------------------------------------------
# A Hub dataset is named `owner/name` or `owner/name@revision` (a branch, tag or commit). Its data files are
# the repo's `*.jsonl` and `*.parquet` files; a split's files are those with the split's name (or an alias)
# as a folder or as the start of the file name, followed by "-", ".", " " or a digit (`train.jsonl`,
# `data/train-00000-of-00002.parquet`, `validation/0.jsonl`), the Hub's own naming convention. A repo whose
# files name no split at all is one train split.
DATA_EXTENSIONS = (".jsonl", ".parquet")
SPLIT_ALIASES = {"train": ("train", "training"), "valid": ("valid", "validation", "val", "dev", "eval"),
                 "test": ("test", "testing")}
_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def is_dataset_id(spec: str | Path) -> bool:
    """Whether `spec` names a Hub dataset (`owner/name[@revision]`) rather than an existing local path."""
    s = str(spec)
    return not Path(s).expanduser().exists() and not s.startswith((".", "/", "~")) and bool(_DATASET_ID.fullmatch(s))


def parse_dataset_id(spec: str) -> tuple[str, str | None]:
    """(`owner/name`, revision or None) of a Hub dataset id."""
    repo, _, rev = str(spec).partition("@")
    return repo, rev or None


def dataset_snapshot(spec: str, revision: str | None = None) -> Path:
    """The local snapshot of a Hub dataset's data files (`*.jsonl`, `*.parquet`), fetched with
    `snapshot_download` (honouring `HF_HUB_OFFLINE` and `HF_HUB_CACHE`); its folder name is the commit."""
    from huggingface_hub import snapshot_download

    repo, rev = parse_dataset_id(spec)
    rev = revision or rev
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=rev,
                                      allow_patterns=[f"*{e}" for e in DATA_EXTENSIONS]))
    except Exception as e:  # network, auth, offline cache miss, unknown revision: say what was tried
        raise ValueError(f"could not fetch dataset {repo!r}{f' at revision {rev!r}' if rev else ''} from the "
                         f"Hugging Face Hub ({type(e).__name__}: {e}). Check the id and revision, your token "
                         "(huggingface-cli login) or HF_HUB_OFFLINE.") from None


def _names_split(rel: Path, names) -> bool:
    parts = [*rel.parts[:-1], rel.name.split(".")[0]]
    return any(p == n or (p.startswith(n) and p[len(n)] in "-. 0123456789") for p in parts for n in names)


def dataset_split_files(root: Path, split: str, fmt: str | None = None) -> list[Path]:
    """The data files of `split` in a dataset snapshot `root` (sorted; [] when the split has none); `fmt`
    ("jsonl" / "parquet") keeps files of that format only."""
    rels = (p.relative_to(root) for p in root.rglob("*") if p.suffix in DATA_EXTENSIONS)
    files = sorted(r for r in rels if (fmt is None or r.suffix == f".{fmt}")
                   and not any(x.startswith(".") for x in r.parts))
    mine = [f for f in files if _names_split(f, SPLIT_ALIASES.get(split, (split,)))]
    if not mine and split == "train" and not any(_names_split(f, names) for f in files
                                                  for names in SPLIT_ALIASES.values()):
        mine = files  # no split naming at all: everything is the train split
    return [root / f for f in mine]
