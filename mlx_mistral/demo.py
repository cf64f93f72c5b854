"""`mlx-mistral demo`: the main job end to end on the embedded default, in a few minutes on a laptop CPU.

1. build a tiny random Mistral (real v1 tokenizer from mistral-common) and pre-train it briefly
   (configs/tiny-pretrain.yaml), so the fine-tune has a base worth adapting;
2. fine-tune it with GQA-matched LoRA on SWA-aware packed rows of the bundled chat data
   (configs/tiny-demo.yaml) under the live dashboard;
3. evaluate the test split before and after the fine-tune;
4. generate an answer to a chat prompt;
5. export: fused HF safetensors, a PEFT adapter, a Q8_0 GGUF with its Ollama Modelfile, and an
   adapter-only GGUF for llama.cpp's `--lora`.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import click

import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx.core)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "demo"
PROMPT = "What does the `textwrap` module do?"


def _config(name: str, out: Path, **overrides):
    from .trainer import load_config

    path = REPO / "configs" / name
    if not path.exists():
        raise click.ClickException(f"{path} not found: run the demo from a checkout of mlx-mistral")
    return load_config(path, dict(overrides, data=str(DATA), out=str(out)))


def _test_loss(model_dir: Path, adapter: Path | None, seq_len: int) -> tuple[float, int]:
    from .loader import load
    from .lora import load_adapters
    from .trainer import TrainConfig, dataset_loss
    from .trainer_cli import load_rows

    model, tok = load(model_dir)
    if adapter is not None:
        load_adapters(model, adapter)
    rows, _ = load_rows(str(DATA), tok, TrainConfig(seq_len=seq_len, packing="swa"), "test")
    return dataset_loss(model, rows)


def _answer(model_dir: Path, adapter: Path, max_tokens: int = 48) -> str:
    from .chat import encode_prompt
    from .generate import generate
    from .loader import load
    from .lora import load_adapters

    model, tok = load(model_dir)
    load_adapters(model, adapter)
    prompt = encode_prompt(tok, [{"role": "user", "content": PROMPT}])
    out = generate(model, prompt, max_tokens, temp=0.7, top_p=0.95, seed=0, stop_ids={tok.eos_id})
    text = tok.decode([t for t in out if t != tok.eos_id])
    return text if text.strip() else "(the model ended its answer at once with EOS)"


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for everything the demo makes (replaced if it exists).")
@click.option("--no-dashboard", is_flag=True, help="Plain log lines instead of the live dashboard.")
@click.option("--skip-export", is_flag=True, help="Stop after generation.")
def demo(out, no_dashboard, skip_export):
    """Run the main job on the embedded default: tiny Mistral + bundled chat data -> pre-train briefly ->
    GQA-matched LoRA fine-tune (live dashboard) -> evaluate -> generate -> export HF, PEFT and GGUF."""
    from .trainer_cli import run_training

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    say = lambda msg: click.secho(msg, fg="cyan", bold=True)  # noqa: E731

    say("[1/5] building a tiny random Mistral (9M parameters, window 64) and pre-training it briefly")
    pre = _config("tiny-pretrain.yaml", out / "pretrain")
    end = run_training(pre, no_dashboard=no_dashboard)
    if end["reason"] != "done":
        raise click.ClickException(end["message"])
    base = out / "pretrain"  # full fine-tuning leaves a loadable model directory

    say("[2/5] fine-tuning with GQA-matched LoRA on SWA-aware packed rows")
    ft = _config("tiny-demo.yaml", out / "lora", model=str(base))
    before, n_tok = _test_loss(base, None, ft.seq_len)
    end = run_training(ft, no_dashboard=no_dashboard)
    if end["reason"] != "done":
        raise click.ClickException(end["message"])
    run = out / "lora"

    say("[3/5] evaluating the test split")
    after, _ = _test_loss(base, run, ft.seq_len)
    click.echo(f"  test loss {before:.3f} -> {after:.3f}  (ppl {math.exp(before):.1f} -> {math.exp(after):.1f}, "
               f"{n_tok} loss tokens)")

    say("[4/5] generating")
    click.echo(f"  prompt: {PROMPT}")
    click.echo(f"  answer (sampled, temp 0.7): {_answer(base, run)}")
    click.echo("  (a 9M-parameter model trained for a minute: this shows the pipeline working and the loss\n"
               "   falling, not useful text. Use a real model for that: see the README's quick start.)")

    made = {"pre-trained tiny base": base, "LoRA run (adapters, checkpoints, metrics.jsonl)": run}
    if skip_export:
        say("[5/5] export skipped (--skip-export)")
    else:
        from .export.adapters import export_peft
        from .export.gguf_adapter import export_gguf_lora
        from .export.gguf_model import export_gguf
        from .export.hf import export_hf

        say("[5/5] exporting")
        made["HF safetensors (fused)"] = Path(export_hf(base, out / "export" / "hf", adapter=run)["out"])
        made["PEFT adapter"] = Path(export_peft(run, out / "export" / "peft", base_model=str(base))["out"])
        g = export_gguf(base, out / "export" / "tiny-demo-q8_0.gguf", adapter=run, dtype="q8_0")
        made["GGUF Q8_0 (fused)"] = Path(g["out"])
        made["Ollama Modelfile"] = Path(g["modelfile"])
        for w in g["warnings"]:
            click.secho(f"  note: {w}", fg="yellow")
        made["GGUF LoRA adapter"] = Path(export_gguf_lora(base, run, out / "export" / "tiny-demo-lora.gguf")["out"])
    click.echo()
    click.secho(f"demo finished in {time.time() - t0:.0f} s; it made:", bold=True)
    for what, path in made.items():
        click.echo(f"  {what:48s} {path}")
    click.echo("next: mlx-mistral dashboard " + str(run) + "    (replay the run's panel)")


commands = [demo]
