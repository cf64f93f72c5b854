"""Thesis round two: short documents, runs to a flat eval curve, controls that separate the factors.

    python -m bench.thesis.round2 --config bench/thesis/round2.yaml --out bench/thesis/results2 [--workers 2]
    python -m bench.thesis.round2 ... --mini        # the test suite's miniature

Round one's flaw: 1k-4k-token documents (naive packing crosses a document boundary once every 2-5 rows) and
48 steps. Here:
1. Records of `rec_min..rec_max` tokens (BOS + a slice of a held-apart stdlib file + EOS), cut from the
   same corpus as round one, so naive packing crosses a document boundary in every row. The fine-tune
   pool is a fixed random draw of `records.train_tokens` tokens (0: all), seen for several epochs.
2. A small base (round one's pipeline and cache, keyed by its inputs).
3. An lr sweep (one seed) for each recipe named in `sweep.recipes`, extended past an edge (by the list's
   last ratio, `sweep.extend` times at most) while a recipe's best lr is the largest or the smallest tried
   (`next_lr`); approaches whose
   `lr` is `best:<name>` then run at that recipe's best lr.
4. Every approach x seed; eval loss recorded every `eval_every` steps (the curve) on the held-out records,
   each run alone: whole-record loss and loss on the first W tokens. `tail_drop` says how much a curve
   still fell over its last quarter; `curves.svg` draws the mean curves.
5. The planner's longest row in a memory budget for each recipe's attention path (called at report time).
Results are written after every run (`OUT/results.json`, `OUT/results.md`, `OUT/curves.svg`); each finished
fine-tune leaves `result.json` in its run directory, keyed by everything that decides it, so a rerun of the
command (stopped part way, or with more lrs or seeds) reuses the runs already done. `--workers N` runs N
fine-tunes at a time in single-threaded child processes (`Runner`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np
import yaml

from mlx_mistral.backends.mlx.loader import load_model
from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model
from mlx_mistral.core.io import write_json, write_text
from mlx_mistral.core.loop import Rows
from mlx_mistral.core.packing import pack
from mlx_mistral.core.train_config import TrainConfig
from mlx_mistral.ui.callbacks import JSONLLogger

from .corpus import BOS, EOS, build_corpus
from .metrics import document_losses, mean_spread
from .run import Progress, _load, log, machine_info, pretrain_base, steady_tokens_per_sec

APPROACH_KEYS = {"name", "label", "lora_rank", "rank_policy", "packing", "lr", "attention"}
TOP = {"seeds", "corpus", "records", "model", "pretrain", "finetune", "eval", "sweep", "planner", "approaches"}


def load_round2(path, mini: bool = False) -> dict:
    """The round-two config (its `mini` overrides applied when asked); unknown keys are a ValueError."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the experiment config {path}: {e}") from None
    over = cfg.pop("mini", None) or {}
    claims = cfg.pop("claims", None) or []  # optional: [{claim, better, than}], each judged seed by seed
    if set(cfg) != TOP:
        raise ValueError(f"{path}: top-level keys must be {', '.join(sorted(TOP))} (+ mini); "
                         f"got {', '.join(sorted(cfg))}")
    if mini:
        for k, v in over.items():
            if k not in TOP:
                raise ValueError(f"{path}: mini.{k} is not a top-level key")
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    names = [a["name"] for a in cfg["approaches"]]
    for i, a in enumerate(cfg["approaches"]):
        if set(a) != APPROACH_KEYS:
            raise ValueError(f"{path}: approaches[{i}] must have exactly the keys {', '.join(sorted(APPROACH_KEYS))}")
        if isinstance(a["lr"], str) and (not a["lr"].startswith("best:") or a["lr"][5:] not in cfg["sweep"]["recipes"]):
            raise ValueError(f"{path}: approaches[{i}].lr {a['lr']!r}: a number or best:<a name in sweep.recipes>")
    for r in cfg["sweep"]["recipes"]:
        if r not in names:
            raise ValueError(f"{path}: sweep.recipes names {r!r}, which is not an approach")
    for i, c in enumerate(claims):
        if set(c) != {"claim", "better", "than"} or c["better"] not in names or c["than"] not in names:
            raise ValueError(f"{path}: claims[{i}] needs exactly claim, better, than (the last two approach names)")
    cfg["claims"] = claims
    return cfg


# ---- short records -------------------------------------------------------------------------------------
def cut_records(docs, lo: int, hi: int, seed: int) -> list[np.ndarray]:
    """Each document (BOS + body + EOS) cut into records of lo..hi tokens (uniform length), each
    BOS + slice + EOS; a tail shorter than `lo` is dropped."""
    if not 4 <= lo <= hi:
        raise ValueError(f"need 4 <= rec_min <= rec_max, got {lo}..{hi}")
    rng = np.random.default_rng(seed)
    out = []
    for d in docs:
        body = np.asarray(d[1:-1])
        s = 0
        while True:
            n = int(rng.integers(lo, hi + 1)) - 2
            if s + n > len(body):
                break
            out.append(np.concatenate([[BOS], body[s:s + n], [EOS]]).astype(np.int32))
            s += n
    return out


def take_tokens(recs, n_tokens: int, seed: int) -> list[np.ndarray]:
    """A fixed fine-tune pool: records drawn at random (seeded) until they hold `n_tokens` tokens; 0 keeps
    them all. A small pool makes a run several epochs long, as fine-tuning sets are."""
    if n_tokens <= 0:
        return list(recs)
    order = np.random.default_rng(seed).permutation(len(recs))
    out, total = [], 0
    for i in order:
        if total >= n_tokens:
            break
        out.append(recs[i])
        total += len(recs[i])
    if total < n_tokens:
        raise ValueError(f"records.train_tokens {n_tokens} is more than the {total} record tokens there are")
    return out


def record_losses(model, recs, window: int) -> dict:
    """Whole-record and first-W-positions mean loss (nats/token), each record run alone."""
    model.eval()
    losses = [document_losses(model, r, chunk=max(len(r), 2)) for r in recs]
    model.train()
    whole = np.concatenate(losses)
    first = np.concatenate([x[:window] for x in losses])
    rest = [x[window:] for x in losses if len(x) > window]
    return {"loss": float(whole.mean()), "first_w_loss": float(first.mean()),
            "after_w_loss": float(np.concatenate(rest).mean()) if rest else None, "tokens": int(len(whole))}


class Curve:
    """Callback: on every eval event, the record losses of the model being trained."""

    def __init__(self, model, recs, window):
        self.model, self.recs, self.window, self.points = model, recs, window, []

    def __call__(self, e):
        if e["event"] == "eval":
            self.points.append({"step": e["step"], "val_loss": e["val_loss"],
                                **record_losses(self.model, self.recs, self.window)})


def run_key(cfg, a, lr, seed) -> str:
    """What decides a fine-tune's result: the data, base and fine-tune settings, the approach (less its
    label), the lr and the seed. Not the sweep's lr list, the seeds list or the approaches around it."""
    what = {k: cfg[k] for k in ("corpus", "records", "model", "pretrain", "finetune", "eval")}
    what.update(approach={k: v for k, v in a.items() if k != "label"}, lr=float(lr), seed=int(seed))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def cached_fine_tune(cfg, a, lr, seed, train_recs, eval_recs, base_dir, run_dir) -> dict:
    """`fine_tune`, or the result a finished run with the same `run_key` left in `run_dir/result.json`:
    a round stopped part way resumes where it stopped, and a sweep extended later reruns nothing."""
    key = run_key(cfg, a, lr, seed)
    done = Path(run_dir) / "result.json"
    if done.exists():
        try:
            saved = json.loads(done.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            log(f"{a['name']} lr {lr:g} s{seed}: reusing {done}")
            return {**saved["result"], "reused": True}
    r = fine_tune(cfg, a, lr, seed, train_recs, eval_recs, base_dir, run_dir)
    write_json(done, {"key": key, "result": r})
    return r


def fine_tune(cfg, a, lr, seed, train_recs, eval_recs, base_dir, run_dir) -> dict:
    f = cfg["finetune"]
    window = cfg["model"]["sliding_window"]
    model = load_model(base_dir, dtype="float32")
    packed = pack(train_recs, f["seq_len"], mode=a["packing"])
    rows = Rows.from_packed(packed)
    val = Rows.from_packed(pack(eval_recs, f["seq_len"], mode="none"))
    per_batch = rows.weights.sum() / len(rows) * f["batch_size"]
    steps = max(1, math.ceil(f["tokens"] / per_batch))
    every = max(1, steps // f["eval_points"])
    tcfg = TrainConfig(model=str(base_dir), fine_tune="lora", seq_len=f["seq_len"], batch_size=f["batch_size"],
                       packing=a["packing"], targets=f["targets"], lora_rank=a["lora_rank"],
                       lora_alpha=f["alpha_over_rank"] * a["lora_rank"], rank_policy=a["rank_policy"],
                       steps=steps, lr=lr, warmup_steps=max(1, round(f["warmup_fraction"] * steps)),
                       seed=seed, eval_every=every, save_every=0, keep_checkpoints=1, out=str(run_dir)).validate()
    lora_config = prepare_model(model, tcfg, str(base_dir))
    prog = Progress(f"{a['name']} lr{lr:g} s{seed}", 50)
    curve = Curve(model, eval_recs, window)
    t0 = time.perf_counter()
    end = Trainer(model, tcfg, rows, val, run_dir, callbacks=[JSONLLogger(run_dir / "metrics.jsonl"), prog, curve],
                  lora_config=lora_config, model_name=str(base_dir)).run()
    if end["reason"] != "done":
        raise RuntimeError(f"{a['name']} seed {seed}: training ended with {end['reason']}: {end['message']}")
    start = prog.of("start")[0]
    final = curve.points[-1] if curve.points else {"step": steps, **record_losses(model, eval_recs, window)}
    return {"approach": a["name"], "lr": lr, "seed": seed, "steps": steps, "eval_every": every,
            "packed_rows": packed.rows, "packing_efficiency": packed.efficiency,
            # a record starting after a row's first position: a boundary in the row (isolated or not by the mask)
            "boundaries_per_row": float((np.asarray(packed.tokens)[:, 1:] == BOS).sum() / packed.rows),
            "trainable_params": int(start["trainable_params"]), "peak_memory_gb": end["peak_memory"] / 2**30,
            "tokens_per_sec": steady_tokens_per_sec(prog.of("train")), "final_train_loss": end["final_loss"],
            "seconds": time.perf_counter() - t0, "curve": curve.points,
            "loss": final["loss"], "first_w_loss": final["first_w_loss"], "after_w_loss": final["after_w_loss"]}


def next_lr(runs: list[dict], step: float) -> float | None:
    """The lr to try next when the best of `runs` (lowest final loss) is at an edge of the lrs tried: `step`
    times the largest when it is the largest, the smallest divided by `step` when it is the smallest; None
    when the best lies inside."""
    best = min(runs, key=lambda r: r["loss"])["lr"]
    lrs = sorted(r["lr"] for r in runs)
    if len(lrs) < 2:
        return None
    if best == lrs[-1]:
        return float(f"{lrs[-1] * step:.6g}")
    if best == lrs[0]:
        return float(f"{lrs[0] / step:.6g}")
    return None


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_CHILD: tuple = ()  # a child process's (cfg, train_recs, eval_recs, base_dir), set once by _child_init


class Runner:
    """Runs fine-tunes (`cached_fine_tune`) inline, or `workers` at a time in single-threaded child processes.
    At this model size a step is bound by op dispatch, not arithmetic: one thread trains nearly as fast as two
    (5,010 vs 5,650 loss tokens/s measured), so two workers on 2 cores do about 1.8x the work of one."""

    def __init__(self, cfg, train_recs, eval_recs, base_dir, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.ctx = (cfg, train_recs, eval_recs, base_dir)
        self.pool = None
        self.saved = {k: os.environ.get(k) for k in THREAD_VARS}
        if workers > 1:  # children read these when they start (lazily, so they stay set until close)
            os.environ.update({k: "1" for k in THREAD_VARS})
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_child_init,
                                            initargs=self.ctx)

    def run(self, jobs):
        """jobs: [(approach, lr, seed, run_dir)]; yields (job, result) as each finishes."""
        if self.pool is None:
            for j in jobs:
                yield j, _job(self.ctx, *j)
            return
        futures = {self.pool.submit(_child_job, *j): j for j in jobs}
        for f in as_completed(futures):
            yield futures[f], f.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _child_init(*ctx):
    global _CHILD
    _CHILD = ctx
    parent = os.getppid()

    def orphaned():  # the round killed (not interrupted): stop rather than train on with no one to report to
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)
    threading.Thread(target=orphaned, daemon=True).start()


def _job(ctx, a, lr, seed, run_dir):
    cfg, train_recs, eval_recs, base_dir = ctx
    return cached_fine_tune(cfg, a, lr, seed, train_recs, eval_recs, base_dir, run_dir)


def _child_job(a, lr, seed, run_dir):
    return _job(_CHILD, a, lr, seed, run_dir)


# ---- planner column ----------------------------------------------------------------------------------------
def planner_rows(cfg) -> list[dict]:
    """Longest row in the budget for each approach's attention path, from the memory planner (now)."""
    from mlx_mistral.core.adapters import count_params, plan_for_config
    from mlx_mistral.core.config import bundled_config
    from mlx_mistral.core.memory import longest_row, parse_size

    p = cfg["planner"]
    args = bundled_config(p["model"])
    budget = parse_size(p["budget"])
    out = []
    for a in cfg["approaches"]:
        tc = TrainConfig(model=p["model"], fine_tune="lora", lora_rank=a["lora_rank"], rank_policy=a["rank_policy"],
                         targets=cfg["finetune"]["targets"], quantize=p["bits"], batch_size=1, grad_checkpoint=True,
                         dtype="bfloat16").validate()
        n = count_params(plan_for_config(args, tc))
        r = longest_row(args, budget, batch_size=1, grad_checkpoint=True, fine_tune="lora", trainable_params=n,
                        bits=p["bits"], dtype="bfloat16", attention=a["attention"])
        out.append({"approach": a["name"], "attention": a["attention"], "trainable_params": n,
                    "longest_row": r[0] if r else None, "estimate_gb": r[1].total / 1e9 if r else None})
    return out


# ---- aggregation and report (pure) ------------------------------------------------------------------------------
def summarise(runs, approaches, seeds) -> dict:
    """Per approach: mean ± sd of the final losses; mean curve; per-seed differences vs the first approach."""
    ref = approaches[0]["name"]
    out = {}
    for a in approaches:
        mine = {r["seed"]: r for r in runs if r["approach"] == a["name"]}
        if not mine:
            continue
        s = {k: mean_spread([r[k] for r in mine.values()]) for k in ("loss", "first_w_loss", "peak_memory_gb",
                                                                        "tokens_per_sec", "seconds")}
        s["boundaries_per_row"] = statistics.fmean(r["boundaries_per_row"] for r in mine.values())
        drops = [tail_drop(r["curve"]) for r in mine.values()]
        s["tail_drop"] = mean_spread(drops) if None not in drops else None
        s["trainable_params"] = next(iter(mine.values()))["trainable_params"]
        s["lr"] = next(iter(mine.values()))["lr"]
        steps = [p["step"] for p in next(iter(mine.values()))["curve"]]
        s["curve"] = [{"step": st, **{k: statistics.fmean(r["curve"][i][k] for r in mine.values()
                                                           if i < len(r["curve"]))
                                       for k in ("loss", "first_w_loss")}} for i, st in enumerate(steps)]
        if a["name"] != ref:
            for k, d in contrast(runs, a["name"], ref).items():
                s[f"delta_{k}"] = d
        out[a["name"]] = s
    return out


def contrast(runs, better: str, than: str) -> dict:
    """Per-seed differences `better` - `than` of the final whole-record and first-W losses (negative: the
    claim's side is better), over the seeds both ran."""
    a = {r["seed"]: r for r in runs if r["approach"] == better}
    b = {r["seed"]: r for r in runs if r["approach"] == than}
    common = sorted(set(a) & set(b))
    if not common:
        return {}
    return {k: mean_spread([a[x][k] - b[x][k] for x in common]) for k in ("loss", "first_w_loss")}


def tail_drop(curve: list[dict], frac: float = 0.25, key: str = "loss") -> float | None:
    """How much the eval loss still fell over a run's last `frac` of steps: the loss at the last eval point at
    or before (1 - frac) of the run, minus the final loss. Small (against the effects judged) means the curve
    has flattened; None when the curve has no point that early."""
    if not curve:
        return None
    end = curve[-1]["step"]
    early = [p for p in curve if p["step"] <= (1 - frac) * end]
    return float(early[-1][key] - curve[-1][key]) if early else None


def verdict(delta: dict | None) -> str:
    """Lower loss is better: supported when every seed improves and the mean exceeds 2 sd of the
    differences; not supported when every seed is worse or equal; otherwise inconclusive."""
    if not delta:
        return "not run"
    v = delta["values"]
    if len(v) < 3:
        return "inconclusive (fewer than 3 seeds)"
    if all(x < 0 for x in v) and -delta["mean"] > 2 * delta["std"]:
        return "supported"
    if all(x >= 0 for x in v):
        return "not supported"
    return "inconclusive"


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def curves_svg(summaries: dict, keys=("loss", "first_w_loss"), titles=("whole-record eval loss",
                                                                         "first-W eval loss")) -> str:
    """The mean eval curves (one line per approach), one panel per key, as a standalone SVG. x is the
    fraction of the run (every run has the same token budget; runs without packing take more steps)."""
    from xml.sax.saxutils import escape

    w, h, pad, gap = 420, 260, 44, 30
    names = list(summaries)
    pts = {n: [(p["step"] / summaries[n]["curve"][-1]["step"], p) for p in summaries[n]["curve"]] for n in names}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + gap}" height="{h + 24 + 18 * len(names)}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for k, (key, title) in enumerate(zip(keys, titles)):
        ys = [p[key] for n in names for _, p in pts[n]]
        lo, hi = min(ys), max(ys)
        lo, hi = lo - 0.02 * (hi - lo + 1e-9), hi + 0.02 * (hi - lo + 1e-9)
        x0 = k * (w + gap)

        def X(f):
            return x0 + pad + f * (w - pad - 8)

        def Y(v):
            return 18 + (h - 18 - pad) * (hi - v) / (hi - lo)
        out.append(f'<text x="{x0 + w / 2}" y="12" text-anchor="middle">{escape(title)}</text>')
        out.append(f'<rect x="{X(0)}" y="18" width="{w - pad - 8}" height="{h - 18 - pad}" fill="none" stroke="#999"/>')
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            out.append(f'<text x="{X(0) - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        for f in (0, 0.25, 0.5, 0.75, 1):
            out.append(f'<text x="{X(f):.1f}" y="{h - pad + 14}" text-anchor="middle">{f:g}</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{h - pad + 28}" text-anchor="middle">fraction of the run</text>')
        for i, n in enumerate(names):
            line = " ".join(f"{X(f):.1f},{Y(p[key]):.1f}" for f, p in pts[n])
            out.append(f'<polyline points="{line}" fill="none" stroke="{COLOURS[i % len(COLOURS)]}" '
                       'stroke-width="1.5"/>')
    for i, n in enumerate(names):
        y = h + 12 + 18 * i
        out.append(f'<line x1="{pad}" y1="{y}" x2="{pad + 24}" y2="{y}" stroke="{COLOURS[i % len(COLOURS)]}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{pad + 30}" y="{y + 4}">{escape(n)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def render2(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Thesis round two results ({res['mode']})", "", f"Command: `{res['command']}`", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), load {m['load_start']} at start, {m.get('load_end', '?')} "
             f"at end. Wall time {res['elapsed_s'] / 60:.1f} min; the fine-tunes' own time "
             f"{sum({(r['approach'], r['lr'], r['seed']): r['seconds'] for r in res['sweep'] + res['runs']}.values()) / 60:.1f} min"
             f"{' (some reused from an earlier invocation)' if any(r.get('reused') for r in res['sweep'] + res['runs']) else ''}. Base: {res['base_info']['params']:,} parameters "
             f"(W = {res['config']['model']['sliding_window']}). Records: {res['records']}.", ""]
    lines += ["## lr sweep (seed %d): final whole-record loss / first-W loss" % res["config"]["sweep"]["seed"], "",
              "| recipe | lr | loss | first-W loss | last-quarter drop |", "|---|---|---|---|---|"]
    for r in res["sweep"]:
        d = tail_drop(r["curve"])
        lines.append(f"| {r['approach']} | {r['lr']:g} | {r['loss']:.4f} | {r['first_w_loss']:.4f} | "
                     f"{'–' if d is None else f'{d:.4f}'} |")
    edge = [n for n, e in res.get("best_lr_at_edge", {}).items() if e]
    lines += ["", f"Best lr: {res['best_lr']}" + (f" (at an edge of the sweep for {', '.join(edge)}: a bound, not a best)"
                                                  if edge else ""), "",
              "## Final eval loss, mean ± sd over seeds; Δ = per-seed difference vs the first approach", "",
              "Last-quarter drop: how much the eval loss still fell over the run's last quarter of steps (the curve "
              "has flattened when this is small against the Δs).", "",
              "| approach | lr | boundaries/row | loss | first-W loss | last-quarter drop | Δ loss | Δ first-W | "
              "verdict (Δ loss) | trainable | peak MB | tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in res["config"]["approaches"]:
        s = res["summaries"].get(a["name"])
        if not s:
            lines.append(f"| {a['name']} | not run ||||||||||")
            continue
        def pm(x, d=4):
            return f"{x['mean']:+.{d}f} ± {x['std']:.{d}f}" if x else "–"
        lines.append(f"| {a['name']} | {s['lr']:g} | {s['boundaries_per_row']:.2f} | {s['loss']['mean']:.4f} ± "
                     f"{s['loss']['std']:.4f} | {s['first_w_loss']['mean']:.4f} ± {s['first_w_loss']['std']:.4f} | "
                     f"{pm(s.get('tail_drop'))} | {pm(s.get('delta_loss'))} | {pm(s.get('delta_first_w_loss'))} | "
                     f"{verdict(s.get('delta_loss')) if s.get('delta_loss') else '(reference)'} | "
                     f"{s['trainable_params']:,} | {s['peak_memory_gb']['mean'] * 1024:.0f} | "
                     f"{s['tokens_per_sec']['mean']:.0f} |")
    if res["config"].get("claims"):
        lines += ["", "## Claims, judged seed by seed (Δ = the claim's side minus the other; negative favours the "
                      "claim)", "", "| claim | compared | Δ loss per seed | Δ loss | verdict | Δ first-W per seed | "
                      "Δ first-W | verdict |", "|---|---|---|---|---|---|---|---|"]
        for c in res["config"]["claims"]:
            d = contrast(res["runs"], c["better"], c["than"])
            if not d:
                lines.append(f"| {c['claim']} | {c['better']} vs {c['than']} | not run ||||||")
                continue
            cells = []
            for k in ("loss", "first_w_loss"):
                cells += [", ".join(f"{v:+.3f}" for v in d[k]["values"]),
                          f"{d[k]['mean']:+.4f} ± {d[k]['std']:.4f}", verdict(d[k])]
            lines.append(f"| {c['claim']} | {c['better']} vs {c['than']} | " + " | ".join(cells) + " |")
    lines += ["", "## Eval curves (mean over seeds): step: whole-record loss / first-W loss", "",
              "![eval curves](curves.svg)", ""]
    for name, s in res["summaries"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['step']}: {p['loss']:.3f}/{p['first_w_loss']:.3f}"
                                               for p in s["curve"]))
    if res.get("planner"):
        p = res["config"]["planner"]
        lines += ["", f"## Longest row in {p['budget']} ({p['model']}, {p['bits']}-bit QLoRA, batch 1, "
                      "gradient checkpointing), from the memory planner (calibrated on small models; a prediction for the 7B)", "",
                  "| approach | attention | trainable params | longest row | estimate GB |", "|---|---|---|---|---|"]
        for r in res["planner"]:
            lines.append(f"| {r['approach']} | {r['attention']} | {r['trainable_params']:,} | {r['longest_row']} | "
                         f"{r['estimate_gb'] and round(r['estimate_gb'], 2)} |")
    return "\n".join(lines) + "\n"


def report(out: Path, res: dict):
    """results.md and the curves' picture next to it."""
    if res["summaries"]:
        write_text(out / "curves.svg", curves_svg(res["summaries"]))
    write_text(out / "results.md", render2(res))


def run_round2(cfg, out: Path, cache: Path, command: str, mode: str, workers: int = 1) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(cache, **cfg["corpus"])
    rc = cfg["records"]
    train_recs = take_tokens(cut_records(corpus.finetune, rc["rec_min"], rc["rec_max"], rc["seed"]),
                             rc.get("train_tokens", 0), rc["seed"])
    eval_recs = cut_records(corpus.eval, rc["rec_min"], rc["rec_max"], rc["seed"] + 1)[:rc["n_eval"]]
    lens = np.array([len(r) for r in train_recs])
    rec_info = {"train": len(train_recs), "train_tokens": int(lens.sum()), "eval": len(eval_recs),
                "median_len": float(np.median(lens)),
                "min_len": int(lens.min()), "max_len": int(lens.max())}
    log(f"records: {rec_info}")
    base_dir, base_info = pretrain_base(cfg, corpus, cache)
    window = cfg["model"]["sliding_window"]
    base_eval = record_losses(load_model(base_dir, dtype="float32"), eval_recs, window)
    res = {"mode": mode, "command": command, "config": cfg, "machine": machine_info(), "records": rec_info,
           "base_info": base_info, "base": base_eval, "sweep": [], "best_lr": {}, "runs": [], "summaries": {},
           "planner": None, "elapsed_s": 0.0}
    try:
        res["planner"] = planner_rows(cfg)
    except ValueError as e:
        res["planner_error"] = str(e)
    by_name = {a["name"]: a for a in cfg["approaches"]}
    runs_root = cache / f"runs2-{mode}"

    def save():
        res["elapsed_s"] = time.perf_counter() - t0
        write_json(out / "results.json", res)

    sw = cfg["sweep"]
    runner = Runner(cfg, train_recs, eval_recs, base_dir, workers)
    try:
        def sweep(pairs):
            jobs = [(by_name[n], lr, sw["seed"], runs_root / f"sweep-{n}-{lr:g}") for n, lr in pairs]
            for (a, lr, _, _), r in runner.run(jobs):
                log(f"sweep {a['name']} lr {lr:g}: loss {r['loss']:.4f} first-W {r['first_w_loss']:.4f}")
                res["sweep"].append(r)
                save()

        sweep([(n, lr) for lr in sw["lrs"] for n in sw["recipes"]])
        step = sw["lrs"][-1] / sw["lrs"][-2] if len(sw["lrs"]) > 1 else 4.0
        for _ in range(int(sw.get("extend", 0))):
            # a best lr at an edge of the sweep is a bound, not a best: go on past that edge
            more = [(n, lr) for n in sw["recipes"]
                    if (lr := next_lr([r for r in res["sweep"] if r["approach"] == n], step)) is not None]
            if not more:
                break
            sweep(more)
        for n in sw["recipes"]:
            mine = [r for r in res["sweep"] if r["approach"] == n]
            res["best_lr"][n] = min(mine, key=lambda r: r["loss"])["lr"]
            res.setdefault("best_lr_at_edge", {})[n] = next_lr(mine, step) is not None
        res["sweep"].sort(key=lambda r: (sw["recipes"].index(r["approach"]), r["lr"]))  # finish order varies

        jobs, order = [], {}
        for seed in cfg["seeds"]:
            for a in cfg["approaches"]:
                lr = res["best_lr"][a["lr"][5:]] if isinstance(a["lr"], str) else float(a["lr"])
                order[(a["name"], seed)] = len(order)
                reuse = [r for r in res["sweep"] if r["approach"] == a["name"] and r["lr"] == lr and r["seed"] == seed]
                if reuse:
                    res["runs"].append(reuse[0])
                else:
                    jobs.append((a, lr, seed, runs_root / f"{a['name']}-s{seed}"))
        for (a, lr, seed, _), r in runner.run(jobs):
            log(f"{a['name']} s{seed} lr {lr:g}: loss {r['loss']:.4f} first-W {r['first_w_loss']:.4f} "
                f"({r['seconds']:.0f} s)")
            res["runs"].append({**r, "approach": a["name"]})
            res["runs"].sort(key=lambda r: order[(r["approach"], r["seed"])])
            res["summaries"] = summarise(res["runs"], cfg["approaches"], cfg["seeds"])
            save()
            report(out, res)
        res["summaries"] = summarise(res["runs"], cfg["approaches"], cfg["seeds"])
    finally:
        runner.close()
    res["machine"]["load_end"] = _load()
    save()
    report(out, res)
    log(f"done in {res['elapsed_s'] / 60:.1f} min")
    return res


@click.command()
@click.option("--config", "config_path", default="bench/thesis/round2.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="bench/thesis/results2", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache", default="bench/thesis/.cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--mini", is_flag=True, help="The config's `mini` section: the test suite's miniature.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Fine-tunes run at a time, each in a single-threaded child process (2 on 2 cores: the small "
                   "base's steps are dispatch-bound, so each run keeps most of its speed).")
def main(config_path, out, cache, mini, workers):
    """Thesis round two: short documents, eval curves, factor controls, per-recipe best lr."""
    try:
        cfg = load_round2(config_path, mini)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    command = "python -m bench.thesis.round2 " + " ".join(sys.argv[1:])
    run_round2(copy.deepcopy(cfg), Path(out), Path(cache), command, "mini" if mini else "full", workers)


if __name__ == "__main__":
    main()
