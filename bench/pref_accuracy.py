"""Held-out reward accuracy of DPO on the bundled demo preference set (issue 16's acceptance measurement).

    python bench/pref_accuracy.py [--backend torch] [--steps 60] [--lr 1e-3] [--pref-weights full]

Trains a tiny random Mistral (`tiny:demo` shape unless overridden) with DPO on
mlx_mistral/data/demo/preference/train.jsonl and evaluates every pair of valid.jsonl (questions never seen
in training, wrong answers drawn from the held-out answers only), then prints the held-out reward accuracy
with its 95% Wilson interval, and the training accuracy of the last logged steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch", choices=("mlx", "torch"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--pref-weights", default="full", choices=("lora", "full"))
    ap.add_argument("--model", default="tiny:demo")
    a = ap.parse_args()

    import mlx_mistral
    from mlx_mistral.core.data import DEMO
    from mlx_mistral.core.preference import accuracy_interval

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        end = mlx_mistral.finetune({
            "model": a.model, "data": str(DEMO / "preference"), "out": str(Path(tmp) / "run"), "backend": a.backend,
            "fine_tune": "dpo", "pref_weights": a.pref_weights, "beta": a.beta, "lr": a.lr, "steps": a.steps,
            "warmup_steps": 5, "weight_decay": 0.0, "seq_len": 512, "batch_size": 4, "lora_rank": 16,
            "lora_alpha": 32, "eval_every": a.steps, "eval_rows": 0, "save_every": 0})
        events = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [e for e in events if e["event"] == "eval"][-1]
    n = sum(1 for line in (DEMO / "preference" / "valid.jsonl").read_text().splitlines() if line)
    correct = round(ev["val_rewards/accuracies"] * n)
    lo, hi = accuracy_interval(correct, n)
    train = [e["rewards/accuracies"] for e in events if e["event"] == "train"][-10:]
    print(f"{end['reason']} after {end['step']} steps in {time.perf_counter() - t0:.0f} s ({a.backend}, "
          f"{a.pref_weights}, lr {a.lr}, beta {a.beta})")
    print(f"held-out reward accuracy {correct}/{n} = {correct / n:.3f}, 95% interval ({lo:.3f}, {hi:.3f}); "
          f"margin {ev['val_rewards/margins']:.4f}")
    print(f"training reward accuracy, mean of the last {len(train)} steps: {sum(train) / len(train):.3f}")


if __name__ == "__main__":
    main()
