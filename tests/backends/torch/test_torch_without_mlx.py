"""The torch backend where MLX has no wheel: in a process where importing `mlx` fails (a meta-path
blocker in a `sitecustomize.py` on PYTHONPATH), `import mlx_mistral.backends.torch` works and
`mlx-mistral train --backend torch` trains a tiny model to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx_mistral

BLOCKER = '''
import sys


class NoMLX:
    """Importing mlx or mlx.* fails, as where MLX has no wheel (Windows, a Linux box without mlx[cpu])."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx" or name.startswith("mlx."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, NoMLX())
'''


def env_without_mlx(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, MLX_MISTRAL_CACHE=str(tmp_path / "cache"))


def test_mlx_is_blocked_and_the_torch_backend_imports(tmp_path):
    code = ("import importlib, sys\n"
            "try:\n    import mlx.core\nexcept ImportError:\n    pass\nelse:\n    sys.exit('mlx imported')\n"
            "import mlx_mistral, mlx_mistral.backends.torch\n"
            "from mlx_mistral.backends import pick_backend\n"
            "assert pick_backend('torch') == 'torch'\n"
            "assert not [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')], sys.modules\n"
            "print('ok', mlx_mistral.backends.torch.Trainer.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env_without_mlx(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok TorchTrainer"


def test_train_on_torch_without_mlx(tmp_path):
    script = Path(sys.executable).parent / "mlx-mistral"
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_mistral.cli"]
    run_dir = tmp_path / "run"
    data = Path(mlx_mistral.__path__[0]) / "data" / "demo"
    cmd = [*cli, "train", "--backend", "torch", "--model", "tiny:demo", "--data", str(data), "--out", str(run_dir),
           "--steps", "3", "--seq-len", "128", "--batch-size", "2", "--lora-rank", "4", "--no-dashboard"]
    r = subprocess.run(cmd, env=env_without_mlx(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start, end = events[0], events[-1]
    assert start["event"] == "start" and start["backend"] == "torch"
    assert end["event"] == "end" and end["reason"] == "done" and end["step"] == 3
    assert (run_dir / "adapters.safetensors").exists() and (run_dir / "base" / "model.safetensors").exists()
