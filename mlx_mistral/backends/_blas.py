"""Load an optimised BLAS into the process before MLX binds its bundled one, and keep torch fast beside it.

On Linux the `mlx[cpu]` wheel links a netlib *reference* BLAS (~3 GFLOP/s fp32 matmul on the machines
we measured, see BENCHMARKS.md). Loading OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported puts
its `cblas_sgemm` first in the global symbol scope, so MLX's calls resolve to it: ~40x faster fp32
matmul, with no `LD_PRELOAD` and no re-exec.

The order, and why it is decided here:
1. torch, when installed, is imported *before* OpenBLAS enters the global scope. Loaded after it, torch's
   CPU kernels bound some BLAS calls to that OpenBLAS instead of their own MKL: nested thread pools made
   its SDPA ~7x slower and the torch backend's step fell from 337 to 62 tok/s (BENCHMARKS.md). Imported
   first, torch keeps its own BLAS and MLX still gets OpenBLAS (~200 GFLOP/s at 1024^2 either way).
2. Then OpenBLAS, with RTLD_GLOBAL.
3. Then `mlx.core`.
Importing the MLX backend (`mlx_mistral.backends.mlx`) runs `preload_openblas()` first thing, so any
process that may use both backends (the test suite, `train --backend torch` after something imported
MLX, exports next to torch code) gets this order. A process that will never use torch asks for an
MLX-only preload, `preload_openblas(torch_first=False)`, before it imports MLX, and does not pay torch's
import (~1-2 s): `mlx-mistral info` does. The first call decides; later calls return its `STATUS`.
A first call after `mlx.core` was imported is too late: it warns (RuntimeWarning) rather than fail silently.
This module sits beside the backends rather than inside `backends/mlx/`, whose import already preloads:
a process must be able to call it before that import.

Search order: `$MLX_MISTRAL_BLAS` (a path, or `none` to keep MLX's bundled BLAS), then the system's
`libopenblas.so.0` (Debian: `libopenblas0-pthread`), then the `cmeel-openblas` wheel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
import warnings
from pathlib import Path

#: What happened: `{"loaded": path or None, "reason": text, "torch_first": bool}`; shown by `mlx-mistral info`.
STATUS: dict = {"loaded": None, "reason": "not attempted", "torch_first": False}


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
    """Import torch (when installed) before OpenBLAS enters the global symbol scope (step 1 above)."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


def preload_openblas(torch_first: bool = True) -> dict:
    """Load OpenBLAS globally on Linux if MLX has not been imported yet (after torch when `torch_first`
    and torch is installed); returns `STATUS`. Only the first call acts."""
    if STATUS["reason"] != "not attempted":
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS.update(loaded=None, reason="not Linux: MLX uses Accelerate/Metal")
        return STATUS
    choice = os.environ.get("MLX_MISTRAL_BLAS", "")
    if choice.lower() == "none":
        STATUS.update(loaded=None, reason="disabled by MLX_MISTRAL_BLAS=none (bundled reference BLAS)")
        return STATUS
    if "mlx.core" in sys.modules:
        STATUS.update(loaded=None, reason="mlx.core was imported before mlx_mistral's MLX backend; import "
                      "mlx_mistral.backends.mlx first")
        # silent, this costs ~40x on every fp32 matmul for the whole process: say so where it can be fixed
        warnings.warn("mlx.core was imported before mlx_mistral.backends.mlx, so MLX keeps the reference BLAS "
                      "its Linux wheel bundles (about 40x slower fp32 matmul). Import mlx_mistral.backends.mlx "
                      "(or any module in it) before mlx.core; MLX_MISTRAL_BLAS=none silences this.",
                      RuntimeWarning, stacklevel=2)
        return STATUS
    if torch_first:
        _import_torch_first()
    STATUS["torch_first"] = "torch" in sys.modules
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
