"""The demo (what `mlx-mistral demo` and `make demo` run): the main job end to end on the embedded default,
in about four minutes on 2 CPU cores, with a fine-tune whose effect is checked automatically.

1. build a tiny random Mistral (1.8M parameters, a 4096-piece cut of Mistral's v1 tokenizer) and pre-train
   it on plain Q/A about the Python standard library (configs/tiny-pretrain.yaml, `data/demo_tags/pretrain`);
2. before: its greedy answers to held-out questions (about functions in no training data) and its test loss;
3. fine-tune it with GQA-matched LoRA on SWA-aware packed rows under the live dashboard
   (configs/tiny-demo.yaml, `data/demo_tags/tagged`) towards a behaviour that depends on the prompt: every
   answer starts with the module the question asks about, "[json] ...";
4. after: the same questions, checked by `demo_check` (tag format; right module), plus questions about
   modules in no training data (the honest limit: it tags only with modules it has seen);
5. export: fused HF safetensors, a PEFT adapter, a Q8_0 GGUF with its Ollama Modelfile, and an
   adapter-only GGUF for llama.cpp's `--lora`.
The library prints nothing: `run_demo` reports through `report(kind, payload)`: kind "step", "info" or
"note" with a line of text, or "compare" with the before/after dict of `compare` (ui/demo_view.py renders
it); it returns what it made.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from .. import backends
from ..core.data import DEMO_TAGS
from ..core.io import write_json
from .demo_check import check, rates
from .finetune import finetune, split_loss

REPO = Path(__file__).resolve().parents[2]
PRETRAIN, TAGGED = DEMO_TAGS / "pretrain", DEMO_TAGS / "tagged"
MAX_TOKENS = 12  # greedy tokens per answer: the tag and the start of the answer


def _config(name: str, out: Path, data: Path, **overrides):
    from ..core.train_config import load_config

    path = REPO / "configs" / name
    if not path.exists():
        raise ValueError(f"{path} not found: run the demo from a checkout of mlx-mistral")
    return load_config(path, dict(overrides, data=str(data), out=str(out)))


def _questions(path: Path) -> list[str]:
    """The first user turn of each record of a bundled chat JSONL file."""
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _answers(model, tok, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Greedy answers (up to EOS or `max_tokens`) of a loaded model to each prompt as a user turn."""
    from ..core.chat import encode_prompt

    out = []
    for p in prompts:
        ids = backends.generate(model, encode_prompt(tok, [{"role": "user", "content": p}]), max_tokens,
                                temp=0.0, stop_ids={tok.eos_id})
        out.append(tok.decode([t for t in ids if t != tok.eos_id]).strip())
    return out


def _evaluate(base: Path, adapter: Path | None, seq_len: int, unseen: bool = False) -> dict:
    """{"loss", "loss_tokens", "answers", "rates", "checks" ([format, right module] per answer)} of the base
    (+ adapter) on the tagged test split, and
    "unseen" rates (questions about modules in no training data) when asked."""
    model, tok = backends.load(base)
    if adapter is not None:
        backends.load_adapters(model, adapter)
    loss, n = split_loss(model, tok, str(TAGGED), "test", seq_len)
    prompts = _questions(TAGGED / "test.jsonl")
    answers = _answers(model, tok, prompts)
    res = {"loss": loss, "loss_tokens": n, "answers": answers, "rates": rates(zip(prompts, answers)),
           "checks": [list(check(p, a)) for p, a in zip(prompts, answers)]}
    if unseen:
        up = _questions(TAGGED / "unseen.jsonl")
        res["unseen"] = rates(zip(up, _answers(model, tok, up)))
    return res


class _Clock:
    """Wall and process CPU seconds per stage (CPU time: what a loaded machine inflates least)."""

    def __init__(self):
        self.stages, self._t = {}, (time.perf_counter(), time.process_time())

    def lap(self, name: str):
        t = (time.perf_counter(), time.process_time())
        self.stages[name] = {"wall_s": round(t[0] - self._t[0], 1), "cpu_s": round(t[1] - self._t[1], 1)}
        self._t = t


def _trained(end: dict):
    if end["reason"] != "done":
        raise ValueError(end["message"])


#: The file that marks a folder as the demo's own, and what the demo writes into it.
MARKER = ".mlx-mistral-demo"
RESULTS = "results.json"
MADE = ("pretrain", "lora", "export", RESULTS)


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
    (out / MARKER).write_text("made by `mlx-mistral demo`; a later demo run replaces pretrain/, lora/, "
                              f"export/ and {RESULTS} here and nothing else\n")
    return removed


def run_demo(out: str | Path, display: str | None = "auto", skip_export: bool = False, seed: int = 0,
             report: Callable[[str, object], None] = lambda kind, payload: None) -> dict[str, Path]:
    """Run the demo into `out`; returns {what: path} of everything it made, results.json among them (the
    before/after answers and rates, and the wall and CPU seconds of each stage). An earlier demo's results
    in `out` are replaced; a folder holding anything else is refused (`prepare_out`). `seed`: the random
    base's weights and both runs' data order."""
    out = Path(out)
    clock = _Clock()
    removed = prepare_out(out)
    if removed:
        report("note", f"replacing the earlier demo's {', '.join(removed)} in {out}")

    pre = _config("tiny-pretrain.yaml", out / "pretrain", PRETRAIN, seed=seed)
    report("step", f"[1/5] building a tiny random Mistral (1.8M parameters, a 4096-piece cut of Mistral's v1 "
                   f"tokenizer) and pre-training it ({pre.steps} steps) on plain Q/A about the standard library")
    _trained(finetune(pre, display=display))
    base = out / "pretrain"  # full fine-tuning leaves a loadable model directory
    clock.lap("pretrain")

    ft = _config("tiny-demo.yaml", out / "lora", TAGGED, model=str(base), seed=seed)
    report("step", "[2/5] before the fine-tune: the base's greedy answers to held-out questions")
    before = _evaluate(base, None, ft.seq_len)
    clock.lap("before")

    report("step", f"[3/5] GQA-matched LoRA fine-tune ({ft.steps} steps, SWA-aware packed rows): every answer "
                   "should start with the module asked about, \"[json] ...\"")
    _trained(finetune(ft, display=display))
    run = out / "lora"
    clock.lap("finetune")

    report("step", "[4/5] after the fine-tune: the same questions")
    after = _evaluate(base, run, ft.seq_len, unseen=True)
    clock.lap("after")
    result = {"prompts": _questions(TAGGED / "test.jsonl"), "steps": ft.steps, "before": before, "after": after,
              "seconds": clock.stages}
    write_json(out / RESULTS, result)
    report("compare", result)

    made = {"pre-trained tiny base": base, "LoRA run (adapters, checkpoints, metrics.jsonl)": run,
            "before/after answers and rates": out / RESULTS}
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
    clock.lap("export")
    result["seconds"] = clock.stages
    write_json(out / RESULTS, result)
    return made
