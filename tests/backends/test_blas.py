"""The OpenBLAS preload keeps torch fast in a process that uses both backends (backends/_blas.py).

Loaded after a global OpenBLAS, torch's CPU step fell from 337 to 62 tok/s (BENCHMARKS.md), so torch must
enter the process before OpenBLAS, whichever backend is imported first. Checked on the mechanism, not on
time: the dynamic linker's own list of loaded objects (`dl_iterate_phdr`, in load order) has torch's CPU
library before OpenBLAS, and MLX still got OpenBLAS. `mlx-mistral info`'s MLX-only preload leaves torch out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, json, sys
for name in sys.argv[1:]:
    __import__(name)
from mlx_mistral.backends._blas import STATUS


class Info(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p), ("phdr", ctypes.c_void_p),
                ("phnum", ctypes.c_uint16)]


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Info), ctypes.c_size_t, ctypes.c_void_p)
loaded = []


def record(info, size, data):
    loaded.append((info.contents.name or b"").decode())
    return 0


ctypes.CDLL(None).dl_iterate_phdr(CALLBACK(record), None)
print(json.dumps({"status": STATUS, "loaded": loaded, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def child(*modules) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, *modules], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def first(loaded: list[str], fragment: str) -> int:
    hits = [i for i, path in enumerate(loaded) if fragment in path.rsplit("/", 1)[-1]]
    assert hits, f"no {fragment} among the loaded objects"
    return hits[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS preload is for MLX on Linux")
@pytest.mark.parametrize("order", [("mlx_mistral.backends.mlx", "mlx_mistral.backends.torch"),
                                   ("mlx_mistral.backends.torch", "mlx_mistral.backends.mlx")])
def test_torch_is_loaded_before_openblas_whichever_backend_comes_first(order):
    got = child(*order)
    status, loaded = got["status"], got["loaded"]
    assert status["loaded"], f"OpenBLAS was not preloaded: {status['reason']} (apt install libopenblas0-pthread)"
    assert status["torch_first"] is True
    assert first(loaded, "libtorch_cpu") < first(loaded, "libopenblas"), loaded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS preload is for MLX on Linux")
def test_the_mlx_only_preload_leaves_torch_out():
    code = ("import mlx_mistral.backends._blas as b\n"
            "b.preload_openblas(torch_first=False)\n"
            "import mlx_mistral.backends.mlx, sys\n"
            "assert 'torch' not in sys.modules and b.STATUS['loaded'] and not b.STATUS['torch_first'], b.STATUS\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenBLAS preload is for MLX on Linux")
def test_importing_mlx_core_first_warns_and_says_how_to_fix_it():
    """The wrong import order costs ~40x on fp32 matmul for the whole process: it must not be silent."""
    wrong = "import mlx.core\nimport mlx_mistral.backends.mlx\n"
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", wrong], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "before mlx.core" in r.stderr and "reference BLAS" in r.stderr, r.stderr[-2000:]
    quiet = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", wrong], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "MLX_MISTRAL_BLAS": "none"})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    right = "import mlx_mistral.backends.mlx\nimport mlx.core\n"
    ok = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", right], capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
