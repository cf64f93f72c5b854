"""The main job (`mlx-mistral demo`, what `make demo` runs) end to end in a real pseudo-terminal:
the live dashboard of the real training CLI appears, the loss falls, every export is written."""

import json
import sys
from pathlib import Path

import pytest
from ui.test_dashboard import braille_cells, run_in_pty  # tests/ui/ (tests/ is on sys.path: conftest.py)


@pytest.mark.slow
def test_demo_in_a_pty_shows_the_live_panel_and_exports(tmp_path):
    out = tmp_path / "demo"
    rc, text = run_in_pty([sys.executable, "-m", "mlx_mistral.cli", "demo", "--out", str(out)],
                          timeout=900, cols=110, rows=45)
    assert rc == 0, text[-3000:]
    assert "\x1b[" in text and len(braille_cells(text)) > 40  # the live panel with its loss chart
    assert "step 40/40" in text and "Run summary" in text and "demo finished" in text
    for f in ("export/hf/config.json", "export/hf/model.safetensors.index.json",
              "export/peft/adapter_model.safetensors", "export/tiny-demo-q8_0.gguf", "export/Modelfile",
              "export/tiny-demo-lora.gguf", "lora/adapters.safetensors", "pretrain/model.safetensors"):
        assert (out / f).exists(), f
    events = [json.loads(line) for line in (out / "lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert evals[-1] < evals[0]  # the fine-tune lowers the validation loss
    pre = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in pre if e["event"] == "end"][0]["final_loss"] < 8.0  # from ~10.4 (uniform over 32k)
    assert Path(out / "lora" / "adapter_config.json").exists()
