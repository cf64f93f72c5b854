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
from contextlib import contextmanager
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


@contextmanager
def single_threaded_openblas():
    """Run torch CPU work with the OpenBLAS that `mlx_mistral` preloads for MLX limited to one thread.

    `_blas.py` loads OpenBLAS with RTLD_GLOBAL before torch, so torch's CPU SDPA kernel, which calls small
    GEMMs from inside its own OpenMP threads, resolves them to OpenBLAS; OpenBLAS then starts its own
    threads under each OpenMP thread and the two pools fight over the cores. Measured here (2 cores, batch 4
    x seq 512, 12 heads, 4 KV heads, window 256): one masked SDPA forward took 170-230 ms with OpenBLAS
    preloaded against 23-28 ms without it, or with OpenBLAS at one thread. torch's own matmuls (MKL) are
    not affected; results do not change. The previous thread count is restored on exit (MLX's matmuls
    want it).
    """
    lib = None
    if STATUS.get("loaded"):
        try:
            lib = ctypes.CDLL(STATUS["loaded"])
            before = lib.openblas_get_num_threads()
        except (OSError, AttributeError):  # not an OpenBLAS after all
            lib = None
    if lib is None:
        yield
        return
    lib.openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)
