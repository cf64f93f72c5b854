"""The torch backend (the CUDA fallback; it runs on CPUs too): model, loader, LoRA layers, trainer step,
generation, in torch. It never imports MLX, so it works where MLX has no wheel.

Its interface is the one every backend has (see backends/__init__.py).
"""

from .generate import generate, stream_generate
from .loader import load, slow_dtypes
from .lora import load_adapters
from .preference import reference_table
from .trainer import TorchTrainer as Trainer
from .trainer import barrier, dataset_loss, init_group, prepare_model

__all__ = ["load", "prepare_model", "Trainer", "generate", "stream_generate", "dataset_loss", "load_adapters",
           "init_group", "barrier", "slow_dtypes", "reference_table"]
