"""The two backends, and the one place a backend is chosen.

`pick_backend("auto")`: MLX on Apple silicon; torch when CUDA is present; on any other machine (a Linux
CPU) torch when it is installed, else MLX, because that is what `bench/bench_torch.py` measured fastest
there: LoRA r16 on the 125M bench model, batch 4 x 512, fp32, 2 cores — torch backend 337 tok/s, HF
transformers + PEFT 332, MLX backend 186 on equal-length data; 345 / 212 / 173 on variable-length data
(BENCHMARKS.md).

`get(name)` imports a backend's package and returns it. Each exposes the same interface, so callers need
no other branch on the backend:

    load(path_or_repo, dtype=None, ...) -> (model, tokenizer)
    prepare_model(model, cfg, model_name) -> adapter_config dict, or None for full fine-tuning
    Trainer(model, cfg, train, val, run_dir, callbacks, lora_config=, model_name=, group=)   (a core.loop.TrainLoop)
    generate / stream_generate(model, prompt_ids, max_tokens, temp=, top_p=, top_k=, min_p=, repetition_penalty=,
                               repetition_context=, seed=, prefill_chunk=, stop_ids=, stats=)
    dataset_loss(model, rows, batch_size) -> (mean token loss, loss tokens)
    load_adapters(model, run_dir) -> adapter_config
    init_group() / barrier(group)   (data parallelism: mx.distributed on MLX; torchrun joins in the torch Trainer)

`mlx_mistral.backends.mlx` never imports torch and `mlx_mistral.backends.torch` never imports MLX.
Importing this module imports neither: a backend is imported when first asked for. The functions below
run the same call on either backend, choosing it by name or by the model's type.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from types import ModuleType

BACKENDS = ("auto", "mlx", "torch")


def _torch_installed() -> bool:
    return "torch" in sys.modules or importlib.util.find_spec("torch") is not None


def pick_backend(requested: str = "auto") -> str:
    """"mlx" or "torch" for a `--backend` value; raises ValueError when the asked one cannot run here."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "torch":
        if not _torch_installed():
            raise ValueError("backend 'torch' needs PyTorch: pip install 'mlx-mistral[torch]'")
        return "torch"
    if requested == "mlx":
        return "mlx"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch" if _torch_installed() else "mlx"  # CUDA, or a CPU where torch measured faster


def get(name: str) -> ModuleType:
    """The package of backend `name` ("mlx" or "torch", as `pick_backend` returns), imported now."""
    if name == "mlx":
        from . import mlx as backend
    elif name == "torch":
        from . import torch as backend
    else:
        raise ValueError(f"unknown backend {name!r}: choose mlx or torch")
    return backend


def is_torch_model(model) -> bool:
    """Whether `model` is a torch module (without importing torch when nothing has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def of(model) -> ModuleType:
    """The package of the backend `model` belongs to."""
    return get("torch" if is_torch_model(model) else "mlx")


def load(path_or_repo, backend: str = "mlx", dtype=None, **kw):
    """`(model, tokenizer)` from a local directory or a Hub repo id on `backend` ("mlx", "torch" or "auto":
    see `pick_backend`). `dtype` casts floating weights ("float32", "bfloat16", "float16"; default: as
    stored); `kw` goes to the backend's loader (`lazy` on MLX, `device` on torch)."""
    return get(pick_backend(backend)).load(path_or_repo, dtype=dtype, **kw)


def training_backend(backend: str = "auto"):
    """`(load, prepare_model, Trainer)` of the backend `pick_backend(backend)` chooses."""
    b = get(pick_backend(backend))
    return b.load, b.prepare_model, b.Trainer


def stream_generate(model, prompt: list[int], max_tokens: int = 100, **kw):
    """Token ids after `prompt`, as they come, from an MLX or a torch model (see the backends' generate.py)."""
    return of(model).stream_generate(model, prompt, max_tokens, **kw)


def generate(model, prompt: list[int], max_tokens: int = 100, **kw) -> list[int]:
    """The new token ids after `prompt` from an MLX or a torch model."""
    return list(stream_generate(model, prompt, max_tokens, **kw))


def dataset_loss(model, rows, batch_size: int = 4) -> tuple[float, int]:
    """(mean token loss, number of loss tokens) of an MLX or a torch model over `rows` (core.loop.Rows)."""
    return of(model).dataset_loss(model, rows, batch_size)


def load_adapters(model, run_dir, dropout: float | None = None) -> dict:
    """Add a run directory's adapters (trained on either backend) to an MLX or a torch model."""
    return of(model).load_adapters(model, run_dir, dropout)
