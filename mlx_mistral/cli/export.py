"""`mlx-mistral export ...` and `mlx-mistral convert ...`: thin commands over `mlx_mistral.export`."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _progress(description: str):
    from ..ui.progress import steps_bar

    return steps_bar(description)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _report(result: dict):
    for w in result.pop("warnings", []) or []:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    click.echo(json.dumps(result, indent=2))


_MODEL = click.option("--model", "model_path", required=True, help="Base model directory or Hugging Face repo id.")


@click.group("export")
def export_group():
    """Export a model or adapter to Hugging Face, PEFT, mlx-lm or GGUF (llama.cpp / Ollama)."""


@export_group.command("hf")
@_MODEL
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Run directory whose adapters are fused in.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; a quantized base is dequantized to its scales' dtype).")
@click.option("--tokenizer-backend", type=click.Choice(["llama", "mistral-common"]), default="llama", show_default=True,
              help="SentencePiece tokenizer_config.json: transformers' LlamaTokenizer (portable) or "
                   "MistralCommonBackend (ids exactly as mistral-common, needs mistral-common to load).")
@click.option("--max-shard-size", default=5.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Largest safetensors shard in GB.")
def export_hf_cmd(model_path, adapter, out, dtype, tokenizer_backend, max_shard_size):
    """Fused (base + adapters, dequantized) safetensors that transformers loads."""
    from ..export.hf import export_hf

    with _progress("writing shards") as p:
        r = _run(export_hf, model_path, out, adapter=adapter, dtype=dtype, tokenizer_backend=tokenizer_backend,
                 max_shard_bytes=int(max_shard_size * 1e9), progress=p)
    _report(r)


@export_group.command("peft")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--base-model", default=None, help="base_model_name_or_path to record (default: the run's base model).")
def export_peft_cmd(adapter, out, base_model):
    """Adapters as a PEFT LoRA directory (per-module ranks in rank_pattern / alpha_pattern)."""
    from ..export.adapters import export_peft

    _report(_run(export_peft, adapter, out, base_model=base_model))


@export_group.command("mlx-lm")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--model", "model_path", default=None,
              help="Base model (directory or repo id): checks the fingerprint and gives the layer count, needed "
                   "when the adapter does not start at layer 0 and its config does not place it. Default: the "
                   "run's base model when it is a local directory.")
def export_mlx_lm_cmd(adapter, out, model_path):
    """Adapters in mlx-lm's format: `mlx_lm.generate --model BASE --adapter-path OUT`.

    mlx-lm has one rank and one scale for all modules: per-module ranks (rank_policy gqa, rank_pattern) are
    zero-padded to the largest rank and other scales folded into lora_b, which leaves the function
    unchanged; `convert mlx-lm-to-mlx` restores the ranks.
    """
    from ..core.adapters import read_adapter_config
    from ..export.adapters import export_mlx_lm

    recorded = _run(read_adapter_config, adapter).get("base_model")
    args = _base_args(model_path, recorded) if model_path or (recorded and Path(recorded).is_dir()) else None
    _report(_run(export_mlx_lm, adapter, out, args))


@export_group.command("gguf")
@_MODEL
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Run directory whose adapters are fused in.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output FILE.gguf (a Modelfile is written beside it).")
@click.option("--dtype", required=True, type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                                           "q4_k_m", "q5_k_m", "q6_k"], case_sensitive=False),
              help="Tensor type. K-quants need llama-cpp-python; their rows must be a multiple of 256, "
                   "others fall back (q4_k_m->Q5_0, q5_k_m->Q5_1, q6_k->Q8_0).")
@click.option("--no-modelfile", is_flag=True, help="Do not write an Ollama Modelfile beside the GGUF.")
def export_gguf_cmd(model_path, adapter, out, dtype, no_modelfile):
    """One GGUF for llama.cpp / Ollama (architecture llama)."""
    from ..export.gguf_model import export_gguf

    with _progress(f"writing {dtype.upper()} GGUF") as p:
        r = _run(export_gguf, model_path, out, adapter=adapter, dtype=dtype, modelfile=not no_modelfile, progress=p)
    _report(r)


@export_group.command("gguf-lora")
@_MODEL
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output FILE.gguf.")
def export_gguf_lora_cmd(model_path, adapter, out):
    """Adapter-only GGUF, applied with `llama-cli -m base.gguf --lora FILE.gguf`."""
    from ..export.gguf_adapter import export_gguf_lora

    _report(_run(export_gguf_lora, model_path, adapter, out))


@click.group("convert")
def convert_group():
    """Bring models and adapters from other tools into mlx-mistral's formats."""


@convert_group.command("hf-to-mlx")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--quantize", "bits", type=click.Choice(["4", "8"]), default=None, help="Quantize to 4 or 8 bits.")
@click.option("--group-size", default=64, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Quantization group size.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights first (default: as stored).")
def hf_to_mlx_cmd(src, dst, bits, group_size, dtype):
    """A Hugging Face model (directory or repo id) to an MLX directory that mlx-lm also loads."""
    from ..export.hf import hf_to_mlx

    with _progress("writing shards") as p:
        r = _run(hf_to_mlx, src, dst, bits=int(bits) if bits else None, group_size=int(group_size), dtype=dtype,
                 progress=p)
    _report(r)


def _base_args(model_path, recorded: str | None):
    from ..core.config import ModelArgs
    from ..core.hub import resolve_path

    if model_path:
        return _run(lambda: ModelArgs.from_dir(resolve_path(model_path)))
    if recorded and Path(recorded).is_dir():
        return _run(ModelArgs.from_dir, recorded)
    click.secho("warning: no --model given and the adapter's base model is not a local directory: shapes are not "
                "checked against a model and the run has no base fingerprint", fg="yellow", err=True)
    return None


@convert_group.command("peft-to-mlx")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None,
              help="Base model (directory or repo id) to check shapes against; default: the adapter's base if local.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in RUN_DIR (its run files are removed).")
def peft_to_mlx_cmd(src, run_dir, model_path, overwrite):
    """A PEFT LoRA adapter (TRL, Unsloth, ...) to a run directory, to continue training or export."""
    from ..export.adapters import import_peft

    from ..core.io import read_json

    try:
        recorded = read_json(Path(src) / "adapter_config.json").get("base_model_name_or_path") \
            if (Path(src) / "adapter_config.json").exists() else None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    cfg = _run(import_peft, src, run_dir, _base_args(model_path, recorded), overwrite)
    _report({"run_dir": run_dir, "modules": len(cfg["modules"]), "rank_policy": cfg["rank_policy"]})


@convert_group.command("mlx-lm-to-mlx")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None, help="Base model to check shapes against.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in RUN_DIR (its run files are removed).")
def mlx_lm_to_mlx_cmd(src, run_dir, model_path, overwrite):
    """An mlx-lm LoRA adapter directory to a run directory."""
    from ..export.adapters import import_mlx_lm

    cfg = _run(import_mlx_lm, src, run_dir, _base_args(model_path, None), overwrite)
    _report({"run_dir": run_dir, "modules": len(cfg["modules"]), "rank_policy": cfg["rank_policy"]})

