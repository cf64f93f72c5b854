"""Held-out reward accuracy of DPO on a bundled preference set (issue 16's acceptance measurement).

    python bench/pref_accuracy.py                        # the tagged set, from the demo's pre-trained base
    python bench/pref_accuracy.py --set demo --no-pretrain --model tiny:demo --pref-weights full --steps 200

`--set tags` (default): mlx_mistral/data/demo_tags/preference (bench/make_tag_preferences.py): the same
answer under the right vs a wrong module's tag, so only whether the tag names the module the question asks
about separates the two sides. The base is first pre-trained as `make demo` does (configs/tiny-pretrain.yaml,
plain Q/A, no tags), so it already copies names out of a question; DPO then has to turn that into preferring
the right tag. `--set demo`: mlx_mistral/data/demo/preference (the right docstring vs a wrong module's), which
a tiny random model cannot judge on unseen questions (it does not know the standard library).

Trains with DPO on train.jsonl, evaluates every pair of valid.jsonl (questions never seen in training), and
prints the held-out reward accuracy with its 95% Wilson interval and the training accuracy of the last
logged steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(work: Path, *, pref_set: str = "tags", pretrain: bool = True, model: str = "tiny:demo-tags",
            backend: str = "mlx", pref_weights: str = "lora", steps: int = 60, lr: float = 5e-3, beta: float = 0.1,
            seed: int = 0, display: str | None = None) -> dict:
    """Pre-train (optional) and DPO-train under `work`; returns {"correct", "n", "accuracy", "interval",
    "margin", "train_accuracy", "reason", "steps", "seconds"} of the held-out pairs."""
    import mlx_mistral
    from mlx_mistral.core.data import DEMO
    from mlx_mistral.core.preference import accuracy_interval
    from mlx_mistral.core.train_config import load_config

    data = {"tags": DEMO.parent / "demo_tags" / "preference", "demo": DEMO / "preference"}[pref_set]
    t0 = time.perf_counter()
    if pretrain:
        cfg = load_config(REPO / "configs" / "tiny-pretrain.yaml",
                          {"out": str(work / "pretrain"), "data": str(DEMO.parent / "demo_tags" / "pretrain"),
                           "seed": seed, "model": model})
        mlx_mistral.finetune(cfg, display=display)
        model = str(work / "pretrain")
    settings = {"model": model, "data": str(data), "out": str(work / "dpo"), "backend": backend, "fine_tune": "dpo",
                "pref_weights": pref_weights, "beta": beta, "lr": lr, "steps": steps, "seed": seed,
                "warmup_steps": max(1, steps // 10), "weight_decay": 0.0, "seq_len": 256, "batch_size": 4,
                "eval_every": steps, "eval_rows": 0, "save_every": 0}
    if pref_weights == "lora":
        settings.update(lora_rank=16, lora_alpha=32, targets="all-linear", rank_policy="gqa")
    end = mlx_mistral.finetune(settings, display=display)
    events = [json.loads(x) for x in (work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    ev = [e for e in events if e["event"] == "eval"][-1]
    n = sum(1 for line in (data / "valid.jsonl").read_text().splitlines() if line)
    correct = round(ev["val_rewards/accuracies"] * n)
    train = [e["rewards/accuracies"] for e in events if e["event"] == "train"][-10:]
    return {"correct": correct, "n": n, "accuracy": correct / n, "interval": accuracy_interval(correct, n),
            "margin": ev["val_rewards/margins"], "train_accuracy": sum(train) / len(train),
            "reason": end["reason"], "steps": end["step"], "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="pref_set", default="tags", choices=("tags", "demo"))
    ap.add_argument("--no-pretrain", dest="pretrain", action="store_false")
    ap.add_argument("--model", default="tiny:demo-tags")
    ap.add_argument("--backend", default="mlx", choices=("mlx", "torch"))
    ap.add_argument("--pref-weights", default="lora", choices=("lora", "full"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(Path(tmp), pref_set=a.pref_set, pretrain=a.pretrain, model=a.model, backend=a.backend,
                    pref_weights=a.pref_weights, steps=a.steps, lr=a.lr, beta=a.beta, seed=a.seed)
    lo, hi = r["interval"]
    print(f"{r['reason']} after {r['steps']} DPO steps, {r['seconds']:.0f} s in all ({a.pref_set} set, "
          f"{'pre-trained base, ' if a.pretrain else ''}{a.backend}, {a.pref_weights}, lr {a.lr}, beta {a.beta})")
    print(f"held-out reward accuracy {r['correct']}/{r['n']} = {r['accuracy']:.3f}, 95% interval ({lo:.3f}, "
          f"{hi:.3f}); margin {r['margin']:.4f}")
    print(f"training reward accuracy, mean of the last 10 logged steps: {r['train_accuracy']:.3f}")


if __name__ == "__main__":
    main()
