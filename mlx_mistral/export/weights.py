"""The model an export writes: base + adapters fused, dequantized, under Hugging Face tensor names."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..backends.mlx.loader import load
from ..backends.mlx.model import Model
from ..core.adapters import fingerprint, read_adapter_config
from ..core.config import ModelArgs
from ..core.hub import resolve_path
from ..core.tokenizer import Tokenizer
from ..core.weights import ours_to_hf

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclasses.dataclass
class Loaded:
    model: Model
    tokenizer: Tokenizer
    model_dir: Path
    args: ModelArgs  # the exported model's args: never quantized
    adapter_config: dict | None = None


def check_fingerprint(adapter_cfg: dict, args: ModelArgs, run_dir) -> None:
    """Refuse an adapter trained on a different architecture (shape checks alone miss RoPE, window...)."""
    want, have = adapter_cfg.get("base_fingerprint"), fingerprint(args)
    if want and want != have:
        raise ValueError(f"{run_dir}/adapter_config.json: base_fingerprint {want} does not match the model "
                         f"({have}): the adapter was trained on {adapter_cfg.get('base_model')!r}, a different "
                         "architecture or config. Pass the base model it was trained on.")


def load_fused(model_path, adapter: str | Path | None = None, dtype=None) -> Loaded:
    """Load a model (directory or Hub id), add a run directory's adapters, fuse, and dequantize."""
    from ..backends.mlx.lora import fuse, load_adapters

    model_dir = resolve_path(model_path)
    model, tok = load(model_dir, dtype=dtype)
    cfg = None
    if adapter is not None:
        cfg = read_adapter_config(adapter)
        check_fingerprint(cfg, model.args, adapter)
        load_adapters(model, adapter)
    if adapter is not None or model.args.quantization:
        fuse(model, dequantize=True)
    args = dataclasses.replace(model.args, quantization=None)
    return Loaded(model, tok, model_dir, args, cfg)


def hf_tensors(model: Model) -> dict[str, mx.array]:
    """Parameters under transformers' names (Mixtral experts unstacked to `experts.E.w1/w2/w3`); lazy."""
    params = dict(tree_flatten(model.parameters()))
    for name in params:
        if name.endswith((".scales", ".biases")) or ".lora_" in name:
            raise ValueError(f"{name}: the model still has quantized or adapter tensors; fuse it first "
                             "(load_fused does)")
    return ours_to_hf(params)
