"""Load an optimised BLAS into the process before MLX binds its bundled one.

On Linux the `mlx[cpu]` wheel links a netlib *reference* BLAS (~3 GFLOP/s fp32 matmul on the machines
we measured, see BENCHMARKS.md). Loading OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported puts
its `cblas_sgemm` first in the global symbol scope, so MLX's calls resolve to it: ~40x faster fp32
matmul, with no `LD_PRELOAD` and no re-exec. This module must run before anything imports `mlx.core`;
`mlx_mistral/__init__.py` imports it first.

Search order: `$MLX_MISTRAL_BLAS` (a path, or `none` to keep MLX's bundled BLAS), then the system's
`libopenblas.so.0` (Debian: `libopenblas0-pthread`), then the `cmeel-openblas` wheel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

#: What happened: ``{"loaded": path or None, "reason": text}``; shown by ``mlx-mistral info``.
STATUS: dict = {"loaded": None, "reason": "not attempted"}


def _candidates() -> list[str]:
    found = []
    for name in ("libopenblas.so.0", "libopenblas.so"):
        for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                  "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
            p = Path(d) / name
            if p.exists():
                found.append(str(p))
    lib = ctypes.util.find_library("openblas")
    if lib:
        found.append(lib)
    for sp in sys.path:
        p = Path(sp) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if p.exists():
            found.append(str(p))
    return found


def _import_torch_first():
    """Import torch (when installed) before OpenBLAS enters the global symbol scope.

    Loaded after a global OpenBLAS, torch's CPU kernels bind some BLAS calls to it instead of their own
    MKL: measured here (125M model, LoRA, batch 4 x 512, 2 cores) the torch backend trained at 204 tok/s
    with OpenBLAS preloaded against 348 tok/s without it, while torch imported first kept MLX's OpenBLAS
    matmuls as fast as before (~200 GFLOP/s at 1024^2). The cost is torch's import time (~1 s).
    """
    import importlib.util

    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


def preload_openblas() -> dict:
    """Load OpenBLAS globally on Linux if MLX has not been imported yet; returns `STATUS`."""
    if not sys.platform.startswith("linux"):
        STATUS.update(loaded=None, reason="not Linux: MLX uses Accelerate/Metal")
        return STATUS
    if "mlx.core" in sys.modules:
        STATUS.update(loaded=None, reason="mlx.core was imported before mlx_mistral; import mlx_mistral first")
        return STATUS
    choice = os.environ.get("MLX_MISTRAL_BLAS", "")
    if choice.lower() == "none":
        STATUS.update(loaded=None, reason="disabled by MLX_MISTRAL_BLAS=none (bundled reference BLAS)")
        return STATUS
    _import_torch_first()
    errors = []
    for path in ([choice] if choice else _candidates()):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:  # e.g. cmeel's OpenBLAS without libgfortran5 on the system
            errors.append(f"{path}: {e}")
            continue
        STATUS.update(loaded=path, reason="loaded")
        return STATUS
    STATUS.update(loaded=None, reason="no OpenBLAS found (apt install libopenblas0-pthread); "
                  + "; ".join(errors))
    return STATUS
