"""mlx-mistral: fine-tune Mistral-family models with MLX (and torch), exactly."""

from ._blas import preload_openblas as _preload_openblas

_preload_openblas()  # before anything imports mlx.core: see _blas.py

from .config import ModelArgs  # noqa: E402
from .loader import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "ModelArgs", "__version__"]
