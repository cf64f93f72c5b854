"""Thesis round two (bench/thesis/round2.py): record cutting, verdicts, and the miniature run end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx_mistral.backends.mlx  # noqa: F401  (first: loads OpenBLAS before mlx.core)
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package

from bench.thesis import round2 as R  # noqa: E402


def test_cut_records_lengths_and_specials():
    docs = [np.concatenate([[1], np.arange(3, 1003), [2]])]
    recs = R.cut_records(docs, 30, 400, seed=0)
    assert recs and all(30 <= len(r) <= 400 and r[0] == 1 and r[-1] == 2 for r in recs)
    body = np.concatenate([r[1:-1] for r in recs])
    assert np.array_equal(body, np.arange(3, 3 + len(body)))  # consecutive slices, nothing repeated
    with pytest.raises(ValueError):
        R.cut_records(docs, 3, 10, seed=0)


def test_take_tokens_draws_a_fixed_pool():
    recs = [np.full(n, i, dtype=np.int32) for i, n in enumerate([50, 120, 80, 300, 40, 200])]
    pool = R.take_tokens(recs, 300, seed=3)
    total = sum(len(r) for r in pool)
    assert total >= 300 and total - len(pool[-1]) < 300  # stops at the first record that reaches the cap
    assert [int(r[0]) for r in pool] == [int(r[0]) for r in R.take_tokens(recs, 300, seed=3)]  # seeded
    assert len({int(r[0]) for r in pool}) == len(pool)  # no record twice
    assert R.take_tokens(recs, 0, seed=0) == recs
    with pytest.raises(ValueError, match="train_tokens"):
        R.take_tokens(recs, 10_000, seed=0)


def test_tail_drop_reads_the_last_quarter():
    curve = [{"step": s, "loss": l} for s, l in [(10, 3.0), (20, 2.6), (30, 2.5), (40, 2.45), (42, 2.44)]]
    assert R.tail_drop(curve) == pytest.approx(2.5 - 2.44)  # step 30 is the last at or before 0.75 x 42
    assert R.tail_drop(curve, frac=0.5) == pytest.approx(2.6 - 2.44)
    assert R.tail_drop(curve[-1:]) is None and R.tail_drop([]) is None


def test_claims_must_name_approaches(tmp_path):
    import yaml

    cfg = yaml.safe_load((ROOT / "bench/thesis/round2.yaml").read_text())
    cfg["claims"] = [{"claim": "x", "better": "nope", "than": "generic"}]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="claims"):
        R.load_round2(p)


def test_next_lr_goes_past_the_edge_the_best_is_at():
    runs = [{"lr": lr, "loss": loss} for lr, loss in [(1e-3, 2.0), (2e-3, 2.1), (4e-3, 2.3)]]
    assert R.next_lr(runs, 2.0) == pytest.approx(5e-4)  # best is the smallest: go down
    runs[2]["loss"] = 1.9
    assert R.next_lr(runs, 2.0) == pytest.approx(8e-3)  # best is the largest: go up
    runs[1]["loss"] = 1.5
    assert R.next_lr(runs, 2.0) is None  # best inside: done
    assert R.next_lr(runs[:1], 2.0) is None


def test_verdict_rules():
    ms = R.mean_spread
    assert R.verdict(ms([-0.1, -0.11, -0.09])) == "supported"
    assert R.verdict(ms([0.1, 0.0, 0.2])) == "not supported"
    assert R.verdict(ms([-0.1, 0.1, -0.05])) == "inconclusive"
    assert R.verdict(ms([-0.1])).startswith("inconclusive")


def test_round2_miniature_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "bench.thesis.round2", "--config", "bench/thesis/round2.yaml", "--mini",
           "--out", str(out), "--cache", str(cache)]
    # two fine-tunes at a time (child processes); the serial path runs below, on a fresh cache
    proc = subprocess.run(cmd + ["--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    names = [a["name"] for a in cfg["approaches"]]
    assert {"generic", "mistral-aware"} <= set(names)
    assert set(res["best_lr"]) == set(cfg["sweep"]["recipes"])
    step = cfg["sweep"]["lrs"][-1] / cfg["sweep"]["lrs"][-2]
    for name in cfg["sweep"]["recipes"]:  # the configured lrs, then past an edge while the best is there
        lrs = sorted(r["lr"] for r in res["sweep"] if r["approach"] == name)
        extra = sorted(set(lrs) - set(cfg["sweep"]["lrs"]))
        assert set(cfg["sweep"]["lrs"]) <= set(lrs) and len(extra) <= cfg["sweep"]["extend"]
        up = [cfg["sweep"]["lrs"][-1] * step ** (k + 1) for k in range(len(extra))]
        down = [cfg["sweep"]["lrs"][0] / step ** (k + 1) for k in range(len(extra))]
        assert extra == pytest.approx(sorted(up)) or extra == pytest.approx(sorted(down))
        at_edge = res["best_lr"][name] in (max(lrs), min(lrs))
        assert res["best_lr_at_edge"][name] == at_edge and (not at_edge or len(extra) == cfg["sweep"]["extend"])
    assert sorted((r["approach"], r["seed"]) for r in res["runs"]) == sorted((n, s) for n in names for s in cfg["seeds"])
    for r in res["runs"] + res["sweep"]:
        for key in ("loss", "first_w_loss"):  # whole-record and first-W loss, reported separately
            assert math.isfinite(r[key]) and r[key] > 0
        assert len(r["curve"]) >= 2 and all("first_w_loss" in p for p in r["curve"])
        assert r["curve"][-1]["step"] == r["steps"]
    naive = [r for r in res["runs"] if r["approach"] == "generic"][0]
    assert naive["boundaries_per_row"] >= 1  # short records: naive packing crosses a boundary in every row
    assert set(res["summaries"]) == set(names) and "delta_first_w_loss" in res["summaries"]["mistral-aware"]
    planner = {p["approach"]: p for p in res["planner"]}
    assert planner["generic"]["attention"] == "dense" and planner["mistral-aware"]["attention"] == "blockwise"
    md = (out / "results.md").read_text()
    assert "first-W" in md and "## Claims" in md
    assert all(c["claim"] in md for c in cfg["claims"])
    import xml.etree.ElementTree as ET

    svg = ET.parse(out / "curves.svg").getroot()  # the curves, drawn: one line per approach and panel
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 * len(names) and "curves.svg" in md
    points = [len(s["curve"]) for s in res["summaries"].values()] * 2  # panel by panel, approach by approach
    assert [len(p.get("points").split()) for p in lines] == points
    d = R.contrast(res["runs"], "mistral-aware", "generic")
    assert d["loss"]["mean"] == pytest.approx(res["summaries"]["mistral-aware"]["delta_loss"]["mean"])
    # a second invocation reuses every finished fine-tune (result.json in each run directory)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert all(r.get("reused") for r in again["sweep"] + again["runs"])
    assert [r["loss"] for r in again["runs"]] == [r["loss"] for r in res["runs"]]
    # the serial path, from scratch (base reused): the same runs, in the same order, with the same losses
    serial = tmp_path / "serial"
    (serial / "cache").mkdir(parents=True)
    for p in cache.iterdir():
        if p.name.startswith(("base-", "corpus-")):
            (serial / "cache" / p.name).symlink_to(p)
    cmd1 = cmd[:-4] + ["--out", str(serial / "out"), "--cache", str(serial / "cache"), "--workers", "1"]
    proc = subprocess.run(cmd1, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((serial / "out" / "results.json").read_text())
    assert not any(r.get("reused") for r in one["sweep"] + one["runs"])
    assert [(r["approach"], r["lr"]) for r in one["sweep"]] == [(r["approach"], r["lr"]) for r in res["sweep"]]
    assert [(r["approach"], r["seed"]) for r in one["runs"]] == [(r["approach"], r["seed"]) for r in res["runs"]]
    assert [r["loss"] for r in one["runs"]] == pytest.approx([r["loss"] for r in res["runs"]], rel=1e-4)
    assert "last-quarter drop" in (serial / "out" / "results.md").read_text()


def test_runner_children_stop_when_the_round_is_killed(tmp_path):
    """A round killed outright (`kill`, not Ctrl-C) leaves no fine-tune running on in the background."""
    import os
    import signal
    import time

    script = tmp_path / "killed.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import mlx_mistral.backends.mlx\n"
        "from bench.thesis import round2 as R\n"
        "if __name__ == '__main__':\n"  # spawned children import this file as __main__'s stand-in
        "    r = R.Runner({}, [], [], None, workers=2)\n"
        "    futs = [r.pool.submit(time.sleep, 120) for _ in range(2)]\n"
        "    time.sleep(10)\n"  # the children are up (spawned, imported, sleeping)
        "    print(' '.join(str(p) for p in r.pool._processes), flush=True)\n"
        "    time.sleep(120)\n")

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1)
        assert all(alive(p) for p in pids)  # running, as a round's fine-tunes would be
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(alive(p) for p in pids)
    finally:
        proc.kill()
