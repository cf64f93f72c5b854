"""The README's library script (section "From Python") runs as written, from a checkout, on the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_script_of_the_readme_runs(tmp_path):
    script = readme_script()
    assert 5 <= len(script.strip().splitlines()) <= 12
    # run from a fresh directory that looks like a checkout: its relative paths resolve, its outputs land here
    (tmp_path / "mlx_mistral").symlink_to(ROOT / "mlx_mistral")
    env = dict(os.environ, MLX_MISTRAL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    runs = [p.parent for p in tmp_path.glob("runs/*/metrics.jsonl")]
    assert len(runs) == 1
    end = json.loads((runs[0] / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "done"
    assert list(runs[0].glob("*.gguf")) and r.stdout.strip()


def test_the_command_table_lists_every_command():
    """Every command and subcommand the CLI registers has a row in the README's command table."""
    import click

    from mlx_mistral.cli import main

    def paths(group, prefix=()):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from paths(cmd, prefix + (name,))
            else:
                yield " ".join(prefix + (name,))

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Commands"):]
    table = table[:table.index("\n\n", table.index("| command |"))]
    rows = [ln for ln in table.splitlines() if ln.startswith("| `mlx-mistral ")]
    missing = [p for p in sorted(paths(main)) if not any(f"`mlx-mistral {p} " in r or f"`mlx-mistral {p}`" in r
                                                         for r in rows)]
    assert not missing, f"commands missing from the README's command table: {missing}"
