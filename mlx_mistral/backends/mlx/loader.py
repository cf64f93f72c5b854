"""Load a model and its tokenizer into MLX, and read / write safetensors of MLX arrays.

Directory formats read: Hugging Face (`config.json` + `model*.safetensors`, sharded with an index), MLX
(the same with `quantization` in the config and `.scales`/`.biases` tensors, as mlx-lm writes), and
Mistral's own (`params.json` + `consolidated.safetensors`); the names and layouts are core/weights.py's.
Loading is lazy (`mx.load` maps tensors on demand) and strict: missing, unexpected or mis-shaped tensors
are an error that lists them.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...core.config import ModelArgs
from ...core.hub import open_model
from ...core.io import atomic_path, read_safetensors
from ...core.weights import check_tensors, checkpoint_weights, dtype_name
from .model import Model


def resolve_dtype(dtype) -> mx.Dtype | None:
    """An `mx.Dtype` from a name ("bf16", "float32", ...), or None / a dtype as given."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    return getattr(mx, dtype_name(dtype))


def load_safetensors(path: Path) -> dict:
    """`mx.load` with a clear error for truncated or corrupt files."""
    return read_safetensors(path, mx.load)


def save_safetensors(path: str | Path, arrays: dict, metadata: dict | None = None):
    """Save a dict of `mx.array` (or numpy arrays) as safetensors, atomically."""
    arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in arrays.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:  # mx.save_safetensors wants this suffix
        mx.save_safetensors(str(tmp), arrays, metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights_strict(model: nn.Module, weights: dict, source: str = "checkpoint"):
    """Load `weights` into `model`, raising on missing, unexpected or mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_tensors(expected, {k: tuple(v.shape) for k, v in weights.items()}, source)
    model.load_weights(list(weights.items()), strict=False)


def quantize_model(model: Model, group_size: int = 64, bits: int = 4, only: set | None = None):
    """Quantize linear layers (not norms); `only` restricts to modules whose `.scales` are listed."""
    def pred(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if only is not None:
            return f"{path}.scales" in only
        w = getattr(module, "weight", None)
        return w is not None and w.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred)


def slow_dtypes() -> tuple[str, ...]:
    """Dtypes this backend trains much slower in than float32 on the default device: half precision on
    MLX's CPU (a 512x1024 @ 1024x1024 matmul on the 2-core dev machine: fp32 36 ms, bf16 824 ms, fp16 1285
    ms); none on Metal."""
    return ("bfloat16", "float16") if mx.default_device().type == mx.cpu else ()


def load_model(model_dir: str | Path, dtype=None, lazy: bool = True) -> Model:
    """Build the model of a local directory and load its weights (see module doc for formats)."""
    model_dir = Path(model_dir)
    args = ModelArgs.from_dir(model_dir)
    model = Model(args)
    weights = checkpoint_weights(model_dir, args, mx.load, mx.stack)
    if args.quantization:
        quantize_model(model, args.quantization["group_size"], args.quantization["bits"],
                       only={k for k in weights if k.endswith(".scales")})
    dt = resolve_dtype(dtype)
    if dt is not None:
        weights = {k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_weights_strict(model, weights, str(model_dir))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo: str | Path, dtype=None, lazy: bool = True):
    """`(model, tokenizer)` from a local directory or a Hub repo id.

    `dtype` casts floating weights ("float32", "bfloat16", "float16"; default: as stored).
    """
    return open_model(path_or_repo, lambda d: load_model(d, dtype=dtype, lazy=lazy))
