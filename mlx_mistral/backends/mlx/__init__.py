"""The MLX backend: the model, its loader, LoRA layers, the trainer's step and generation, in MLX.

Importing this package loads OpenBLAS on Linux before anything imports `mlx.core`, after torch when
torch is installed (see backends/_blas.py for why that order), so import it (or any module in it) before
importing `mlx.core` yourself. Its interface is the one every backend has (see backends/__init__.py).
"""

from .._blas import preload_openblas

preload_openblas()

from .distributed import barrier, init_group  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402
from .loader import load, slow_dtypes  # noqa: E402
from .lora import load_adapters  # noqa: E402
from .preference import reference_table  # noqa: E402
from .trainer import Trainer, dataset_loss, prepare_model  # noqa: E402

__all__ = ["load", "prepare_model", "Trainer", "generate", "stream_generate", "dataset_loss", "load_adapters",
           "init_group", "barrier", "slow_dtypes", "reference_table"]
