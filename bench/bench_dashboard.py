"""What the dashboard costs a training run: per-event callback time, per-redraw time, and the step time of
a stand-in training loop with the live panel on vs off.

    python bench/bench_dashboard.py                    # ~1-2 minutes on 2 cores
    python bench/bench_dashboard.py --step-ms 1000 --steps 20

The live panel redraws from rich's own thread `refresh_per_second` (4) times a second, so its cost is a
share of wall time, not a cost per step; it lays a frame out anew only when an event came or the clock
moved a second, and replays the laid-out lines otherwise. The callback
runs on the training thread once per report. The stand-in step is an MLX matmul chain (which releases
the GIL while it computes, as a real step does) and, as a worst case, a pure-Python loop that holds the
GIL for the whole step. Output goes to /dev/null through a console that believes it is a terminal, so
the full layout and ANSI encoding are paid but no terminal emulator is.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import mlx_mistral  # noqa: F401
import mlx.core as mx
from rich.console import Console

from mlx_mistral.ui.dashboard import DashboardState, LiveDashboard, PlainLog, _LaidOut, render

T0 = 1_700_000_000.0
START = {"event": "start", "time": T0, "run_dir": "runs/bench", "model": "mistralai/Mistral-7B-v0.3",
         "backend": "mlx", "device": "gpu", "fine_tune": "qlora", "rank_policy": "gqa",
         "trainable_params": 20_971_520, "total_params": 7_268_995_072, "total_steps": 10_000,
         "start_step": 0, "seq_len": 2048, "batch_size": 4, "grad_accum": 1, "packing": "swa",
         "packing_efficiency": 0.97, "memory_total": 24e9}


def train_event(step: int, now: float) -> dict:
    return {"event": "train", "time": now, "step": step, "loss": 2 + 8 * math.exp(-step / 400),
            "lr": 2e-4, "grad_norm": 1.1, "tokens": step * 8192, "tokens_per_sec": 812.0, "it_per_sec": 0.1,
            "elapsed": now - T0, "peak_memory": 14e9, "active_memory": 12e9, "packing_efficiency": 0.97}


def terminal_console() -> Console:
    return Console(file=open("/dev/null", "w"), force_terminal=True, width=120, height=40)


def bench_callback(n: int = 20_000) -> float:
    """Seconds per event on the training thread, with the live display running."""
    cb = LiveDashboard(terminal_console(), None)
    cb(START)
    t = time.perf_counter()
    for i in range(1, n + 1):
        cb(train_event(i, T0 + i))
    dt = (time.perf_counter() - t) / n
    cb.close()
    return dt


def bench_redraw(history: int, reps: int = 30) -> tuple[float, float, float]:
    """Seconds per redraw: (same frame replayed, new layout with the chart cached, new layout with a
    new point on the chart). The live panel lays a frame out once per event and per second."""
    st = DashboardState()
    st.update(START)
    for i in range(1, history + 1):
        st.update(train_event(i, T0 + i))
        if i % 100 == 0:
            st.update({"event": "eval", "time": T0 + i, "step": i, "val_loss": 2.3, "val_ppl": 10.0})
    con = terminal_console()
    cached, fresh, replay = [], [], []
    frame = _LaidOut(render(st, now=time.time()))
    for _ in range(reps):
        t = time.perf_counter()
        con.print(frame)
        replay.append(time.perf_counter() - t)
        t = time.perf_counter()
        con.print(render(st, now=time.time()))
        cached.append(time.perf_counter() - t)
        st.version += 1  # as if an event had just arrived
        t = time.perf_counter()
        con.print(render(st, now=time.time()))
        fresh.append(time.perf_counter() - t)
    return statistics.median(replay), statistics.median(cached), statistics.median(fresh)


def _median_time(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_mlx_step(step_s: float):
    """A callable taking about `step_s` seconds in MLX compute (GIL released while mx.eval runs)."""
    a = mx.random.normal((512, 512))
    mx.eval(a)

    def chain(k):
        x = a
        for _ in range(k):
            x = (x @ a) * (1.0 / 512)
        mx.eval(x)

    chain(4)
    k = max(1, round(40 * step_s / _median_time(lambda: chain(40))))
    return lambda: chain(k)


def make_python_step(step_s: float):
    """A callable holding the GIL for about `step_s` seconds (the worst case for a redraw thread)."""
    def spin(k):
        s = 0
        for i in range(k):
            s += i
        return s

    k = max(1, round(1_000_000 * step_s / _median_time(lambda: spin(1_000_000))))
    return lambda: spin(k)


def run_loop(step, steps: int, mode: str) -> tuple[float, float]:
    """(mean seconds per step, display CPU time / loop wall time) for no display, the live panel, or
    plain log lines, one event per step. Display CPU time is the callbacks' on the training thread plus,
    for the live panel, every redraw of its thread (timed inside `Live.refresh` with the thread's own
    CPU clock, so waiting for the GIL or a core is not counted as work)."""
    cb = {"none": None, "live": lambda: LiveDashboard(terminal_console(), steps),
          "plain": lambda: PlainLog(terminal_console(), steps)}[mode]
    cb = cb() if cb else None
    spent = [0.0]
    if isinstance(cb, LiveDashboard):
        refresh = cb.live.refresh

        def timed_refresh():
            t = time.thread_time()
            refresh()
            spent[0] += time.thread_time() - t

        cb.live.refresh = timed_refresh  # rich's refresh thread calls `live.refresh()`
    if cb:
        cb(dict(START, total_steps=steps, time=time.time()))
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        if cb:
            t = time.thread_time()
            cb(train_event(i, time.time()))
            spent[0] += time.thread_time() - t
    wall = time.perf_counter() - t0
    if cb:
        cb.close()
    return wall / steps, spent[0] / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-ms", type=float, default=250.0, help="stand-in training step time")
    ap.add_argument("--steps", type=int, default=16, help="steps per timed loop")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of none/live/plain")
    args = ap.parse_args()

    per_event = bench_callback()
    print(f"callback (training thread): {per_event * 1e6:.1f} us/event")
    for h in (100, 1000, 100_000):
        r, c, f = bench_redraw(h)
        print(f"redraw, {h:>6} logged steps: {r * 1e3:.2f} ms same frame, {c * 1e3:.1f} ms new layout, "
              f"{f * 1e3:.1f} ms new layout + chart point")

    step_s = args.step_ms / 1000
    for name, step in (("mlx matmul (GIL released)", make_mlx_step(step_s)),
                       ("pure Python (GIL held)", make_python_step(step_s))):
        times = {"none": [], "live": [], "plain": []}
        shares = {"live": [], "plain": []}
        for _ in range(args.rounds):
            for mode in times:
                dt, share = run_loop(step, args.steps, mode)
                times[mode].append(dt)
                if mode in shares:
                    shares[mode].append(share)
        base = statistics.median(times["none"])
        print(f"step = {name}, {base * 1e3:.0f} ms:")
        for mode in ("live", "plain"):
            m = statistics.median(times[mode])
            print(f"  {mode:5s}: display CPU {100 * statistics.median(shares[mode]):.2f}% of wall time; "
                  f"step {m * 1e3:.0f} ms vs {base * 1e3:.0f} ms without ({100 * (m - base) / base:+.1f}%, "
                  f"noise included)")
    print(f"[medians of {args.rounds} interleaved rounds x {args.steps} steps]")


if __name__ == "__main__":
    main()
