"""Load a model and its tokenizer into torch, and read / write safetensors of torch tensors.

The formats and names are the MLX loader's, from the same place (core/weights.py, core/hub.py), so both
backends read a checkpoint the same way, strictly. Tensors are read with `safetensors.torch` (bf16 stays
bf16) straight onto the device; the model is built on the meta device and takes the tensors as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...core.config import ModelArgs
from ...core.hub import open_model
from ...core.io import atomic_path, read_safetensors
from ...core.weights import check_tensors, checkpoint_weights, dtype_name
from .model import Model


def resolve_dtype(dtype) -> torch.dtype | None:
    """A `torch.dtype` from a name ("bf16", "float32", ...), or None / a dtype as given."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def slow_dtypes() -> tuple[str, ...]:
    """Dtypes this backend trains much slower in than float32 on the default device: fp16 on a CPU (a
    512x1024 @ 1024x1024 matmul on the 2-core dev machine: fp32 53 ms, bf16 17 ms, fp16 2836 ms)."""
    return () if default_device().type == "cuda" else ("float16",)


def load_safetensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with a clear error for truncated or corrupt files."""
    from safetensors.torch import load_file

    return read_safetensors(path, lambda p: load_file(p, device=str(device)))


def save_safetensors(path: Path, tensors: dict):
    """Save a dict of tensors (any device) as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_model(model_dir: str | Path, dtype=None, device=None) -> Model:
    """Build the torch model of a local directory and load its weights (the formats the MLX loader reads)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    args = ModelArgs.from_dir(model_dir)
    if args.quantization:
        raise ValueError(f"{model_dir} holds an MLX-quantized checkpoint ({args.quantization}), which torch "
                         "cannot run; load the unquantized checkpoint (QLoRA on torch quantizes it with "
                         "bitsandbytes)")
    device = torch.device(device) if device is not None else default_device()
    weights = checkpoint_weights(model_dir, args, lambda f: load_file(f, device=str(device)), torch.stack)
    dt = resolve_dtype(dtype)
    if dt is not None:
        weights = {k: v.to(dt) if v.is_floating_point() else v for k, v in weights.items()}
    with torch.device("meta"):
        model = Model(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(expected, {k: tuple(v.shape) for k, v in weights.items()}, str(model_dir))
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def load(path_or_repo: str | Path, dtype=None, device=None):
    """`(torch model, tokenizer)` from a local directory or a Hub repo id."""
    return open_model(path_or_repo, lambda d: load_model(d, dtype=dtype, device=device))
