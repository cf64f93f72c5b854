"""The training dashboard: a live `rich` panel, plain log lines, the end-of-run summary, `mlx-mistral dashboard`.

Everything is fed by the trainer's event dicts (`start`, `train`, `eval`, `checkpoint`, `end`; the same
objects `metrics.jsonl` holds one per line):

- `DashboardState.update(event)` folds one event into the state in O(1) (loss history is a bounded
  `charts.History`), so a callback never slows the training step.
- `render(state)` is a pure function from state to a `rich` renderable: header, progress with ETA, the
  loss chart of the whole run (braille, train and validation on one plot), throughput, memory,
  packing, grad norm, checkpoint. Tests render it to a recorded console.
- `make_callback()` gives the trainer's callback: a `rich.live.Live` panel redrawn 4 times a second
  from its own thread when stdout is a terminal, else one greppable line per event (`format_line`).
  `close()` prints the summary table (`summary`).
- `show(run_dir)` (what `mlx-mistral dashboard RUN_DIR` runs) redraws the same panel from
  `RUN_DIR/metrics.jsonl`, following the file while the run goes on (a partial last line, as a killed run
  leaves, waits until it is complete).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from .charts import BRAILLE_BLANK, History, braille_chart

METRICS_FILE = "metrics.jsonl"
STALE_AFTER_S = 120.0  # `dashboard` flags a followed run silent this long (killed, or a long eval)
TRAIN_STYLE, VAL_STYLE = "cyan", "magenta"


# ---------------------------------------------------------------------------------------------------
# State: fold events
# ---------------------------------------------------------------------------------------------------

class DashboardState:
    """What the dashboard knows about a run, folded from trainer events by `update` (O(1) each)."""

    def __init__(self, total_steps: int | None = None, history_cap: int = 1024):
        self.start: dict = {}
        self.last: dict = {}  # latest "train" event
        self.anchor: dict = {}  # first "train" event since the latest "start" (excludes warm-up/compile)
        self.last_eval: dict | None = None
        self.best_val: tuple[int, float] | None = None  # (step, val_loss)
        self.checkpoint: dict | None = None
        self.end: dict | None = None
        self.train = History(history_cap)
        self.val = History(history_cap)
        self.total_steps_hint = total_steps
        self.n_events = 0
        self.last_time: float | None = None
        self.version = 0  # bumped when the loss history changes (the chart is redrawn only then)
        self.chart_cache: tuple | None = None

    def update(self, event: dict) -> None:
        """Fold one event in; unknown event kinds are counted and otherwise ignored."""
        kind = event.get("event")
        self.n_events += 1
        self.last_time = event.get("time", self.last_time)
        if kind in ("start", "resume"):
            if kind == "start":
                self.start = dict(event)
                self.end = None
            resume_at = event.get("start_step" if kind == "start" else "step") or 0
            if resume_at and len(self.train):  # a resumed run redoes the steps after its checkpoint
                self.train.drop_after(resume_at)  # (metrics.jsonl keeps both: the last value of a step counts)
                self.val.drop_after(resume_at)
                self.version += 1
        elif kind == "train":
            if not self.last or self.last.get("time", 0) < self.start.get("time", 0):
                self.anchor = event  # the first report of this process: the pace is measured from here
            self.last = event
            loss = event.get("loss")
            if loss is not None:
                self.train.append(event.get("step", 0), float(loss))
                self.version += 1
        elif kind == "eval":
            self.last_eval = event
            v = event.get("val_loss")
            if v is not None and math.isfinite(v):
                self.val.append(event.get("step", 0), float(v))
                self.version += 1
                if self.best_val is None or v < self.best_val[1]:
                    self.best_val = (event.get("step", 0), float(v))
        elif kind == "checkpoint":
            self.checkpoint = event
        elif kind == "end":
            self.end = event

    # -- derived values --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int((self.end or {}).get("step") or self.last.get("step") or self.start.get("start_step") or 0)

    @property
    def total_steps(self) -> int | None:
        return self.start.get("total_steps") or self.total_steps_hint

    @property
    def finished(self) -> bool:
        return self.end is not None

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds trained; with `now`, extrapolated past the last event of a run still going."""
        if self.end is not None and self.end.get("elapsed") is not None:
            return float(self.end["elapsed"])
        e = self.last.get("elapsed")
        if e is None:
            return None
        if now is not None and self.last.get("time") is not None:
            e += max(0.0, now - self.last["time"])
        return float(e)

    def seconds_per_step(self) -> float | None:
        """The pace since this process's first report (after a resume, too), else the last report's it/s."""
        a, t = self.anchor, self.last
        if a and t.get("step", 0) > a.get("step", 0) and None not in (a.get("elapsed"), t.get("elapsed")):
            return (t["elapsed"] - a["elapsed"]) / (t["step"] - a["step"])
        ips = t.get("it_per_sec")
        return 1.0 / ips if ips else None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the current pace, or None before it is known."""
        if self.finished:
            return 0.0
        total, pace, measured = self.total_steps, self.seconds_per_step(), self.last.get("elapsed")
        if not total or pace is None or measured is None:
            return None
        left = pace * (total - self.step)
        return max(0.0, left - (self.elapsed(now) - measured))  # count down between events


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    """H:MM:SS (or '--:--' when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_gb(n_bytes: float | None) -> str:
    """Bytes as GB (1e9, as mlx-lm reports): one decimal, two below 1 GB so a tiny model is not 0.0."""
    if n_bytes is None:
        return "?"
    gb = n_bytes / 1e9
    return f"{gb:.2f}" if gb < 1 else f"{gb:.1f}"


def fmt_count(n: float | None) -> str:
    """1234 -> '1.2K', 7.2e9 -> '7.24B'."""
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _num(x, spec: str) -> str:
    return "?" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------------
# The panel
# ---------------------------------------------------------------------------------------------------

class LossChart:
    """Train (cyan) and validation (magenta) loss of the whole run on one braille plot, sized to fit."""

    def __init__(self, state: DashboardState, height: int = 8):
        self.state, self.height = state, height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # rich may lay a renderable out several times per frame; the lines only change with the loss
        # history and the width, so they are drawn once per (history version, width, height).
        key = (self.state.version, options.max_width, self.height)
        cached = self.state.chart_cache
        if cached is None or cached[0] != key:
            cached = self.state.chart_cache = (key, self._lines(options.max_width))
        yield from cached[1]

    def _lines(self, max_width: int) -> list[Text]:
        train, val = list(self.state.train), list(self.state.val)
        ys = [y for _, y in train + val if math.isfinite(y)]
        if not ys:
            return [Text("loss chart: waiting for the first step", style="dim")]
        xs = [x for x, _ in train + val]
        x_range, y_range = (min(xs), max(xs)), (min(ys), max(ys))
        labels = [f"{y_range[1]:.3f}", f"{(y_range[0] + y_range[1]) / 2:.3f}", f"{y_range[0]:.3f}"]
        lw = max(map(len, labels))
        width = max(8, max_width - lw - 2)
        tr = braille_chart(train, width, self.height, x_range, y_range)
        va = braille_chart(val, width, self.height, x_range, y_range)
        lines = []
        for i, (trow, vrow) in enumerate(zip(tr, va)):
            label = labels[0] if i == 0 else labels[2] if i == self.height - 1 else \
                labels[1] if i == self.height // 2 and self.height > 2 else ""
            line = Text(f"{label:>{lw}} " + ("┤" if label else "│"), style="dim")
            run, run_style = [], None
            for t, v in zip(trow, vrow):
                tb, vb = ord(t) - BRAILLE_BLANK, ord(v) - BRAILLE_BLANK
                style = VAL_STYLE if vb else TRAIN_STYLE  # a cell with a validation dot shows in its colour
                if style != run_style and run:
                    line.append("".join(run), style=run_style)
                    run = []
                run.append(chr(BRAILLE_BLANK | tb | vb))
                run_style = style
            line.append("".join(run), style=run_style)
            lines.append(line)
        axis = Text(" " * (lw + 1) + "└" + f"step {x_range[0]:g}", style="dim")
        axis.append("  ⣿ train", style=TRAIN_STYLE)
        if val:
            axis.append("  ⣿ val", style=VAL_STYLE)
        right = f"{x_range[1]:g}"
        axis.append(" " * max(1, max_width - len(axis) - len(right)) + right, style="dim")
        lines.append(axis)
        return lines


def _kv(table: Table, *pairs: tuple[str, str | Text]) -> None:
    cells: list = []
    for k, v in pairs:
        cells += [Text(k, style="dim"), v if isinstance(v, Text) else Text(v, style="bold")]
    table.add_row(*cells)


def _preference_line(t: dict, ev: dict | None) -> Text:
    """DPO / ORPO: reward margin and accuracy (train, then validation), chosen / rejected rewards, and ORPO's
    NLL; the keys are TRL's names (`rewards/margins`, ...), shown under shorter labels."""
    line = Text("reward margin ", style="dim")
    line.append(_num(t.get("rewards/margins"), ".4f"), style=f"bold {TRAIN_STYLE}")
    line.append("  acc ", style="dim")
    line.append(_num(t.get("rewards/accuracies"), ".2f"), style=f"bold {TRAIN_STYLE}")
    if ev is not None and "val_rewards/margins" in ev:
        line.append("   val margin ", style="dim")
        line.append(_num(ev.get("val_rewards/margins"), ".4f"), style=f"bold {VAL_STYLE}")
        line.append("  acc ", style="dim")
        line.append(_num(ev.get("val_rewards/accuracies"), ".2f"), style=f"bold {VAL_STYLE}")
    line.append(f"   chosen {_num(t.get('rewards/chosen'), '.3f')} rejected {_num(t.get('rewards/rejected'), '.3f')}",
                style="dim")
    if "nll_loss" in t:
        line.append(f"  nll {_num(t.get('nll_loss'), '.4f')}", style="dim")
    return line


def render(state: DashboardState, now: float | None = None, chart_height: int = 8,
           stale_after: float | None = None):
    """The dashboard panel for `state` (pure: nothing is read but the arguments).

    `now` (unix seconds) lets a live view tick elapsed time and ETA between events; None shows the values
    as of the last event. With `stale_after` (seconds), a run silent that long is flagged, for a viewer
    in another process that cannot tell a long eval from a killed run.
    """
    s, t = state.start, state.last
    parts: list = []

    # Header: model, adapter, backend, device.
    head = Text()
    head.append(str(s.get("model", "?")), style="bold")
    if s.get("fine_tune"):
        head.append(f"  {s['fine_tune']}" + (f" ({s['rank_policy']} ranks)" if s.get("rank_policy") else ""))
    if s.get("trainable_params") is not None:
        frac = f" ({100 * s['trainable_params'] / s['total_params']:.2f}%)" if s.get("total_params") else ""
        head.append(f"  trainable {fmt_count(s['trainable_params'])} / {fmt_count(s.get('total_params'))}{frac}")
    head.append(f"  backend {s.get('backend', '?')}  device {s.get('device', '?')}", style="dim")
    if s.get("dtype"):
        head.append(f"  {s['dtype']}" + (f" ({s['dtype_reason']})" if s.get("dtype_reason") else ""), style="dim")
    parts.append(head)

    # Progress: step, bar, percent, elapsed, ETA.
    total, step = state.total_steps, state.step
    prog = Table.grid(padding=(0, 1), expand=True)
    prog.add_column(no_wrap=True)
    prog.add_column(ratio=1)
    prog.add_column(no_wrap=True, justify="right")
    pct = f"{100 * step / total:5.1f}%" if total else ""
    bar = ProgressBar(total=total or None, completed=step, pulse=not total and not state.finished)
    eta = state.eta(now)
    prog.add_row(Text(f"step {step}/{total or '?'}", style="bold"), bar,
                 Text(f"{pct}  elapsed {fmt_duration(state.elapsed(now))}  ETA {fmt_duration(eta)}"))
    parts.append(prog)

    # Losses as numbers, then as a chart.
    loss = Text("loss ", style="dim")
    loss.append(_num(t.get("loss"), ".4f"), style=f"bold {TRAIN_STYLE}")
    if state.last_eval is not None:
        loss.append("   val ", style="dim")
        loss.append(_num(state.last_eval.get("val_loss"), ".4f"), style=f"bold {VAL_STYLE}")
        if state.last_eval.get("val_ppl") is not None:
            loss.append(f" (ppl {_num(state.last_eval.get('val_ppl'), '.2f')})", style="dim")
    if state.best_val is not None:
        loss.append(f"   best val {state.best_val[1]:.4f} @ step {state.best_val[0]}", style="dim")
    parts += [Text(""), loss]
    if "rewards/margins" in t:  # DPO / ORPO: the reward margin and accuracy beside the loss
        parts.append(_preference_line(t, state.last_eval))
    parts += [LossChart(state, chart_height), Text("")]

    # Throughput, optimizer, memory, packing, checkpoint.
    stats = Table.grid(padding=(0, 1))
    for _ in range(4):
        stats.add_column(no_wrap=True)
    _kv(stats, ("lr", _num(t.get("lr"), ".2e")), ("grad norm", _num(t.get("grad_norm"), ".3g")))
    _kv(stats, ("tok/s", fmt_rate(t.get("tokens_per_sec"))), ("it/s", fmt_rate(t.get("it_per_sec"))))
    eff = t.get("packing_efficiency", s.get("packing_efficiency"))
    _kv(stats, ("tokens", fmt_count(t.get("tokens"))),
        ("packing", f"{s.get('packing', '?')} {_num(eff and 100 * eff, '.1f')}% full"))
    if has_context(s):
        _kv(stats, *context_cells(s))
    parts.append(stats)

    mem_total = s.get("memory_total")
    mem = Table.grid(padding=(0, 1))
    mem.add_column(no_wrap=True)
    mem.add_column(width=24)
    mem.add_row(Text.assemble(("memory ", "dim"), (f"{fmt_gb(t.get('active_memory'))} GB", "bold"),
                              (" active  ", "dim"), (f"{fmt_gb(t.get('peak_memory'))} GB", "bold"),
                              (f" peak / {fmt_gb(mem_total)} GB", "dim")),
                ProgressBar(total=mem_total, completed=t.get("peak_memory") or 0) if mem_total else "")
    parts.append(mem)

    ck = state.checkpoint
    parts.append(Text.assemble(("checkpoint ", "dim"),
                               (f"step {ck.get('step')} → {ck.get('path')}", "bold") if ck else ("none yet", "dim")))

    if state.end is not None:
        reason = state.end.get("reason", "done")
        style = {"done": "green", "interrupted": "yellow", "terminated": "yellow"}.get(reason, "red")
        status = Text(f" {reason} ", style=f"bold {style}")
    elif (stale_after is not None and now is not None and state.last_time is not None
          and now - state.last_time > stale_after):
        status = Text(f" no event for {fmt_duration(now - state.last_time)} ", style="bold yellow")
    else:
        status = Text(" training ", style="bold green")
    title = Text.assemble(("mlx-mistral", "bold"), (f" · {s.get('run_dir', '')}" if s.get("run_dir") else ""))
    return Panel(Group(*parts), title=title, subtitle=status, border_style="blue")


def _chart_height(console: Console) -> int:
    """Chart rows that keep the panel (14 lines besides the chart with the context line, and a hint line) on
    one screen: 3 to 8."""
    return max(3, min(8, console.size.height - 16))


def has_context(start: dict) -> bool:
    """Whether a start event carries context utilisation (`core.packing.context_stats`; SFT runs)."""
    return all(isinstance(start.get(k), (int, float)) for k in
               ("context_tokens_per_row", "context_utilisation", "longest_whole_doc", "split_docs"))


def context_cells(start: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    """("context", "30,412/32,768 tok/row (92.8%)"), ("longest whole", "18,034 tok · 3 split") of a start
    event: real tokens per row of capacity, the longest document trained whole, documents split across rows."""
    seq = f"/{start['seq_len']:,}" if isinstance(start.get("seq_len"), int) else ""
    split = f" · {start['split_docs']:,} split" if start["split_docs"] else ""
    return (("context", f"{start['context_tokens_per_row']:,.0f}{seq} tok/row "
                        f"({100 * start['context_utilisation']:.1f}%)"),
            ("longest whole", f"{start['longest_whole_doc']:,} tok{split}"))


def summary(state: DashboardState) -> Table:
    """The end-of-run table: losses, tokens, time, memory, where things are, what to run next."""
    s, e = state.start, state.end or {}
    table = Table(title="Run summary", box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    reason = e.get("reason", "unfinished")
    table.add_row("status", f"{reason}" + (f": {e['message']}" if e.get("message") else ""))
    table.add_row("steps", f"{state.step}/{state.total_steps or '?'}")
    table.add_row("final train loss", _num(e.get("final_loss", state.last.get("loss")), ".4f"))
    best = e.get("best_val_loss", state.best_val and state.best_val[1])
    at = f" (step {state.best_val[0]})" if state.best_val and best == state.best_val[1] else ""
    table.add_row("best val loss", _num(best, ".4f") + at)
    tokens, elapsed = e.get("tokens", state.last.get("tokens")), state.elapsed()
    table.add_row("tokens trained", f"{fmt_count(tokens)}" + (f" ({tokens / elapsed:.0f} tok/s average)"
                                                             if tokens and elapsed else ""))
    table.add_row("time", fmt_duration(elapsed))
    if has_context(s):
        n = s["split_docs"]
        table.add_row("context", f"{s['context_tokens_per_row']:,.0f} of {s.get('seq_len') or 0:,} tokens per row "
                                 f"used ({100 * s['context_utilisation']:.1f}%); longest document trained whole: "
                                 f"{s['longest_whole_doc']:,} tokens"
                                 + (f"; {n:,} document{'s' * (n != 1)} split across rows" if n else ""))
    mem_total = f" / {fmt_gb(s['memory_total'])} GB" if s.get("memory_total") else ""
    table.add_row("peak memory", f"{fmt_gb(e.get('peak_memory', state.last.get('peak_memory')))} GB{mem_total}")
    run_dir = e.get("run_dir") or s.get("run_dir")
    full = s.get("fine_tune") == "full"  # the run directory is then itself the model
    table.add_row("model weights" if full else "adapters", str(e.get("adapter_path") or "-"))
    table.add_row("last checkpoint", str(state.checkpoint["path"]) if state.checkpoint else "-")
    table.add_row("metrics", str(Path(run_dir) / METRICS_FILE) if run_dir else "-")
    if run_dir and s.get("model"):
        r = shlex.quote(str(run_dir))
        use = f"--model {r}" if full else f"--model {shlex.quote(str(s['model']))} --adapter {r}"
        table.add_row("next", Text(f"mlx-mistral eval {use} --data DATA\n"
                                   f"mlx-mistral generate {use} --prompt \"...\"\n"
                                   f"mlx-mistral export gguf {use} --out model.gguf",
                                   style="bold"))
    return table


# ---------------------------------------------------------------------------------------------------
# Plain log lines
# ---------------------------------------------------------------------------------------------------

def format_line(event: dict, state: DashboardState | None = None) -> str | None:
    """One greppable log line for `event` (None for kinds that have none). `state` adds totals and ETA."""
    kind = event.get("event")
    total = state.total_steps if state else None
    if kind == "start":
        tp, ap = event.get("trainable_params"), event.get("total_params")
        return (f"start model {event.get('model')} backend {event.get('backend')} device {event.get('device')} "
                f"{event.get('fine_tune')} {event.get('rank_policy')} trainable {fmt_count(tp)}/{fmt_count(ap)} "
                f"steps {event.get('total_steps')} from {event.get('start_step', 0)} seq {event.get('seq_len')} "
                f"batch {event.get('batch_size')}x{event.get('grad_accum')} packing {event.get('packing')} "
                f"eff {_num(event.get('packing_efficiency') and 100 * event['packing_efficiency'], '.1f')}% "
                f"mem_total {fmt_gb(event.get('memory_total'))}GB run {event.get('run_dir')}"
                + (f" dtype {event['dtype']} ({event.get('dtype_reason', '')})" if event.get("dtype") else "")
                + (f" context {event['context_tokens_per_row']:.0f}/{event.get('seq_len')} tok/row "
                   f"({100 * event['context_utilisation']:.1f}%) longest_whole {event['longest_whole_doc']} "
                   f"split {event['split_docs']}" if has_context(event) else ""))
    if kind == "train":
        line = (f"step {event.get('step')}/{total or '?'} loss {_num(event.get('loss'), '.4f')} "
                f"lr {_num(event.get('lr'), '.2e')} tok/s {fmt_rate(event.get('tokens_per_sec'))} "
                f"it/s {fmt_rate(event.get('it_per_sec'))} grad {_num(event.get('grad_norm'), '.3g')} "
                f"mem {fmt_gb(event.get('active_memory'))}/"
                f"{fmt_gb(state.start.get('memory_total') if state else None)}GB "
                f"peak {fmt_gb(event.get('peak_memory'))}GB "
                f"eff {_num(event.get('packing_efficiency') and 100 * event['packing_efficiency'], '.1f')}%")
        if "rewards/margins" in event:
            line += (f" margin {_num(event.get('rewards/margins'), '.4f')} "
                     f"acc {_num(event.get('rewards/accuracies'), '.2f')}")
        if state is not None:
            line += f" elapsed {fmt_duration(state.elapsed())} eta {fmt_duration(state.eta())}"
        return line
    if kind == "eval":
        best = f" best {state.best_val[1]:.4f}" if state and state.best_val else ""
        if "val_rewards/margins" in event:
            return (f"eval step {event.get('step')} val_loss {_num(event.get('val_loss'), '.4f')} "
                    f"val_margin {_num(event.get('val_rewards/margins'), '.4f')} "
                    f"val_acc {_num(event.get('val_rewards/accuracies'), '.2f')}{best}")
        return (f"eval step {event.get('step')} val_loss {_num(event.get('val_loss'), '.4f')} "
                f"val_ppl {_num(event.get('val_ppl'), '.2f')}{best}")
    if kind == "checkpoint":
        return f"checkpoint step {event.get('step')} path {event.get('path')}"
    if kind == "resume":
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in (event.get("changed") or {}).items())
        return f"resume step {event.get('step')} from {event.get('checkpoint')}" + (f" changed {changed}" if changed else "")
    if kind == "end":
        return (f"end step {event.get('step')} reason {event.get('reason')} "
                f"elapsed {fmt_duration(event.get('elapsed'))} final_loss {_num(event.get('final_loss'), '.4f')} "
                f"best_val_loss {_num(event.get('best_val_loss'), '.4f')} tokens {event.get('tokens')} "
                f"peak {fmt_gb(event.get('peak_memory'))}GB adapters {event.get('adapter_path')}")
    return None


# ---------------------------------------------------------------------------------------------------
# Trainer callbacks
# ---------------------------------------------------------------------------------------------------

class _Callback:
    def __init__(self, console: Console, total_steps: int | None):
        self.console = console
        self.state = DashboardState(total_steps=total_steps)
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Stop drawing; print the summary table if the run reached its end event."""
        if self._closed:
            return
        self._closed = True
        self._stop()
        if self.state.finished:
            self.console.print(summary(self.state))

    def _stop(self) -> None:
        pass


class PlainLog(_Callback):
    """One log line per event, flushed at once (for log files, CI, `| tee`)."""

    def __call__(self, event: dict) -> None:
        self.state.update(event)
        line = format_line(event, self.state)
        if line is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            with contextlib.suppress(Exception):
                self.console.file.flush()


class _LaidOut:
    """A renderable whose lines are laid out once per width and then replayed."""

    def __init__(self, renderable):
        self.renderable = renderable
        self._width, self._lines = None, None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self._width != options.max_width:
            self._lines = console.render_lines(self.renderable, options, pad=False)
            self._width = options.max_width
        for line in self._lines:
            yield from line
            yield Segment.line()


class LiveDashboard(_Callback):
    """The live panel: events only update the state; `rich.live.Live` redraws from its own thread."""

    def __init__(self, console: Console, total_steps: int | None, refresh_per_second: float = 4):
        super().__init__(console, total_steps)
        self._started = False
        self._key, self._frame = None, None
        self.live = Live(console=console, refresh_per_second=refresh_per_second, transient=False,
                         get_renderable=self._renderable)

    def _renderable(self):
        # Between events only the clock moves, so a frame is laid out at most once per event and per
        # second; the other redraws reuse its lines.
        now = time.time()
        key = (self.state.n_events, int(now), self.console.size)
        if key != self._key:
            try:
                frame = render(self.state, now=now, chart_height=_chart_height(self.console))
            except Exception as e:  # a drawing bug must never take the training run down with it
                frame = Text(f"dashboard error: {type(e).__name__}: {e}", style="red")
            self._frame, self._key = _LaidOut(frame), key
        return self._frame

    def __call__(self, event: dict) -> None:
        self.state.update(event)
        if not self._started and not self._closed:
            self._started = True
            self.live.start()

    def _stop(self) -> None:
        if self._started:
            self.live.stop()  # draws the final frame


def make_callback(console: Console | None = None, plain: bool | None = None,
                  total_steps: int | None = None, refresh_per_second: float = 4) -> PlainLog | LiveDashboard:
    """The trainer's display callback: the live panel on a terminal, plain log lines otherwise.

    `plain=None` decides by whether `console` (default: stdout) is a terminal; `--no-dashboard` passes
    True. Use as a context manager (or call `close()`) so the live display stops and the summary prints.
    """
    console = console or Console()
    if plain is None:
        plain = not console.is_terminal or console.is_dumb_terminal
    if plain:
        return PlainLog(console, total_steps)
    return LiveDashboard(console, total_steps, refresh_per_second)


# ---------------------------------------------------------------------------------------------------
# Reading metrics.jsonl
# ---------------------------------------------------------------------------------------------------

class MetricsReader:
    """Read new events from a growing metrics.jsonl; a partial last line waits until it is complete."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.pending = b""  # bytes after the last newline: a line still being written (or cut by a kill)
        self.line_no = 0
        self.bad_lines: list[int] = []

    def poll(self) -> tuple[list[dict], bool]:
        """(new events, restarted): `restarted` is True when the file shrank, and reading began again."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return [], False
        restarted = size < self.offset  # the file was replaced or truncated: read it again from the top
        if restarted:
            self.offset, self.pending, self.line_no, self.bad_lines = 0, b"", 0, []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        events = []
        for raw in lines:
            self.line_no += 1
            if not raw.strip():
                continue
            try:
                ev = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ev = None
            if isinstance(ev, dict):
                events.append(ev)
            else:
                self.bad_lines.append(self.line_no)
        return events, restarted


def load_state(path: str | Path) -> tuple[DashboardState, MetricsReader]:
    """The state of the run logged in `path` so far, and the reader positioned to follow it."""
    reader = MetricsReader(path)
    state = DashboardState()
    for ev in reader.poll()[0]:
        state.update(ev)
    return state, reader


@contextlib.contextmanager
def _cbreak(stream):
    """Read keys one at a time without echo (Ctrl-C still interrupts)."""
    import termios
    import tty

    fd = stream.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _read_key(stream, timeout: float) -> str | None:
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    return os.read(stream.fileno(), 1).decode(errors="replace") if ready else None


def show(run_dir: Path, once: bool = False, interval: float = 0.5, console: Console | None = None):
    """Draw the training dashboard of `run_dir` (or of a metrics.jsonl file) from its metrics.jsonl.

    While the run goes on, the panel follows the file; once it has ended the final state stays on
    screen. q (or Ctrl-C) quits. When stdin or stdout is not a terminal, or with `once`, the panel is
    drawn once. ValueError when there is no metrics file (and nothing to follow) or no event in it.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    console = console or Console()
    interactive = not once and sys.stdin.isatty() and console.is_terminal
    if not path.exists() and not interactive:  # when following, wait for the trainer to create it
        raise ValueError(f"{path} does not exist: is {run_dir} a run directory written by "
                         f"`mlx-mistral train`? (the trainer writes {METRICS_FILE} there)")
    state, reader = load_state(path)

    def frame():
        notes = []
        if reader.pending:
            notes.append(f"a partial last line ({len(reader.pending)} bytes) is not shown yet")
        if reader.bad_lines:
            notes.append(f"skipped lines that are not JSON objects: {reader.bad_lines[:5]}")
        view = [render(state, now=time.time() if interactive and not state.finished else None,
                       chart_height=_chart_height(console) if interactive else 8, stale_after=STALE_AFTER_S)]
        if state.finished and not interactive:
            view.append(summary(state))
        if notes:
            view.append(Text("; ".join(notes), style="dim yellow"))
        if interactive:
            view.append(Text(("run finished" if state.finished else f"following {path}")
                             + " · q or Ctrl-C to quit", style="dim"))
        return Group(*view)

    if state.n_events == 0 and not interactive:
        raise ValueError(f"{path} holds no complete event yet")
    if not interactive:
        console.print(frame())
        return
    try:
        with _cbreak(sys.stdin), Live(console=console, get_renderable=frame, refresh_per_second=4,
                                      screen=False, redirect_stdout=False, redirect_stderr=False):
            while True:
                events, restarted = reader.poll()
                if restarted:
                    state = DashboardState()
                for ev in events:
                    state.update(ev)
                if (_read_key(sys.stdin, interval) or "").lower() == "q":
                    break
    except KeyboardInterrupt:
        pass
    if state.finished:  # below the last frame, so it stays in the scrollback (too tall to redraw live)
        console.print(summary(state))

