"""The demo (what `mlx-mistral demo` and `make demo` run): the main job end to end on the embedded default,
in a few minutes on a laptop CPU.

1. build a tiny random Mistral (real v1 tokenizer from mistral-common) and pre-train it briefly
   (configs/tiny-pretrain.yaml), so the fine-tune has a base worth adapting;
2. fine-tune it with GQA-matched LoRA on SWA-aware packed rows of the bundled chat data
   (configs/tiny-demo.yaml) under the live dashboard;
3. evaluate the test split before and after the fine-tune;
4. generate an answer to a chat prompt;
5. export: fused HF safetensors, a PEFT adapter, a Q8_0 GGUF with its Ollama Modelfile, and an
   adapter-only GGUF for llama.cpp's `--lora`.
The library prints nothing: `run_demo` reports what it does through `report(kind, text)` (kind "step",
"info" or "note") and returns what it made.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable

from .. import backends
from ..core.data import DEMO as DATA
from .finetune import finetune, split_loss

REPO = Path(__file__).resolve().parents[2]
PROMPT = "What does the `textwrap` module do?"


def _config(name: str, out: Path, **overrides):
    from ..core.train_config import load_config

    path = REPO / "configs" / name
    if not path.exists():
        raise ValueError(f"{path} not found: run the demo from a checkout of mlx-mistral")
    return load_config(path, dict(overrides, data=str(DATA), out=str(out)))


def _test_loss(model_dir: Path, adapter: Path | None, seq_len: int) -> tuple[float, int]:
    model, tok = backends.load(model_dir)
    if adapter is not None:
        backends.load_adapters(model, adapter)
    return split_loss(model, tok, str(DATA), "test", seq_len)


def _answer(model_dir: Path, adapter: Path, max_tokens: int = 48) -> str:
    from ..core.chat import encode_prompt

    model, tok = backends.load(model_dir)
    backends.load_adapters(model, adapter)
    prompt = encode_prompt(tok, [{"role": "user", "content": PROMPT}])
    out = backends.generate(model, prompt, max_tokens, temp=0.7, top_p=0.95, seed=0, stop_ids={tok.eos_id})
    text = tok.decode([t for t in out if t != tok.eos_id])
    return text if text.strip() else "(the model ended its answer at once with EOS)"


def _trained(end: dict):
    if end["reason"] != "done":
        raise ValueError(end["message"])


#: The file that marks a folder as the demo's own, and what the demo writes into it.
MARKER = ".mlx-mistral-demo"
MADE = ("pretrain", "lora", "export")


def prepare_out(out: Path) -> list[str]:
    """Make `out` ready for a demo run: a new or empty folder is used; a folder an earlier demo made (its
    marker file) has the demo's own entries replaced; any other non-empty folder is refused, so the demo
    never deletes what it did not make. Returns the entries it removed."""
    from ..core.rundir import check_writable

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the demo needs a folder")
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if present and MARKER not in present and not set(present) <= set(MADE):  # (earlier demos left no marker)
        raise ValueError(f"--out {out} is not empty and was not made by the demo ({', '.join(present[:5])}"
                         f"{', ...' if len(present) > 5 else ''}); the demo never deletes files it did not make: "
                         "choose another --out, or an empty folder")
    check_writable(out)
    removed = [name for name in MADE if name in present]
    for name in removed:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / MARKER).write_text("made by `mlx-mistral demo`; a later demo run replaces pretrain/, lora/ and "
                              "export/ here and nothing else\n")
    return removed


def run_demo(out: str | Path, display: str | None = "auto", skip_export: bool = False,
             report: Callable[[str, str], None] = lambda kind, text: None) -> dict[str, Path]:
    """Run the demo into `out`; returns {what: path} of everything it made. An earlier demo's results in
    `out` are replaced; a folder holding anything else is refused (`prepare_out`)."""
    out = Path(out)
    removed = prepare_out(out)
    if removed:
        report("note", f"replacing the earlier demo's {', '.join(removed)} in {out}")

    report("step", "[1/5] building a tiny random Mistral (9M parameters, window 64) and pre-training it briefly")
    _trained(finetune(_config("tiny-pretrain.yaml", out / "pretrain"), display=display))
    base = out / "pretrain"  # full fine-tuning leaves a loadable model directory

    report("step", "[2/5] fine-tuning with GQA-matched LoRA on SWA-aware packed rows")
    ft = _config("tiny-demo.yaml", out / "lora", model=str(base))
    before, n_tok = _test_loss(base, None, ft.seq_len)
    _trained(finetune(ft, display=display))
    run = out / "lora"

    report("step", "[3/5] evaluating the test split")
    after, _ = _test_loss(base, run, ft.seq_len)
    report("info", f"  test loss {before:.3f} -> {after:.3f}  (ppl {math.exp(before):.1f} -> {math.exp(after):.1f}, "
                   f"{n_tok} loss tokens)")

    report("step", "[4/5] generating")
    report("info", f"  prompt: {PROMPT}")
    report("info", f"  answer (sampled, temp 0.7): {_answer(base, run)}")
    report("info", "  (a 9M-parameter model trained for a minute: this shows the pipeline working and the loss\n"
                   "   falling, not useful text. Use a real model for that: see the README's quick start.)")

    made = {"pre-trained tiny base": base, "LoRA run (adapters, checkpoints, metrics.jsonl)": run}
    if skip_export:
        report("step", "[5/5] export skipped (--skip-export)")
        return made
    from ..export.adapters import export_peft
    from ..export.gguf_adapter import export_gguf_lora
    from ..export.gguf_model import export_gguf
    from ..export.hf import export_hf

    report("step", "[5/5] exporting")
    made["HF safetensors (fused)"] = Path(export_hf(base, out / "export" / "hf", adapter=run)["out"])
    made["PEFT adapter"] = Path(export_peft(run, out / "export" / "peft", base_model=str(base))["out"])
    g = export_gguf(base, out / "export" / "tiny-demo-q8_0.gguf", adapter=run, dtype="q8_0")
    made["GGUF Q8_0 (fused)"] = Path(g["out"])
    made["Ollama Modelfile"] = Path(g["modelfile"])
    for w in g["warnings"]:
        report("note", f"  note: {w}")
    made["GGUF LoRA adapter"] = Path(export_gguf_lora(base, run, out / "export" / "tiny-demo-lora.gguf")["out"])
    return made
