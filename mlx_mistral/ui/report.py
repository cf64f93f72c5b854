"""`mlx-mistral report RUN`: one self-contained HTML page of a run, for people who would rather look than read.

A pure function of the run's events (metrics.jsonl) and its config.yaml text: `render_report(...) -> str`.
The curves (loss with validation, learning rate, throughput, memory, gradient norm) are inline SVG
polylines, one value per step as `ui.metrics.series` keeps them (a resumed run's repeated steps: the last
value); every drawn series carries its steps and values in `data-steps` / `data-values` so the page can be
checked against metrics.jsonl. No script, no style sheet or font from elsewhere: it opens offline.
recipes/report.py reads the files and writes the page atomically.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math

import yaml

from .dashboard import fmt_count, fmt_duration, fmt_gb
from .metrics import resumes, series, summary

MAX_DRAWN = 4000  # points per polyline; longer series are drawn as min/max per bucket (the data-* keep all)
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 220, 64, 16, 14, 30
COLORS = {"loss": "#1f77b4", "val_loss": "#d6277f", "lr": "#2ca02c", "tokens_per_sec": "#ff7f0e",
          "peak_memory": "#9467bd", "active_memory": "#8c8c8c", "grad_norm": "#17becf"}
CHARTS = (  # (title, [(series, label, scale)], y unit)
    ("Loss", [("loss", "train loss", 1.0), ("val_loss", "validation loss", 1.0)], ""),
    ("Learning rate", [("lr", "lr", 1.0)], ""),
    ("Throughput", [("tokens_per_sec", "tokens/s", 1.0)], "tokens/s"),
    ("Memory", [("peak_memory", "peak", 1e-9), ("active_memory", "active", 1e-9)], "GB"),
    ("Gradient norm", [("grad_norm", "grad norm (before clipping)", 1.0)], ""),
)
CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1360px;
color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.status{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-size:12px;vertical-align:middle}
.done{background:#2a7a2a}.running{background:#1f6fb4}.interrupted{background:#b07d12}.nan{background:#b22}
.grid{display:flex;flex-wrap:wrap;gap:18px}.chart{border:1px solid #e3e3e3;border-radius:6px;padding:6px}
.chart h3{font-size:14px;margin:2px 4px}.legend span{margin-right:12px;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eee;padding:3px 10px;text-align:left;
vertical-align:top}th{background:#f6f6f6}code,td.v{font-family:SFMono-Regular,Menlo,Consolas,monospace}
.note{color:#805b00}.muted{color:#777;font-size:12px}
svg text{font:11px sans-serif;fill:#555}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def yaml_value(v) -> str:
    """A config value as one line of YAML (flow style) that `yaml.safe_load` reads back to the same value."""
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _tick_label(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e4 or a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def _drawn(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points a polyline draws: all finite ones, or min and max of each bucket past MAX_DRAWN."""
    pts = [(s, v) for s, v in points if math.isfinite(v)]
    if len(pts) <= MAX_DRAWN:
        return pts
    per = math.ceil(len(pts) / (MAX_DRAWN // 2))
    out = []
    for i in range(0, len(pts), per):
        bucket = pts[i:i + per]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out += sorted({lo, hi})
    return out


def svg_chart(title: str, lines: list[tuple[str, str, float, list[tuple[int, float]]]], unit: str,
              x_range: tuple[int, int], marks: list[int] = ()) -> str:
    """One chart: `lines` of (series name, label, scale, [(step, value)]); `marks`: steps drawn as dashed
    verticals (resumes)."""
    scaled = [(name, label, [(s, v * k) for s, v in _drawn(pts)], pts) for name, label, k, pts in lines]
    ys = [v for _, _, d, _ in scaled for _, v in d]
    x0, x1 = x_range
    x1 = max(x1, x0 + 1)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y0 == y1:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05

    def px(s):
        return PAD_L + (s - x0) / (x1 - x0) * (W - PAD_L - PAD_R)

    def py(v):
        return PAD_T + (y1 - v) / (y1 - y0) * (H - PAD_T - PAD_B)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
             'fill="#fcfcfc" stroke="#ddd"/>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{PAD_L - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{_e(_tick_label(t))}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{H - 10}" text-anchor="middle">{round(t)}</text>')
    parts.append(f'<text x="{PAD_L - 4}" y="{H - 10}" text-anchor="end">step</text>')
    if unit:
        parts.append(f'<text x="4" y="{PAD_T + 8}">{_e(unit)}</text>')
    for m in marks:
        parts.append(f'<line class="resume" x1="{px(m):.1f}" x2="{px(m):.1f}" y1="{PAD_T}" y2="{H - PAD_B}" '
                     f'stroke="#b07d12" stroke-dasharray="4 3"><title>resumed at step {m}</title></line>')
    for name, label, drawn, pts in scaled:
        color = COLORS.get(name, "#444")
        data = (f'data-series="{_e(name)}" data-steps="{" ".join(str(s) for s, _ in pts)}" '
                f'data-values="{" ".join(repr(v) for _, v in pts)}"')
        coords = " ".join(f"{px(s):.2f},{py(v):.2f}" for s, v in drawn)
        if len(drawn) == 1 or name == "val_loss":
            dots = "".join(f'<circle cx="{px(s):.2f}" cy="{py(v):.2f}" r="2.5" fill="{color}"/>' for s, v in drawn)
            parts.append(f'<g class="series" {data}>'
                         + (f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>'
                            if len(drawn) > 1 else "") + f"{dots}<title>{_e(label)}</title></g>")
        else:
            parts.append(f'<g class="series" {data}><polyline points="{coords}" fill="none" stroke="{color}" '
                         f'stroke-width="1.5"/><title>{_e(label)}</title></g>')
    parts.append("</svg>")
    legend = "".join(f'<span><b style="color:{COLORS.get(n, "#444")}">&#9632;</b> {_e(label)}</span>'
                     for n, label, _, _ in lines)
    bad = [f"{label}: {sum(1 for _, v in pts if not math.isfinite(v))} non-finite value(s), not drawn"
           for _, label, _, pts in lines if any(not math.isfinite(v) for _, v in pts)]
    thin = [f"{label}: {len(pts)} steps drawn as min/max of buckets"
            for _, label, _, pts in lines if len([1 for _, v in pts if math.isfinite(v)]) > MAX_DRAWN]
    notes = "".join(f'<div class="muted">{_e(n)}</div>' for n in bad + thin)
    return (f'<div class="chart" data-chart="{_e(title)}"><h3>{_e(title)}</h3>{"".join(parts)}'
            f'<div class="legend">{legend}</div>{notes}</div>')


def _table(rows, head=("", ""), cls: str = "") -> str:
    body = "".join(f'<tr><th>{_e(k)}</th><td class="v">{v}</td></tr>' for k, v in rows)
    return f'<table class="{cls}"><thead><tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr></thead>{body}</table>'


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return _e(v)


def render_report(events: list[dict], config_text: str | None, *, title: str, bad_lines=(), now: float | None = None
                  ) -> str:
    """The HTML page of a run from its events and the text of its config.yaml (None: not written yet)."""
    s = summary(events)
    curves = series(events)
    start = s["start"]
    status = s["status"]
    now = _dt.datetime.now().timestamp() if now is None else now
    last_time = max((e["time"] for e in events if isinstance(e.get("time"), (int, float))), default=None)
    resumed = resumes(events)
    marks = sorted({r for r, _ in resumed})
    steps = [st for pts in curves.values() for st, _ in pts]
    x_range = (min(steps + [0]), max(steps + [s.get("total_steps") or 1]))

    head = [f"<h1>{_e(title)} <span class=\"status {_e(status)}\">{_e(status)}</span></h1>",
            f'<div class="muted">model {_e(start.get("model", "?"))} · {_e(start.get("backend", "?"))} on '
            f'{_e(start.get("device", "?"))} · report written '
            f'{_dt.datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S")}</div>']
    if status == "running" and last_time is not None:
        head.append(f'<p class="note">The run had not ended when this page was written: last event '
                    f'{fmt_duration(max(now - last_time, 0))} before it (step {s["step"]} of '
                    f'{_e(s.get("total_steps", "?"))}). Run the command again for newer numbers.</p>')
    if s.get("end") and s["end"].get("message"):
        head.append(f'<p>{_e(s["end"]["message"])}</p>')
    if bad_lines:
        head.append(f'<p class="note">metrics.jsonl lines {_e(", ".join(map(str, bad_lines[:10])))} are not JSON '
                    "objects and were skipped.</p>")

    final = [("status", _e(status)), ("steps", f'{s["step"]} / {_e(s.get("total_steps", "?"))}'),
             ("final train loss", _num(s.get("final_loss", "–"))),
             ("best validation loss", f'{s["best_val_loss"]:.6g} (step {s["best_val_step"]})'
              if "best_val_loss" in s else "–"),
             ("final validation loss", _num(s.get("final_val_loss", "–"))),
             ("tokens", fmt_count(s.get("tokens"))), ("elapsed", fmt_duration(s.get("elapsed"))),
             ("median throughput", f'{fmt_count(s["median_tokens_per_sec"])} tokens/s'
              if "median_tokens_per_sec" in s else "–"),
             ("peak memory", f"{fmt_gb(s['peak_memory'])} GB" if "peak_memory" in s else "–"),
             ("resumed", str(s.get("resumes", 0)))]

    charts = []
    for name, lines, unit in CHARTS:
        present = [(n, label, k, curves[n]) for n, label, k in lines if n in curves]
        if present:
            charts.append(svg_chart(name, present, unit, x_range, marks))

    stats = [(k, _num(v) if not isinstance(v, (dict, list)) else _e(json.dumps(v)))
             for k, v in start.items() if k not in ("event", "time", "run_dir")]
    trains = [e for e in events if e.get("event") == "train"]
    if start.get("seq_len") and start.get("batch_size"):
        stats.append(("row tokens per optimizer step (per process)",
                      fmt_count(start["seq_len"] * start["batch_size"] * start.get("grad_accum", 1))))
    if len(trains) >= 2 and all(isinstance(e.get("tokens"), (int, float)) for e in (trains[0], trains[-1])):
        ds = trains[-1].get("step", 0) - trains[0].get("step", 0)
        if ds > 0:
            stats.append(("trained tokens per step (mean, from metrics.jsonl)",
                          fmt_count((trains[-1]["tokens"] - trains[0]["tokens"]) / ds)))
    pe = [e["packing_efficiency"] for e in trains if isinstance(e.get("packing_efficiency"), (int, float))]
    if pe:
        stats.append(("packing efficiency (train events)", f"{min(pe):.4f} – {max(pe):.4f}"))

    body = head + ["<h2>Result</h2>", _table(final, ("metric", "value"), "final"),
                   "<h2>Curves</h2>", f'<div class="grid">{"".join(charts) or "<p>No metrics logged yet.</p>"}</div>',
                   "<h2>Packing and context</h2>", _table(stats, ("start event", "value"), "stats")]
    if resumed:
        rows = [(f"step {r}", _e(json.dumps(changed))) for r, changed in resumed]
        body += ["<h2>Resumes</h2>", _table(rows, ("resumed at", "changed settings"), "resumes")]
    body.append("<h2>Config (config.yaml)</h2>")
    if config_text is None:
        body.append("<p>config.yaml is not written yet.</p>")
    else:
        cfg = yaml.safe_load(config_text) or {}
        if not isinstance(cfg, dict):
            raise ValueError("config.yaml is not a mapping of keys to values")
        body.append(_table([(k, _e(yaml_value(v))) for k, v in cfg.items()], ("key", "value"), "config"))
    ckpts = [e for e in events if e.get("event") == "checkpoint"]
    if ckpts:
        body += ["<h2>Checkpoints</h2>", _table([(f"step {e.get('step')}", _e(e.get("path", ""))) for e in ckpts[-10:]],
                                                 ("checkpoint", "path"), "checkpoints")]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)} · mlx-mistral report</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
