"""Rows of 32,768 tokens under the normal CLI on CPU: a tiny model trains on synthetic long documents
(bench/make_long_docs.py) with blockwise attention and the live dashboard in a real pseudo-terminal, and
the run's context utilisation (the start event, the dashboard, the summary) is what packing those
documents gives, worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from ui.test_dashboard import run_in_pty  # tests/ui/ (tests/ is on sys.path: conftest.py)

from mlx_mistral.core.tiny import PRESET_TOKENIZERS

ROOT = Path(__file__).resolve().parents[2]
SEQ = 32768
# Packed at 32,768 (best-fit-decreasing): [32,768] (the first chunk of the 40,960-token document),
# [18,000 + 9,000 + 3,000 + 2,500 = 32,500] and [8,192] (its second chunk): 3 rows, 73,460 tokens.
LENGTHS = [40960, 18000, 9000, 3000, 2500]
CONTEXT = {"context_utilisation": 73460 / (3 * SEQ), "context_tokens_per_row": 73460 / 3, "longest_doc": 40960,
           "longest_whole_doc": 18000, "split_docs": 1, "split_token_fraction": 40960 / 73460}

pytestmark = pytest.mark.slow


def make_long_docs():
    spec = importlib.util.spec_from_file_location("make_long_docs", ROOT / "bench" / "make_long_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_tiny_model_trains_rows_of_32k_tokens_with_the_dashboard(backend, tmp_path, monkeypatch):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))
    # tiny:demo-tags: the demo shape (window 64) with a 4096-piece vocabulary, so a row's logits are
    # 0.5 GB in fp32 where the 32,000-piece one of tiny:demo would take 4.2 GB.
    make_long_docs().write_long_docs(tmp_path / "data", PRESET_TOKENIZERS["demo-tags"], LENGTHS)
    run = tmp_path / "run"
    # blocks of 256 queries: 128 per row and layer (blocks of 64 take MLX minutes to compile on CPU)
    cli = [sys.executable, "-m", "mlx_mistral.cli", "train", "--attention", "blockwise", "--attention-block", "256",
           "--model", "tiny:demo-tags",
           "--backend", backend, "--data", str(tmp_path / "data"), "--out", str(run), "--seq-len", str(SEQ),
           "--steps", "2", "--batch-size", "1", "--lora-rank", "4", "--warmup-steps", "0", "--eval-every", "0"]
    rc, out = run_in_pty(cli, timeout=900)  # a guard against a hang, not a speed check (~2-4 min alone)
    assert rc == 0, out[-3000:]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start, end = events[0], events[-1]
    assert start["event"] == "start" and start["seq_len"] == SEQ and start["attention"] == "blockwise"
    for k, v in CONTEXT.items():
        assert start[k] == pytest.approx(v), (k, start[k], v)
    assert end["event"] == "end" and end["reason"] == "done" and end["step"] == 2
    # Two rows of up to 32,768 tokens: the dense path would hold 4 heads x 32,768^2 fp32 scores (17 GB)
    # per layer; blockwise attention keeps the whole step far below that.
    assert end["peak_memory"] < 6e9, end["peak_memory"]
    # The live dashboard and the summary (folded at 100 columns) show the context line.
    assert "step 2/2" in out and "Run summary" in out
    assert "24,487/32,768 tok/row (74.7%)" in out and "18,000 tok · 1 split" in out
    assert "24,487 of 32,768 tokens per row used (74.7%)" in out
