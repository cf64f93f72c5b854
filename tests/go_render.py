"""Go's own text/template, on Ollama's data model, as the judge of the Modelfile TEMPLATE.

`tests/export/ollama_render/render.go` (stdlib only) is built once per session into a temporary folder
(`go build`, GOCACHE/GOPATH there, no network, no `go run`) and each call renders a list of conversations in
one run of the binary. Like llama_judge: a missing Go skips, and under `make test`
(MLX_MISTRAL_REQUIRE_GO=1) fails, with the command that installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "export" / "ollama_render" / "render.go"
# Set by `make test`: the Ollama template check must run, so a missing Go fails instead of skipping.
REQUIRED = os.environ.get("MLX_MISTRAL_REQUIRE_GO") == "1"


def require() -> str:
    """The `go` executable; skips (under `make test`, fails) when Go is not installed."""
    import pytest

    go = shutil.which("go")
    if go is not None:
        return go
    msg = ("the Ollama template check runs Go's text/template: install Go (Debian/Ubuntu: apt-get install "
           "golang-go; macOS: brew install go)")
    if REQUIRED:
        pytest.fail(msg + " (MLX_MISTRAL_REQUIRE_GO=1: the Go tests must run)")
    pytest.skip(msg)


def build(workdir: Path):
    """Build render.go into `workdir`; returns render(template, conversations) -> one text per conversation,
    each conversation a list of {"role", "content"} dicts."""
    go = require()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOCACHE": str(workdir / "cache"), "GOPATH": str(workdir / "gopath"),
           "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "", "GO111MODULE": "off"}
    exe = workdir / "render"
    p = subprocess.run([go, "build", "-o", str(exe), str(SOURCE)], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"go build {SOURCE} failed:\n{p.stderr[-4000:]}")

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        r = subprocess.run([str(exe)], input=json.dumps({"template": template, "conversations": conversations}),
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"render.go exited {r.returncode}: {r.stderr[-4000:]}")
        outs = json.loads(r.stdout)["outputs"]
        errors = [o["error"] for o in outs if o["error"]]
        if errors:
            raise RuntimeError(f"the template failed to execute: {errors}")
        return [o["text"] for o in outs]
    return render
