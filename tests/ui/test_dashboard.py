"""The dashboard: braille charts, the panel rendered to a recorded console, plain log lines, the summary,
`mlx-mistral dashboard RUN_DIR` on metrics.jsonl (partial last line included), and the live panel in a
real pseudo-terminal. The braille dot layout is checked against Unicode's own character names."""

from __future__ import annotations

import io
import json
import math
import os
import re
import select
import subprocess
import sys
import textwrap
import time
import unicodedata

import mlx_mistral  # noqa: F401
import pytest
from click.testing import CliRunner
from rich.console import Console

from mlx_mistral.ui.charts import BRAILLE_BLANK, History, braille_chart, dots, downsample, overlay
from mlx_mistral.cli import main
from mlx_mistral.ui.dashboard import (DashboardState, LiveDashboard, MetricsReader, PlainLog, format_line,
                                      make_callback, render, summary)

T0 = 1_700_000_000.0


def synthetic_events(n_steps=200, every=10, eval_every=50, run_dir="runs/demo", end=True, t0=T0):
    """A run's events: loss falls 10 -> 2, 0.5 s per step, eval + checkpoint every `eval_every` steps."""
    evs = [{"event": "start", "time": t0, "run_dir": run_dir, "model": "tiny-mistral", "backend": "mlx",
            "device": "cpu", "fine_tune": "lora", "rank_policy": "gqa", "trainable_params": 1_234_567,
            "total_params": 125_000_000, "total_steps": n_steps, "start_step": 0, "seq_len": 512,
            "batch_size": 4, "grad_accum": 1, "packing": "swa", "packing_efficiency": 0.971,
            "memory_total": 24e9, "context_utilisation": 0.971, "context_tokens_per_row": 497.2,
            "longest_doc": 1800, "longest_whole_doc": 498, "split_docs": 3, "split_token_fraction": 0.125}]
    loss = lambda s, off=0.0: 2 + off + 8 * math.exp(-s / 40)  # noqa: E731
    for step in range(every, n_steps + 1, every):
        el = step * 0.5
        evs.append({"event": "train", "time": t0 + el, "step": step, "loss": loss(step),
                    "lr": 2e-4 * min(1, step / 20), "grad_norm": 1.23, "tokens": step * 2048,
                    "tokens_per_sec": 812.4, "it_per_sec": 2.0, "elapsed": el, "peak_memory": 3.4e9,
                    "active_memory": 1.2e9, "packing_efficiency": 0.971})
        if step % eval_every == 0:
            v = loss(step, 0.2)
            evs.append({"event": "eval", "time": t0 + el, "step": step, "val_loss": v, "val_ppl": math.exp(v)})
            evs.append({"event": "checkpoint", "time": t0 + el, "step": step,
                        "path": f"{run_dir}/checkpoints/{step:07d}"})
    if end:
        evs.append({"event": "end", "time": t0 + n_steps * 0.5, "step": n_steps, "reason": "done",
                    "elapsed": n_steps * 0.5, "final_loss": loss(n_steps), "best_val_loss": loss(n_steps, 0.2),
                    "tokens": n_steps * 2048, "peak_memory": 3.4e9, "run_dir": run_dir,
                    "adapter_path": f"{run_dir}/adapters.safetensors", "message": "trained 200 steps"})
    return evs


def fold(events, **kw):
    st = DashboardState(**kw)
    for e in events:
        st.update(e)
    return st


def text_of(renderable, width=100, **kw) -> str:
    con = Console(record=True, width=width, file=io.StringIO(), **kw)
    con.print(renderable)
    return con.export_text()


def braille_cells(text: str) -> list[str]:
    return [c for c in text if 0x2801 <= ord(c) <= 0x28FF]


# ---- charts -----------------------------------------------------------------------------------------

def test_downsample_averages_each_bucket():
    pts = [(float(x), float(x)) for x in range(100)]
    got = downsample(pts, 10, (0, 99))
    assert len(got) == 10
    # Bucket i holds the x that round to it: x*9/99 rounds to i.
    for i, v in enumerate(got):
        members = [x for x in range(100) if round(x * 9 / 99) == i]
        assert v == pytest.approx(sum(members) / len(members))
    assert downsample([(5, 1.0), (5, float("nan"))], 3, (0, 10)) == [None, 1.0, None]
    with pytest.raises(ValueError, match="n_buckets"):
        downsample(pts, 0, (0, 1))


def test_braille_dot_layout_matches_unicode_names():
    # A 1x1 chart is 2 dot columns by 4 dot rows. Unicode numbers the dots 1-2-3-7 down the left
    # column and 4-5-6-8 down the right one.
    (cell,) = braille_chart([(0, 3.0), (1, 0.0)], width=1, height=1)
    # Dot 1 (left, top), then the fall is joined down the whole right column: dots 4, 5, 6, 8.
    assert unicodedata.name(cell) == "BRAILLE PATTERN DOTS-14568"
    (cell,) = braille_chart([(0, 0.0), (1, 0.0)], width=1, height=1, y_range=(0, 3))
    assert unicodedata.name(cell) == "BRAILLE PATTERN DOTS-78"  # flat at the bottom row
    (cell,) = braille_chart([(0, 3.0)], width=1, height=1, x_range=(0, 1), y_range=(0, 3))
    assert unicodedata.name(cell) == "BRAILLE PATTERN DOTS-1"


def test_braille_chart_shape_and_a_falling_line_has_no_holes():
    pts = [(s, 2 + 8 * math.exp(-s / 40)) for s in range(1, 201)]
    rows = braille_chart(pts, width=30, height=5)
    assert len(rows) == 5 and all(len(r) == 30 for r in rows)
    assert all(0x2800 <= ord(c) <= 0x28FF for r in rows for c in r)
    # Highest loss at top-left, lowest at the bottom-right.
    assert dots(rows[0][0]) > 0 and dots(rows[-1][-1]) > 0
    assert dots(rows[0][-1]) == 0 and dots(rows[-1][0]) == 0
    # Every dot column is drawn (2 per character), and each row of dots is reached by the line.
    bits_left, bits_right = (0x01 | 0x02 | 0x04 | 0x40), (0x08 | 0x10 | 0x20 | 0x80)
    for j in range(30):
        col = [ord(r[j]) - BRAILLE_BLANK for r in rows]
        assert any(m & bits_left for m in col) and any(m & bits_right for m in col), j
    for i in range(5):
        assert any(dots(c) for c in rows[i])


def test_braille_chart_empty_flat_and_bad_size():
    assert braille_chart([], 4, 2) == ["\u2800" * 4] * 2
    flat = braille_chart([(x, 1.0) for x in range(10)], 5, 2)
    assert sum(dots(c) for c in flat[0]) + sum(dots(c) for c in flat[1]) == 10  # one dot per column
    assert braille_chart([(0, float("nan")), (1, float("inf"))], 3, 1) == ["\u2800" * 3]
    with pytest.raises(ValueError, match="1x1"):
        braille_chart([(0, 1.0)], 0, 3)


def test_overlay_ors_dots_and_refuses_mismatched_sizes():
    a = braille_chart([(0, 1.0), (9, 1.0)], 5, 1, y_range=(0, 1))
    b = braille_chart([(0, 0.0), (9, 0.0)], 5, 1, y_range=(0, 1))
    both = overlay(a, b)
    assert [dots(c) for c in both[0]] == [dots(x) + dots(y) for x, y in zip(a[0], b[0])]
    with pytest.raises(ValueError, match="same width"):
        overlay(a, braille_chart([], 4, 1))


def test_history_is_bounded_and_its_slots_weigh_the_same():
    h = History(cap=8)
    for i in range(1000):
        h.append(i, float(i))
        assert len(h) <= 9  # cap slots + the one being filled
    assert h.stride == 128
    xs = [x for x, _ in h]
    # Slot k is the mean of raw points [128k, 128k + 128): every slot stands for the same number of steps.
    assert xs[:7] == [128 * k + 63.5 for k in range(7)]
    assert xs[-1] == pytest.approx(sum(range(896, 1000)) / 104)  # the slot being filled: its running mean
    assert all(x == y for x, y in h)
    h.drop_after(500)
    assert max(x for x, _ in h) <= 500
    with pytest.raises(ValueError, match="even"):
        History(cap=3)


# ---- the panel ----------------------------------------------------------------------------------------

def test_panel_shows_numbers_chart_and_eta():
    evs = synthetic_events(end=False)
    st = fold(evs[:25])  # through step 180 of 200 (eval at 50, 100, 150)
    assert st.step == 180
    out = text_of(render(st), width=100)
    for needle in ["tiny-mistral", "lora (gqa ranks)", "trainable 1.23M / 125M (0.99%)", "backend mlx",
                   "device cpu", "step 180/200", "90.0%", "elapsed 0:01:30",
                   "ETA 0:00:10",  # 20 steps left at 0.5 s/step
                   f"loss {2 + 8 * math.exp(-180 / 40):.4f}", f"val {2.2 + 8 * math.exp(-150 / 40):.4f}",
                   "best val", "@ step 150", "2.00e-04", "1.23", "812", "2.00", "1.2 GB active",
                   "3.4 GB peak / 24.0 GB", "swa 97.1% full", "runs/demo/checkpoints/0000150",
                   "context 497/512 tok/row (97.1%)", "longest whole 498 tok · 3 split",
                   "⣿ train", "⣿ val", "step 10", "training"]:
        assert needle in out, (needle, out)
    assert len(braille_cells(out)) > 60  # the chart is drawn
    # The y axis spans the losses seen (train max at step 10, train min at 180).
    assert f"{2 + 8 * math.exp(-10 / 40):.3f}" in out and f"{2 + 8 * math.exp(-180 / 40):.3f}" in out


def test_eta_counts_down_between_events_and_is_zero_at_end():
    st = fold(synthetic_events(end=False)[:25])
    last = st.last["time"]
    assert st.eta() == pytest.approx(10.0)
    assert st.eta(now=last + 4) == pytest.approx(6.0)
    assert "elapsed 0:01:34" in text_of(render(st, now=last + 4))
    assert st.eta(now=last + 100) == 0.0
    assert "training" in text_of(render(st, now=last + 1000))  # the process itself is alive
    assert "no event for 0:16:40" in text_of(render(st, now=last + 1000, stale_after=120))
    assert fold(synthetic_events()).eta() == 0.0
    assert fold(synthetic_events()[:1]).eta() is None  # no step yet


def test_summary_of_a_full_fine_tune_points_at_the_run_as_the_model():
    evs = synthetic_events()
    evs[0] = dict(evs[0], fine_tune="full")
    s = text_of(summary(fold(evs)), width=140)
    assert "mlx-mistral generate --model runs/demo --prompt" in s and "--adapter" not in s
    assert "model weights" in s


def test_finished_panel_and_summary():
    st = fold(synthetic_events())
    out = text_of(render(st))
    assert "step 200/200" in out and "100.0%" in out and "done" in out and "ETA 0:00:00" in out
    s = text_of(summary(st), width=140)
    for needle in ["done: trained 200 steps", "200/200", f"{2 + 8 * math.exp(-5):.4f}",
                   f"{2.2 + 8 * math.exp(-5):.4f} (step 200)", "410K (4096 tok/s average)", "0:01:40",
                   "3.4 GB / 24.0 GB", "runs/demo/adapters.safetensors", "runs/demo/checkpoints/0000200",
                   "497 of 512 tokens per row used (97.1%); longest document trained whole: 498 tokens; "
                   "3 documents split across rows",
                   "runs/demo/metrics.jsonl",
                   "mlx-mistral eval --model tiny-mistral --adapter runs/demo",
                   "mlx-mistral generate --model tiny-mistral --adapter runs/demo",
                   "mlx-mistral export gguf --model tiny-mistral --adapter runs/demo"]:
        assert needle in s, (needle, s)


def test_panel_before_first_step_and_with_odd_events():
    st = fold(synthetic_events()[:1] + [{"event": "something-new", "time": T0}])
    out = text_of(render(st))
    assert "waiting for the first step" in out and "step 0/200" in out and "--:--" in out
    st.update({"event": "end", "time": T0 + 1, "step": 0, "reason": "nan", "elapsed": 1.0})
    assert "nan" in text_of(render(st))
    # A narrow terminal still gets a chart.
    st = fold(synthetic_events())
    assert len(braille_cells(text_of(render(st), width=40))) > 10


def test_resume_drops_the_redone_steps_and_paces_from_the_new_process():
    evs = synthetic_events(end=False)
    st = fold(evs[:12])  # through step 70
    st.update(dict(evs[0], start_step=50, time=T0 + 500))  # resumed from the step-50 checkpoint
    assert max(x for x, _ in st.train) <= 50 and max(x for x, _ in st.val) <= 50
    assert st.end is None
    # The trainer's elapsed carries on across a resume (25 s at step 50); the new process is slower
    # (2 s/step) after a first report that paid for compilation.
    st.update(dict(evs[1], step=60, elapsed=25 + 30, time=T0 + 530, it_per_sec=1 / 3))
    assert st.eta() == pytest.approx(140 * 3)  # one report: its it/s
    st.update(dict(evs[1], step=70, elapsed=25 + 50, time=T0 + 550))
    assert st.eta() == pytest.approx(130 * 2)


# ---- plain log lines and callbacks --------------------------------------------------------------------

def test_plain_lines_are_greppable():
    st = DashboardState()
    lines = []
    for e in synthetic_events():
        st.update(e)
        line = format_line(e, st)
        if line:
            lines.append(line)
    assert lines[0].startswith("start model tiny-mistral backend mlx device cpu lora gqa trainable 1.23M/125M")
    assert lines[0].endswith(" context 497/512 tok/row (97.1%) longest_whole 498 split 3")
    assert lines[1] == ("step 10/200 loss 8.2304 lr 1.00e-04 tok/s 812 it/s 2.00 grad 1.23 mem 1.2/24.0GB "
                        "peak 3.4GB eff 97.1% elapsed 0:00:05 eta 0:01:35")
    assert sum(bool(re.match(r"step \d+/200 loss \d+\.\d{4} lr ", x)) for x in lines) == 20
    assert f"eval step 50 val_loss {2.2 + 8 * math.exp(-50 / 40):.4f}" in "\n".join(lines)
    assert "checkpoint step 50 path runs/demo/checkpoints/0000050" in lines
    assert lines[-1].startswith("end step 200 reason done elapsed 0:01:40 final_loss 2.0539")
    assert format_line({"event": "unknown"}) is None
    assert "mem 0.02/?GB peak 0.15GB" in format_line({"event": "train", "active_memory": 2.1e7, "peak_memory": 1.5e8})


def test_make_callback_plain_when_not_a_terminal():
    buf = io.StringIO()
    cb = make_callback(console=Console(file=buf, width=60))
    assert isinstance(cb, PlainLog)
    with cb:
        for e in synthetic_events():
            cb(e)
    out = buf.getvalue()
    step_lines = [x for x in out.splitlines() if x.startswith("step ")]
    assert len(step_lines) == 20 and all(len(x) > 60 for x in step_lines)  # not wrapped at 60 columns
    assert "Run summary" in out and "mlx-mistral generate" in out
    assert "\x1b[" not in out  # no colour codes in a log file
    assert isinstance(make_callback(console=Console(file=io.StringIO(), force_terminal=True)), LiveDashboard)
    assert isinstance(make_callback(console=Console(file=io.StringIO(), force_terminal=True), plain=True),
                      PlainLog)


def test_live_callback_draws_final_frame_and_summary():
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=100, height=40, color_system=None)
    with make_callback(console=con, total_steps=200, refresh_per_second=20) as cb:
        for e in synthetic_events():
            cb(e)
    out = buf.getvalue()
    assert "step 200/200" in out and "Run summary" in out and len(braille_cells(out)) > 60


def test_live_callback_without_events_prints_nothing():
    buf = io.StringIO()
    with make_callback(console=Console(file=buf, force_terminal=True)):
        pass
    assert buf.getvalue() == ""


# ---- metrics.jsonl and `mlx-mistral dashboard` -------------------------------------------------------

def write_metrics(path, events, partial: str = ""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + partial)


def test_reader_waits_for_a_partial_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    evs = synthetic_events()
    whole = json.dumps(evs[1]) + "\n"
    write_metrics(p, evs[:1], partial=whole[:17])
    r = MetricsReader(p)
    got, restarted = r.poll()
    assert [e["event"] for e in got] == ["start"] and not restarted and r.pending == whole[:17].encode()
    with open(p, "a") as f:
        f.write(whole[17:] + "not json\n" + "[1, 2]\n")
    got, _ = r.poll()
    assert [e["event"] for e in got] == ["train"] and r.bad_lines == [3, 4] and r.pending == b""
    p.write_text(json.dumps(evs[0]) + "\n")  # a new run replaced the file
    got, restarted = r.poll()
    assert restarted and [e["event"] for e in got] == ["start"]
    assert MetricsReader(tmp_path / "absent.jsonl").poll() == ([], False)


def test_dashboard_once_on_a_killed_run_with_truncated_line(tmp_path):
    evs = synthetic_events(end=False)[:25]  # killed mid-write just after step 180
    partial = '{"event": "train", "time": 17000009'
    write_metrics(tmp_path / "metrics.jsonl", evs, partial=partial)
    res = CliRunner().invoke(main, ["dashboard", str(tmp_path), "--once"])
    assert res.exit_code == 0, res.output
    assert "step 180/200" in res.output and "ETA 0:00:10" in res.output
    assert "runs/demo/checkpoints/0000150" in res.output
    assert f"partial last line ({len(partial)} bytes) is not shown yet" in res.output
    assert len(braille_cells(res.output)) > 60
    assert "Run summary" not in res.output  # not finished


def test_dashboard_on_a_finished_run_without_tty_renders_once(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", synthetic_events())
    # CliRunner's stdin is not a terminal: draw once and exit 0, even without --once.
    res = CliRunner().invoke(main, ["dashboard", str(tmp_path / "metrics.jsonl")])
    assert res.exit_code == 0, res.output
    assert "step 200/200" in res.output and "Run summary" in res.output and "done" in res.output


def test_dashboard_errors_name_the_file(tmp_path):
    res = CliRunner().invoke(main, ["dashboard", str(tmp_path)])
    assert res.exit_code != 0 and "metrics.jsonl does not exist" in res.output
    (tmp_path / "metrics.jsonl").write_text('{"event": "sta')
    res = CliRunner().invoke(main, ["dashboard", str(tmp_path), "--once"])
    assert res.exit_code != 0 and "no complete event" in res.output


# ---- a real pseudo-terminal ---------------------------------------------------------------------------

def run_in_pty(argv, steps=(), timeout=60.0, cols=100, rows=40):
    """Run argv with a pty as its terminal; `steps` are (text, action): once `text` has been printed,
    `action` runs (bytes are typed as keys, a callable is called). Returns (exit code, output)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    out, pending, deadline = b"", list(steps), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0].encode() in out:
                action = pending.pop(0)[1]
                os.write(master, action) if isinstance(action, bytes) else action()
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, out.decode(errors="replace")


FEEDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_dashboard import synthetic_events
    from mlx_mistral.ui.dashboard import LiveDashboard, make_callback
    with make_callback(total_steps=200) as cb:
        assert isinstance(cb, LiveDashboard), type(cb)
        for e in synthetic_events(t0=time.time() - 1):
            cb(e)
            time.sleep(0.03)
""")


def test_live_panel_in_a_real_pty():
    script = FEEDER.format(tests=os.path.dirname(__file__))
    rc, out = run_in_pty([sys.executable, "-c", script])
    assert rc == 0, out
    assert "\x1b[" in out  # a terminal: colours and cursor moves
    assert "mlx-mistral" in out and "step 200/200" in out and "Run summary" in out
    assert out.count("step ") > 5 and len(braille_cells(out)) > 60
    assert "497/512 tok/row (97.1%)" in out and "longest whole" in out


def test_dashboard_command_in_a_pty_quits_on_q(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", synthetic_events())
    cli = [sys.executable, "-m", "mlx_mistral.cli", "dashboard", str(tmp_path), "--interval", "0.1"]
    rc, out = run_in_pty(cli, [("run finished · q or Ctrl-C to quit", b"q")])
    assert rc == 0, out
    assert "step 200/200" in out and "Run summary" in out  # the summary prints after q
    assert "497/512 tok/row (97.1%)" in out and "498 tok · 3 split" in out


def test_dashboard_command_follows_a_growing_file(tmp_path):
    evs = synthetic_events()
    path = tmp_path / "metrics.jsonl"
    rest = "".join(json.dumps(e) + "\n" for e in evs[8:])
    write_metrics(path, evs[:8], partial=rest[:20])  # through step 50, then half a line

    def finish_the_run():
        with open(path, "a") as f:
            f.write(rest[20:])

    cli = [sys.executable, "-m", "mlx_mistral.cli", "dashboard", str(tmp_path), "--interval", "0.1"]
    rc, out = run_in_pty(cli, [("step 50/200", finish_the_run), ("run finished", b"q")])
    assert rc == 0, out
    assert "following" in out and "partial last line" in out
    assert out.index("step 50/200") < out.index("step 200/200") < out.index("Run summary")


def preference_events(objective="dpo"):
    """A DPO (or ORPO) run's events: the trainer's keys, TRL's metric names."""
    evs = synthetic_events(n_steps=40, eval_every=20)
    evs[0]["fine_tune"] = objective
    for k in ("context_utilisation", "context_tokens_per_row", "longest_doc", "longest_whole_doc", "split_docs",
              "split_token_fraction"):
        del evs[0][k]  # pairs are packed their own way: no context line
    for e in evs:
        s = e.get("step", 0)
        if e["event"] == "train":
            e.update({"loss": 0.6931 - s / 100, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.02 * s,
                      "rewards/margins": 0.03 * s, "rewards/accuracies": min(1.0, 0.5 + s / 80),
                      "logps/chosen": -40.0, "logps/rejected": -42.0})
            if objective == "orpo":
                e["nll_loss"] = 2.5
        elif e["event"] == "eval":
            e.pop("val_ppl")
            e.update({"val_loss": 0.66, "val_rewards/margins": 0.0125, "val_rewards/accuracies": 0.8125})
    return evs


def test_preference_run_shows_margin_and_accuracy_next_to_the_loss():
    st = fold(preference_events()[:8])  # through step 40's train event, eval at 20
    out = text_of(render(st), width=110)
    lines = out.splitlines()
    at = next(i for i, x in enumerate(lines) if "loss 0.2931" in x)
    assert "val 0.6600" in lines[at] and "ppl" not in lines[at]  # no perplexity for a preference loss
    pref = lines[at + 1]
    for needle in ("reward margin 1.2000", "acc 1.00", "val margin 0.0125", "acc 0.81", "chosen 0.400",
                   "rejected -0.800"):
        assert needle in pref, (needle, pref)
    assert "nll" not in pref
    assert "tok/row" not in out and "longest whole" not in out
    orpo = text_of(render(fold(preference_events("orpo")[:8])), width=110)
    assert "nll 2.5000" in orpo
    plain = [format_line(e) for e in preference_events()]
    assert any(x and x.endswith("margin 0.3000 acc 0.62") for x in plain)
    assert "eval step 20 val_loss 0.6600 val_margin 0.0125 val_acc 0.81" in plain
