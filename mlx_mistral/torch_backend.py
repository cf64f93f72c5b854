"""Choosing a backend, and generation on torch.

`pick_backend("auto")`: MLX on Apple silicon; torch when CUDA is present; on any other machine (a Linux
CPU) torch when it is installed, else MLX, because that is what `bench/bench_torch.py` measured fastest
there: LoRA r16 on the 125M bench model, batch 4 x 512, fp32, 2 cores — torch backend 337 tok/s, HF
transformers + PEFT 332, MLX backend 186 on equal-length data; 345 / 212 / 173 on variable-length data
(BENCHMARKS.md). `load(path, backend)` and `generate(...)` then run the same call on either. The CLI's
`--backend` flag lives with the commands in `cli.py` / `trainer_cli.py`; this module adds no command.
"""

from __future__ import annotations

import platform
from typing import Iterator

BACKENDS = ("auto", "mlx", "torch")
commands: list = []  # no commands of our own: --backend is an option of train / eval / generate


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(requested: str = "auto") -> str:
    """"mlx" or "torch" for a `--backend` value; raises ValueError when the asked one cannot run here."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "torch":
        if not _torch_importable():
            raise ValueError("backend 'torch' needs PyTorch: pip install 'mlx-mistral[torch]'")
        return "torch"
    if requested == "mlx":
        return "mlx"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch" if _torch_importable() else "mlx"  # CUDA, or a CPU where torch measured faster


def load(path_or_repo, backend: str = "auto", dtype=None):
    """`(model, tokenizer)` on the backend `pick_backend(backend)` chooses."""
    from .loader import load as _load

    return _load(path_or_repo, dtype=dtype, backend=pick_backend(backend))


def is_torch_model(model) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


# ---- generation on torch ---------------------------------------------------------------------------------
def sample(logits, temp: float, top_p: float, generator):
    """Next token ids (B,) from last-position logits (B, vocab): greedy at temp 0, else temperature and top-p."""
    import torch

    if temp == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temp, dim=-1)  # (B, vocab)
    if 0 < top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def stream_generate_torch(model, prompt: list[int], max_tokens: int = 100, temp: float = 0.0, top_p: float = 1.0,
                          seed: int = 0, prefill_chunk: int = 512, stop_ids: set[int] | None = None) -> Iterator[int]:
    """`generate.stream_generate` for the torch model: chunked prefill into a windowed KV cache, then
    one token at a time. Greedy output equals the MLX backend's; sampled output uses torch's RNG."""
    import torch

    from .torch_model import make_cache

    if not prompt:
        raise ValueError("the prompt is empty: encode at least a BOS token")
    if temp < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temp >= 0 and 0 < top_p <= 1, got temp={temp}, top_p={top_p}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = make_cache(model)
    tokens = torch.tensor([prompt], device=device)  # (1, P)
    with torch.inference_mode():
        for start in range(0, tokens.shape[1] - 1, prefill_chunk):
            model(tokens[:, start:min(start + prefill_chunk, tokens.shape[1] - 1)], cache=cache)
        y = tokens[:, -1:]
        for _ in range(max_tokens):
            logits = model(y, cache=cache)[:, -1]  # (1, vocab)
            y = sample(logits, temp, top_p, gen)[:, None]  # (1, 1)
            tok = int(y.item())
            yield tok
            if stop_ids and tok in stop_ids:
                return


def stream_generate(model, prompt: list[int], max_tokens: int = 100, **kw) -> Iterator[int]:
    """Token ids after `prompt` from an MLX or a torch model (dispatch on the model's type)."""
    if is_torch_model(model):
        return stream_generate_torch(model, prompt, max_tokens, **kw)
    from .generate import stream_generate as mlx_stream

    return mlx_stream(model, prompt, max_tokens, **kw)


def generate(model, prompt: list[int], max_tokens: int = 100, **kw) -> list[int]:
    return list(stream_generate(model, prompt, max_tokens, **kw))


def dataset_loss(model, rows, batch_size: int = 4) -> tuple[float, int]:
    """`trainer.dataset_loss` for an MLX or a torch model."""
    if is_torch_model(model):
        from .torch_trainer import dataset_loss as torch_loss

        return torch_loss(model, rows, batch_size)
    from .trainer import dataset_loss as mlx_loss

    return mlx_loss(model, rows, batch_size)


def training_backend(backend: str = "auto"):
    """`(load, prepare_model, Trainer)` of a backend: the three calls `trainer_cli.run_training` makes.

    Both trainers take the same arguments and emit the same events; on torch, data parallelism comes
    from `torchrun` (the trainer joins the process group), so pass `group=None`."""
    import functools

    from .loader import load as _load

    name = pick_backend(backend)
    if name == "torch":
        from .torch_trainer import TorchTrainer, prepare_model

        return functools.partial(_load, backend="torch"), prepare_model, TorchTrainer
    from .trainer import Trainer, prepare_model

    return functools.partial(_load, backend="mlx"), prepare_model, Trainer


def load_adapters(model, run_dir, dropout: float | None = None) -> dict:
    """Add a run directory's adapters (trained on either backend) to an MLX or a torch model."""
    if is_torch_model(model):
        from .torch_lora import load_adapters as load_torch

        return load_torch(model, run_dir, dropout)
    from .lora import load_adapters as load_mlx

    return load_mlx(model, run_dir, dropout)
