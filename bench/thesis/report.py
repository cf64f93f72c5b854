"""Aggregate the thesis runs over seeds and render them as markdown tables (pure functions of the results)."""

from __future__ import annotations

from .metrics import mean_spread

# Per-run numbers aggregated over seeds (key in a run's result -> how it is shown).
SCALARS = ("eval_ppl", "eval_loss", "latency_unfused_ms", "latency_fused_ms", "peak_memory_gb",
           "tokens_per_sec", "trainable_params", "train_tokens", "final_train_loss", "fuse_max_abs_diff",
           "packing_efficiency")


def aggregate(runs: list[dict], approaches: list[dict]) -> list[dict]:
    """One summary per approach (in config order): mean/spread of every scalar and of each position
    bucket's loss over the approach's seeds."""
    out = []
    for a in approaches:
        mine = [r for r in runs if r["approach"] == a["name"]]
        if not mine:
            continue
        summary = {"approach": a["name"], "label": a["label"], "seeds": [r["seed"] for r in mine],
                   "config": {k: a[k] for k in ("lora_rank", "rank_policy", "packing", "lr")}}
        for key in SCALARS:
            summary[key] = mean_spread([r[key] for r in mine])
        labels = [b["label"] for b in mine[0]["buckets"]]
        summary["buckets"] = [{"label": lab, **mean_spread([r["buckets"][i]["loss"] for r in mine])}
                              for i, lab in enumerate(labels)]
        out.append(summary)
    return out


def pm(s: dict, digits: int = 2) -> str:
    """`mean ± std` of a `mean_spread` dict."""
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def main_table(summaries: list[dict], base: dict | None = None) -> str:
    """The seed claim's table, with our numbers: mean ± sample std over seeds."""
    lines = ["| approach | eval perplexity | latency ms/token (unfused → fused) | memory GB (training peak) | "
             "context analogue: loss 0–W → beyond 2W | trainable params | train tokens/s |",
             "|---|---|---|---|---|---|---|"]
    if base is not None:
        lines.append(f"| base model, no fine-tune | {base['eval_ppl']:.2f} | {base['latency_ms']:.2f} | – | "
                     f"{_near_far(base['buckets'])} | 0 | – |")
    for s in summaries:
        b = s["buckets"]
        lines.append(f"| {s['label']} | {pm(s['eval_ppl'])} | {pm(s['latency_unfused_ms'])} → "
                     f"{pm(s['latency_fused_ms'])} | {pm(s['peak_memory_gb'], 3)} | "
                     f"{_near_far([{'label': x['label'], 'loss': x['mean'], 'tokens': 1} for x in b])} | "
                     f"{s['trainable_params']['mean']:,.0f} | {pm(s['tokens_per_sec'], 0)} |")
    return "\n".join(lines)


def _near_far(buckets: list[dict]) -> str:
    """`first-window loss → mean loss of the buckets from 2W on` (unweighted over buckets)."""
    far = [b["loss"] for b in buckets[2:] if b["loss"] is not None]
    near = buckets[0]["loss"]
    return f"{near:.3f} → {sum(far) / len(far):.3f}" if far else f"{near:.3f}"


def bucket_table(summaries: list[dict], base: dict | None = None) -> str:
    """Loss by position bucket, mean ± std over seeds."""
    labels = [b["label"] for b in summaries[0]["buckets"]]
    lines = ["| approach | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    if base is not None:
        lines.append("| base model | " + " | ".join(f"{b['loss']:.3f}" for b in base["buckets"]) + " |")
    for s in summaries:
        lines.append(f"| {s['approach']} | " + " | ".join(pm(b, 3) for b in s["buckets"]) + " |")
    return "\n".join(lines)


def per_seed_table(runs: list[dict]) -> str:
    lines = ["| approach | seed | steps | loss tokens | final train loss | eval ppl | peak MB | tokens/s | "
             "ms/token unfused | fused | fused-vs-unfused max |Δlogit| |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['approach']} | {r['seed']} | {r['steps']} | {r['train_tokens']:,} | "
                     f"{r['final_train_loss']:.3f} | {r['eval_ppl']:.3f} | {r['peak_memory_gb'] * 1024:.0f} | "
                     f"{r['tokens_per_sec']:.0f} | {r['latency_unfused_ms']:.2f} | {r['latency_fused_ms']:.2f} | "
                     f"{r['fuse_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def render(results: dict) -> str:
    """The whole markdown report of a results dict (as `run.py` writes it)."""
    s, base = results["summaries"], results.get("base")
    m = results["machine"]
    parts = [f"# Thesis experiment results ({results['mode']})", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), {m['ram_gb']:.0f} GB RAM, {m['platform']}, "
             f"MLX {m['mlx']} ({m['device']}, BLAS: {m['blas']}); load average {m['load_start']} at start, "
             f"{m.get('load_end', '?')} at end.", "",
             f"Seeds: {results['seeds']}. Base: {results['base_info']['params']:,} parameters, pre-trained on "
             f"{results['base_info']['tokens']:,} tokens in {results['base_info']['seconds']:.0f} s "
             f"({'reused from cache' if results['base_info'].get('reused') else 'trained in this run'}). "
             f"Fine-tuning budget: {results['config']['finetune']['tokens']:,} loss tokens per run. "
             f"Wall time of this run: {results['elapsed_s'] / 60:.1f} min.", "",
             "## Table in the seed's form (mean ± sample std over seeds)", "", main_table(s, base), "",
             "## Loss by position bucket (W = sliding window; each eval document run alone)", "",
             bucket_table(s, base), "", "## Every run", "", per_seed_table(results["runs"]), ""]
    return "\n".join(parts)
