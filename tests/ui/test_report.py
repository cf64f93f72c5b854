"""`mlx-mistral report`: the page parsed with html.parser; its curves hold exactly metrics.jsonl's values (the
last value per step, a resume dropping the steps after its checkpoint), its config table reads back to
config.yaml, and it loads nothing from elsewhere."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import yaml
from click.testing import CliRunner

from mlx_mistral.cli import main
from mlx_mistral.core.train_config import TrainConfig, write_run_config
from mlx_mistral.ui.metrics import read_events, series, summary


class Page(HTMLParser):
    """Series (data-* of <g class="series"> and its polyline / circles), tables by class, and every tag."""

    def __init__(self):
        super().__init__()
        self.series: list[dict] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict]] = []
        self._table = self._row = self._cell = None
        self._chart = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "div" and "data-chart" in a:
            self._chart = a["data-chart"]
        elif tag == "g" and a.get("class") == "series":
            self.series.append(dict(a, chart=self._chart, points=0, dots=0))
        elif tag == "polyline" and self.series:
            self.series[-1]["points"] = len(a["points"].split())
        elif tag == "circle" and self.series:
            self.series[-1]["dots"] += 1
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def train(step, loss, t):
    return {"event": "train", "time": t, "step": step, "loss": loss, "lr": 1e-4 * step, "grad_norm": 0.5 + step,
            "tokens": 100 * step, "tokens_per_sec": 1000.0 + step, "it_per_sec": 2.0, "elapsed": float(step),
            "peak_memory": 2e9 + step, "active_memory": 1e9 + step, "packing_efficiency": 0.93}


def write_run(run: Path, *, ended: bool = False) -> list[dict]:
    """A run that crashed after step 6, was resumed from its step-4 checkpoint with a new lr, and is still
    training (a half-written last line), plus one corrupt line."""
    run.mkdir(parents=True)
    write_run_config(run, TrainConfig(model="mistralai/Mistral-7B-v0.3", data="./chats", steps=10, seq_len=512,
                                      lr=2e-4, rank_pattern={"k_proj": 4}, out=str(run)))
    ev = [{"event": "start", "time": 0.0, "model": "m", "backend": "mlx", "device": "gpu", "total_steps": 10,
           "start_step": 0, "seq_len": 512, "batch_size": 4, "grad_accum": 2, "packing": "swa",
           "packing_efficiency": 0.93, "context": {"rows_split": 3, "longest_document": 1900}}]
    ev += [train(s, 3.0 - 0.1 * s, float(s)) for s in range(1, 7)]
    ev += [{"event": "eval", "time": 3.5, "step": 3, "val_loss": 2.9, "val_ppl": math.exp(2.9)},
           {"event": "checkpoint", "time": 4.5, "step": 4, "path": "ck/step-4"},
           {"event": "eval", "time": 6.5, "step": 6, "val_loss": 2.6, "val_ppl": math.exp(2.6)},
           dict(ev[0], time=10.0, start_step=4), {"event": "resume", "time": 10.0, "step": 4, "changed": {"lr": 1e-4}}]
    ev += [train(s, 2.0 - 0.05 * s, 10.0 + s) for s in range(5, 9)]
    ev += [train(8, 1.55, 18.5)]  # step 8 logged twice: the last value counts
    ev += [{"event": "eval", "time": 18.6, "step": 8, "val_loss": 1.8, "val_ppl": math.exp(1.8)}]
    if ended:
        ev += [train(s, float("nan") if s == 10 else 1.5, 10.0 + s) for s in (9, 10)]
        ev += [{"event": "end", "time": 21.0, "step": 10, "reason": "nan", "message": "loss is nan at step 10"}]
    lines = [json.dumps(e) for e in ev]
    lines.insert(3, "{not json")
    text = "\n".join(lines) + "\n" + ("" if ended else '{"event": "train", "step": 9, "lo')
    (run / "metrics.jsonl").write_text(text)
    return ev


EXPECTED_LOSS = {**{s: 3.0 - 0.1 * s for s in range(1, 5)}, 5: 2.0 - 0.25, 6: 2.0 - 0.3, 7: 2.0 - 0.35, 8: 1.55}


def test_series_keep_the_last_value_per_step_and_drop_what_a_resume_redoes(tmp_path):
    write_run(tmp_path / "run")
    events, bad = read_events(tmp_path / "run" / "metrics.jsonl")
    assert bad == [4] and all(e.get("lo") is None for e in events)  # the corrupt line; the partial one unread
    s = series(events)
    assert s["loss"] == sorted(EXPECTED_LOSS.items())
    assert s["val_loss"] == [(3, 2.9), (8, 1.8)]  # step 6's eval was before the resume from step 4
    assert [st for st, _ in s["lr"]] == list(range(1, 9))
    sm = summary(events)
    assert (sm["status"], sm["step"], sm["resumes"], sm["best_val_loss"], sm["final_loss"]) == ("running", 8, 1, 1.8, 1.55)


def check_page(page: Page, run: Path, events: list[dict], loss: dict):
    expected = series(events)
    drawn = {s["data-series"]: s for s in page.series}
    assert drawn["loss"]["data-steps"].split() == [str(st) for st in loss]  # against the values written above
    assert drawn["loss"]["data-values"].split() == [repr(v) for v in loss.values()]
    assert set(drawn) == {"loss", "val_loss", "lr", "tokens_per_sec", "peak_memory", "active_memory", "grad_norm"}
    for name, g in drawn.items():
        steps = [int(x) for x in g["data-steps"].split()]
        values = [float(x) for x in g["data-values"].split()]
        assert repr(list(zip(steps, values))) == repr(expected[name]), name  # exact: repr() of each float (nan too)
        finite = sum(math.isfinite(v) for v in values)
        assert (g["dots"] if name == "val_loss" else g["points"]) == finite, name
    assert drawn["loss"]["chart"] == drawn["val_loss"]["chart"] == "Loss" and drawn["peak_memory"]["chart"] == "Memory"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = page.tables["config"][1:]
    assert [k for k, _ in rows] == list(cfg) and all(yaml.safe_load(v) == cfg[k] for k, v in rows)
    stats = dict(page.tables["stats"][1:])
    assert stats["packing"] == "swa" and json.loads(stats["context"]) == {"rows_split": 3, "longest_document": 1900}
    assert stats["row tokens per optimizer step (per process)"] == "4.1K"  # 512 x 4 x 2
    assert [r[1] for r in page.tables["resumes"][1:]] == ['{"lr": 0.0001}']
    for tag, a in page.tags:  # nothing to fetch, nothing to run
        assert tag not in ("script", "link", "img", "iframe") and not {"src", "href"} & set(a)


def test_report_of_a_resumed_run_still_training(tmp_path):
    run = tmp_path / "run"
    events = write_run(run)
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"out": str(run / "report.html"), "status": "running", "step": 8,
                                      "events": len(events), "bad_lines": [4]}
    text = (run / "report.html").read_text()
    assert "@import" not in text and "url(" not in text
    page = parse(text)
    check_page(page, run, read_events(run / "metrics.jsonl")[0], EXPECTED_LOSS)
    assert "had not ended" in text and "lines 4 are not JSON" in text
    assert sum(1 for t, a in page.tags if t == "line" and a.get("class") == "resume") == 5  # one per chart


def test_report_of_an_ended_run_with_a_nan_stop_and_out(tmp_path):
    run = tmp_path / "run"
    events = write_run(run, ended=True)
    (tmp_path / "r.html").write_text("old")
    res = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "run"]  # replaced; no temp file left
    text = (tmp_path / "r.html").read_text()
    page = parse(text)
    check_page(page, run, events, {**EXPECTED_LOSS, 9: 1.5, 10: float("nan")})
    loss = next(s for s in page.series if s["data-series"] == "loss")
    assert loss["data-values"].split()[-1] == "nan" and loss["points"] == 9
    assert "1 non-finite value(s), not drawn" in text and "loss is nan at step 10" in text
    final = dict(page.tables["final"][1:])
    assert final["status"] == "nan" and final["steps"] == "10 / 10" and final["best validation loss"] == "1.8 (step 8)"


def test_report_errors(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "metrics.jsonl not found" in res.output
