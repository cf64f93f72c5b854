"""Hugging Face <-> MLX model directories.

Both directions write the same layout: `model-0000i-of-0000N.safetensors` shards with
`model.safetensors.index.json`, `config.json` from `ModelArgs.to_hf_config()` and the tokenizer files.
An MLX directory keeps our parameter names (Mixtral experts stacked, `.scales`/`.biases` when quantized),
which is also mlx-lm's format; an HF export is fused, dequantized and has transformers' names.
Every file is written atomically; stale shards of an earlier export are removed after the index is in place.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..backends.mlx.loader import load, quantize_model, resolve_dtype, save_safetensors
from ..core.hub import resolve_path
from ..core.io import write_json
from .tokenizer_files import write_hf_tokenizer
from .weights import Progress, hf_tensors, load_fused

DEFAULT_SHARD_BYTES = 5 * 1024**3


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    if max_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_bytes}")
    shards, cur, cur_bytes = [], [], 0
    for name, n in sizes.items():
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def save_sharded(out_dir: Path, tensors: dict[str, mx.array], fmt: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Progress | None = None) -> list[Path]:
    """Write `tensors` as shards + `model.safetensors.index.json` (metadata format `fmt`: "pt" or "mlx")."""
    out_dir = Path(out_dir)
    shards = plan_shards({k: v.nbytes for k, v in tensors.items()}, max_shard_bytes)
    n = len(shards)
    paths, weight_map = [], {}
    for i, names in enumerate(shards):
        path = out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if progress:
            progress(i, n, path.name)
        save_safetensors(path, {k: tensors[k] for k in names}, metadata={"format": fmt})
        weight_map.update({k: path.name for k in names})
        paths.append(path)
    total = sum(v.nbytes for v in tensors.values())
    write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    keep = {p.name for p in paths}
    for old in out_dir.glob("model*.safetensors"):  # shards of an earlier export would confuse globbing loaders
        if old.name not in keep:
            old.unlink()
    if progress:
        progress(n, n, "done")
    return paths


def _check_out_dir(out_dir: Path, src_dir: Path):
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"output directory {out_dir} is the source directory; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")


def export_hf(model_path, out_dir, adapter=None, dtype=None, tokenizer_backend: str = "llama",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> dict:
    """Fuse adapters into the base (dequantized), write a transformers-loadable directory; returns a summary."""
    loaded = load_fused(model_path, adapter, dtype=dtype)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, loaded.model_dir)
    tensors = hf_tensors(loaded.model)
    shards = save_sharded(out_dir, tensors, "pt", max_shard_bytes, progress)
    cfg = loaded.args.to_hf_config()
    dt = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(
        next(iter(tensors.values())).dtype)
    if dt:
        cfg["torch_dtype"] = dt
    write_json(out_dir / "config.json", cfg)
    files = write_hf_tokenizer(loaded.tokenizer, loaded.model_dir, out_dir, tokenizer_backend)
    return {"out": str(out_dir), "shards": len(shards), "tensors": len(tensors), "tokenizer_files": files,
            "adapter": str(adapter) if adapter else None}


def hf_to_mlx(src, dst, bits: int | None = None, group_size: int = 64, dtype=None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> dict:
    """An HF (or Mistral `params.json`) checkpoint, local or from the Hub, to an MLX directory that both
    mlx-mistral and mlx-lm load; `bits` 4 or 8 quantizes the linear layers and embeddings."""
    if bits not in (None, 4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    src_dir = resolve_path(src)
    dst = Path(dst)
    _check_out_dir(dst, src_dir)
    model, tok = load(src_dir, dtype=resolve_dtype(dtype))
    args = dataclasses.replace(model.args, quantization=None)
    if model.args.quantization:
        raise ValueError(f"{src_dir} is already quantized ({model.args.quantization}); convert the unquantized "
                         "checkpoint")
    if bits:
        quantize_model(model, group_size, bits)
        args = dataclasses.replace(args, quantization={"group_size": group_size, "bits": bits})
    tensors = dict(tree_flatten(model.parameters()))
    shards = save_sharded(dst, tensors, "mlx", max_shard_bytes, progress)
    write_json(dst / "config.json", args.to_hf_config())
    files = write_hf_tokenizer(tok, src_dir, dst)
    return {"out": str(dst), "shards": len(shards), "tensors": len(tensors), "quantization": args.quantization,
            "tokenizer_files": files}
