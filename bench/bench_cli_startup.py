"""Start-up cost of the light commands: `mlx-mistral --help`, `info` and `dashboard RUN --once`.

    python bench/bench_cli_startup.py [--repeats 7]

Each command runs in a fresh process (`python -m mlx_mistral.cli ...`, what the `mlx-mistral` script
runs), alternating the commands; the wall-clock median of the repeats is reported, with whether the
process imported torch and mlx.core (read from one more run under `python -X importtime`).
`dashboard` replays a small synthetic `metrics.jsonl` once (`--once`), so it measures start-up, not a
long redraw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def metrics(run_dir: Path, steps: int = 50):
    t0 = 1_700_000_000.0
    evs = [{"event": "start", "time": t0, "run_dir": str(run_dir), "model": "tiny", "backend": "mlx",
            "device": "cpu", "fine_tune": "lora", "rank_policy": "gqa", "trainable_params": 1000,
            "total_params": 100000, "total_steps": steps, "start_step": 0, "seq_len": 256, "batch_size": 4,
            "grad_accum": 1, "packing": "swa", "packing_efficiency": 0.97, "memory_total": 24e9}]
    for s in range(1, steps + 1):
        evs.append({"event": "train", "time": t0 + s, "step": s, "loss": 10 - s / 10, "lr": 1e-4,
                    "grad_norm": 1.0, "tokens": 1024 * s, "tokens_per_sec": 1024.0, "it_per_sec": 1.0,
                    "elapsed": float(s), "peak_memory": 1e9, "active_memory": 5e8, "packing_efficiency": 0.97})
    evs.append({"event": "end", "time": t0 + steps, "step": steps, "reason": "done", "elapsed": float(steps),
                "final_loss": 5.0, "best_val_loss": None, "tokens": 1024 * steps, "peak_memory": 1e9,
                "run_dir": str(run_dir), "adapter_path": "", "message": "trained"})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))


def imported(argv: list[str]) -> dict:
    """Which heavy libraries the command imports (top-level packages seen by -X importtime)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_mistral.cli", *argv],
                         capture_output=True, text=True).stderr
    names = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    return {"torch": "torch" in names, "mlx.core": "mlx.core" in names}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        metrics(run)
        commands = {"--help": ["--help"], "info": ["info"], "dashboard": ["dashboard", str(run), "--once"]}
        times: dict[str, list[float]] = {k: [] for k in commands}
        for r in range(a.repeats):
            for name, argv in (commands.items() if r % 2 == 0 else list(commands.items())[::-1]):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "mlx_mistral.cli", *argv], check=True,
                               capture_output=True)
                times[name].append(time.perf_counter() - t)
        print(f"| command | wall time, median of {a.repeats} (s) | imports torch | imports mlx.core |")
        print("|---|---|---|---|")
        for name, argv in commands.items():
            imp = imported(argv)
            print(f"| `mlx-mistral {name}` | {statistics.median(times[name]):.2f} "
                  f"({min(times[name]):.2f}-{max(times[name]):.2f}) | {'yes' if imp['torch'] else 'no'} | "
                  f"{'yes' if imp['mlx.core'] else 'no'} |")


if __name__ == "__main__":
    main()
