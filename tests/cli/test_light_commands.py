"""What the light entry points import, read from `sys.modules` of a fresh process: `import mlx_mistral`
imports neither MLX nor torch; `mlx-mistral --help` and `dashboard RUN` neither; `info` MLX but not torch.
And every name of the library API resolves to what it says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mlx_mistral

HEAVY = ("torch", "mlx")

# Runs `mlx-mistral ARGS...` in this process and, at exit, writes the heavy packages it imported.
RUN_CLI = """
import atexit, json, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(
    {m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("torch", "mlx")}))))
sys.argv = ["mlx-mistral", *args]
runpy.run_module("mlx_mistral.cli", run_name="__main__")
"""


def imported_by(tmp_path, *args) -> tuple[list[str], subprocess.CompletedProcess]:
    out = tmp_path / "imported.json"
    r = subprocess.run([sys.executable, "-c", RUN_CLI, str(out), *args], capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text()), r


def test_import_mlx_mistral_imports_neither_backend():
    code = "import sys, mlx_mistral; print([m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx')])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_help_imports_neither_torch_nor_mlx(tmp_path):
    got, r = imported_by(tmp_path, "--help")
    assert r.returncode == 0 and "Commands:" in r.stdout, r.stderr
    assert got == []


def test_info_imports_mlx_but_not_torch(tmp_path):
    got, r = imported_by(tmp_path, "info")
    assert r.returncode == 0 and "BLAS:" in r.stdout, r.stderr
    assert "Device(" not in r.stdout and ("device cpu (" in r.stdout or "device gpu" in r.stdout), r.stdout
    assert got == ["mlx"]


def test_dashboard_imports_neither_torch_nor_mlx(tmp_path):
    events = [{"event": "start", "time": 1.0, "total_steps": 2, "start_step": 0, "backend": "mlx"},
              {"event": "train", "time": 2.0, "step": 1, "loss": 3.0, "elapsed": 1.0, "tokens": 10},
              {"event": "end", "time": 3.0, "step": 2, "reason": "done", "elapsed": 2.0, "final_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    got, r = imported_by(tmp_path, "dashboard", str(tmp_path), "--once")
    assert r.returncode == 0 and "step 2/2" in r.stdout, r.stdout + r.stderr
    assert got == []


@pytest.mark.parametrize("name", sorted(mlx_mistral._API))
def test_every_api_name_resolves(name):
    value = getattr(mlx_mistral, name)
    assert getattr(value, "__name__", name) == name and name in dir(mlx_mistral)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mlx_mistral.nope  # noqa: B018


def test_report_imports_neither_torch_nor_mlx(tmp_path):
    events = [{"event": "start", "time": 1.0, "total_steps": 2, "start_step": 0, "backend": "mlx"},
              {"event": "train", "time": 2.0, "step": 1, "loss": 3.0, "elapsed": 1.0, "tokens": 10}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    got, r = imported_by(tmp_path, "report", str(tmp_path))
    assert r.returncode == 0 and (tmp_path / "report.html").is_file(), r.stdout + r.stderr
    assert got == []
