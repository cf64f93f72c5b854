"""`upload(path, repo_id)`: a run directory or an export to the Hugging Face Hub, with a model card.

    import mlx_mistral
    mlx_mistral.upload("runs/my-run", "me/my-mistral-lora", private=True)

What is uploaded, by what `path` is (`inspect_source`):
- a run directory with LoRA adapters: PEFT's `adapter_config.json` + `adapter_model.safetensors` at the
  root (so `PeftModel.from_pretrained(base, repo)` works), mlx-lm's adapter files under `mlx-lm/`, and the
  run's own adapters, config.yaml and metrics.jsonl under `mlx-mistral/` (not its checkpoints or base);
- a model directory (`export hf`, `convert hf-to-mlx`): its files as they are;
- a GGUF file (with the Modelfile beside it when it names that file) or a folder of GGUF files.
Everything is assembled in a temporary staging folder (symbolic links to large files, the exports and
README.md written there): the user's directories are never written to. A README.md already in the
source is replaced by the generated card in the upload (said in the result's notes). Then
`HfApi.create_repo(exist_ok=True)`, `create_branch` for a `revision` other than main, and `upload_folder`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..core.adapters import ADAPTER_FORMAT
from ..core.io import write_text
from ..ui.metrics import METRICS_FILE, read_events, summary

RUN_FILES = ("adapters.safetensors", "adapter_config.json", "config.yaml", METRICS_FILE)
SKIP_DIRS = {"checkpoints", "base", ".git", ".cache"}


def _gguf_info(path: Path) -> dict:
    """{"kind": "gguf" | "gguf-lora", "type": file type name} from the GGUF's own metadata (gguf-py)."""
    from gguf import GGUFReader, LlamaFileType

    try:
        fields = GGUFReader(str(path)).fields
    except Exception as e:  # gguf-py raises its own errors for a file that is not GGUF
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None

    def value(key):
        f = fields.get(key)
        return f.contents() if f is not None else None

    if value("general.type") == "adapter":
        return {"kind": "gguf-lora", "type": f"LoRA adapter (alpha {value('adapter.lora.alpha')})"}
    ft = value("general.file_type")
    try:
        name = LlamaFileType(ft).name.replace("MOSTLY_", "") if ft is not None else "unknown type"
    except ValueError:
        name = f"file type {ft}"
    return {"kind": "gguf", "type": name}


def _modelfile_for(gguf: Path) -> Path | None:
    mf = gguf.parent / "Modelfile"
    if mf.is_file() and any(line.split(None, 1)[-1].strip() in (f"./{gguf.name}", gguf.name)
                            for line in mf.read_text().splitlines() if line.upper().startswith("FROM ")):
        return mf
    return None


def inspect_source(path: str | Path) -> dict:
    """{"kind", "files": {path in repo: local file}, "gguf": {...} | None, "run": run dir | None}; ValueError
    naming what was expected when `path` is none of the kinds `upload` knows."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf: upload a run directory, an export directory or a GGUF")
        info = _gguf_info(path)
        files = {path.name: path}
        mf = _modelfile_for(path) if info["kind"] == "gguf" else None
        if mf:
            files["Modelfile"] = mf
        return {"kind": info["kind"], "files": files, "run": None,
                "gguf": {"file": path.name, "type": info["type"], "modelfile": mf is not None}}
    cfg_path = path / "adapter_config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()).get("format") == ADAPTER_FORMAT:
        return {"kind": "adapters", "files": {}, "run": path, "gguf": None}
    if (path / "config.yaml").is_file() and (path / METRICS_FILE).is_file():
        raise ValueError(f"{path} is a full fine-tuning run: export it first (mlx-mistral export hf --model {path} "
                         f"--out DIR), then upload DIR with --run {path} for its metrics")
    files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
             if p.is_file() and not SKIP_DIRS & set(p.relative_to(path).parts[:-1])
             and p.name not in ("README.md", ".gitattributes")}
    ggufs = [n for n in files if n.endswith(".gguf")]
    if (path / "config.json").is_file() and any(n.endswith(".safetensors") for n in files):
        mlx_only = "quantization" in json.loads((path / "config.json").read_text()) or _stacked_experts(path, files)
        return {"kind": "mlx-model" if mlx_only else "model", "files": files, "run": None, "gguf": None}
    if ggufs:
        infos = {n: _gguf_info(files[n]) for n in ggufs}
        kinds = {i["kind"] for i in infos.values()}
        first = ggufs[0]
        return {"kind": kinds.pop() if len(kinds) == 1 else "gguf", "files": files, "run": None,
                "gguf": {"file": first, "type": ", ".join(sorted({i["type"] for i in infos.values()})),
                         "modelfile": "Modelfile" in files}}
    if cfg_path.is_file():
        raise ValueError(f"{path} holds a PEFT or mlx-lm adapter: upload the run directory it came from (its "
                         "card then has the data, config and metrics)")
    raise ValueError(f"{path} is not a run directory (adapter_config.json + adapters.safetensors), a model "
                     "directory (config.json + *.safetensors), a GGUF file or a folder of GGUF files")


def run_info(run_dir: Path) -> dict:
    """What the card says of a run: config.yaml (dict and text), metrics summary, adapter config."""
    import yaml

    info: dict = {"name": run_dir.name}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        info["config_text"] = cfg_path.read_text()
        info["config"] = yaml.safe_load(info["config_text"]) or {}
    if (run_dir / METRICS_FILE).is_file():
        info["summary"] = summary(read_events(run_dir / METRICS_FILE)[0])
    if (run_dir / "adapter_config.json").is_file():
        info["adapter"] = json.loads((run_dir / "adapter_config.json").read_text())
        info["base_model"] = info["adapter"].get("base_model")
    if not info.get("config") and "summary" not in info:
        raise ValueError(f"{run_dir} has neither config.yaml nor {METRICS_FILE}: not a run directory")
    return info


def model_window(model: str | Path | None) -> int | None:
    """The sliding window of a model directory, or of a Hub id whose config ships with us; None if unknown."""
    from ..core.config import ModelArgs, bundled_config
    from ..export.card import hub_id

    if not model:
        return None
    try:
        if Path(model).is_dir():
            args = ModelArgs.from_dir(model)
        elif hub_id(str(model)):
            args = bundled_config(str(model).split("/")[-1].lower())
        else:
            return None
    except ValueError:
        return None
    w = args.sliding_window
    return w if w is not None and w < args.max_position_embeddings else None


def _stacked_experts(model_dir: Path, files: dict) -> bool:
    """True when the weights hold MLX's stacked Mixtral experts (`switch_mlp`), which transformers cannot load."""
    from safetensors import safe_open

    names = [n for n in files if n.endswith(".safetensors")]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text()).get("weight_map", {})
    else:
        keys = [k for n in names for k in safe_open(str(files[n]), framework="numpy").keys()]
    return any(".switch_mlp." in k for k in keys)


def _link(src: Path, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks (some file systems): copy
        shutil.copy2(src, dst)


def stage(path: str | Path, stage_dir: str | Path, repo_id: str, *, run: str | Path | None = None,
          base_model: str | None = None, revision: str | None = None, license: str | None = None) -> dict:
    """Assemble in `stage_dir` (empty) exactly what is uploaded, README.md included; returns {"kind",
    "files": {path in repo: bytes}, "card": text, "notes": [...]}."""
    from ..export.card import model_card

    stage_dir = Path(stage_dir)
    src = inspect_source(path)
    notes: list[str] = []
    run_dir = Path(run) if run else src["run"]
    info = run_info(run_dir) if run_dir else None
    if src["kind"] == "adapters":
        from ..export.adapters import export_mlx_lm, export_peft

        export_peft(run_dir, stage_dir, base_model=base_model)
        try:
            export_mlx_lm(run_dir, stage_dir / "mlx-lm")
        except ValueError as e:
            notes.append(f"no mlx-lm adapter files: {e}")
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                _link(run_dir / name, stage_dir / "mlx-mistral" / name)
    for name, local in src["files"].items():
        _link(local, stage_dir / name)
    if (Path(path) / "README.md").is_file():
        notes.append(f"{Path(path) / 'README.md'} is replaced by the generated card in the upload (the file itself "
                     "is not changed)")
    files = {p.relative_to(stage_dir).as_posix(): p.stat().st_size for p in sorted(stage_dir.rglob("*")) if p.is_file()}
    model = Path(path) if src["kind"] in ("model", "mlx-model") else (info or {}).get("base_model") or base_model
    card = model_card(src["kind"], repo_id, files=files, base_model=base_model, revision=revision, run=info,
                      gguf=src["gguf"], license=license, notes=[n for n in notes if "README" not in n],
                      sliding_window=model_window(model))
    write_text(stage_dir / "README.md", card)
    files["README.md"] = (stage_dir / "README.md").stat().st_size
    return {"kind": src["kind"], "files": files, "card": card, "notes": notes}


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hub repo id: {e}") from None
    if "/" not in repo_id:
        raise ValueError(f"{repo_id!r}: give the repo as owner/name (your user or organization name first)")
    return repo_id


def upload(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           commit_message: str | None = None, token: str | None = None, run: str | Path | None = None,
           base_model: str | None = None, license: str | None = None, dry_run: bool = False, api=None) -> dict:
    """Upload a run directory or an export to `repo_id` (created when missing; `private` applies to a new
    repo) at branch `revision` (created from main when missing), with a generated README.md. `run`: the
    run an export came from (its data, config and metrics go into the card). `dry_run`: stage and return
    what would be sent, without calling the Hub. Returns {"repo_id", "kind", "files", "card", "notes",
    "url" (None on a dry run)}. Raises ValueError for a bad path or repo id; Hub errors are re-raised as
    ValueError with the Hub's message."""
    check_repo_id(repo_id)
    if revision == "main":
        revision = None
    with tempfile.TemporaryDirectory(prefix="mlx-mistral-upload-") as tmp:
        staged = stage(path, tmp, repo_id, run=run, base_model=base_model, revision=revision, license=license)
        result = {"repo_id": repo_id, "revision": revision or "main", **staged, "url": None}
        if dry_run:
            return result
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        message = commit_message or f"Upload {staged['kind']} with mlx-mistral"
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                     commit_message=message)
        except ValueError:
            raise
        except Exception as e:  # HTTP, auth, network errors of huggingface_hub: say what failed and how to fix
            raise ValueError(f"upload to {repo_id} failed: {type(e).__name__}: {e}. Log in with `hf auth login` "
                             "(or set HF_TOKEN / --token) and check the repo id and your rights on it.") from None
    result["url"] = str(getattr(info, "commit_url", None) or getattr(info, "url", None) or info)
    return result
