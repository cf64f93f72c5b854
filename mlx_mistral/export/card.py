"""The model card (README.md) that `mlx-mistral upload` puts beside what it uploads.

YAML front matter through huggingface_hub's `ModelCardData` (base_model, library_name, tags, license,
datasets), then: what the repo holds, the exact commands that run it in transformers (+ PEFT),
mlx-lm, llama.cpp, Ollama and mlx-mistral for that kind of upload, the base model, data, the final metrics
of the run's metrics.jsonl and its config.yaml. Pure text from plain dicts: recipes/upload.py gathers them.

Kinds: "adapters" (a run directory with LoRA adapters: PEFT files at the root, mlx-lm's under `mlx-lm/`,
the run's own under `mlx-mistral/`), "model" (safetensors directory transformers and mlx-lm load),
"mlx-model" (MLX's layout: quantized, or Mixtral experts stacked; mlx-lm and mlx-mistral only), "gguf" (a model GGUF, with its
Modelfile when there is one) and "gguf-lora" (an adapter-only GGUF).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from ..core.hub import is_repo_id

KINDS = ("adapters", "model", "mlx-model", "gguf", "gguf-lora")
# Licenses of the base models this project targets (their Hub cards); any other is only what --license says.
KNOWN_LICENSES = {name.lower(): "apache-2.0" for name in (
    "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.2",
    "mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mixtral-8x7B-v0.1",
    "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mistral-Nemo-Base-2407",
    "mistralai/Mistral-Nemo-Instruct-2407")}
PROMPT = "Explain what a sliding-window attention is."


def hub_id(name) -> str | None:
    """`name` when it reads as a Hub repo id (owner/name) and not a local path, else None."""
    return name if isinstance(name, str) and is_repo_id(name) and not Path(name).exists() else None


def datasets_of(config: dict) -> list[str]:
    """The Hub dataset ids a run trained on: `data`, or the entries of a `datasets:` list (strings, or dicts
    with a path / name / id), those that read as repo ids."""
    found = [config.get("data")]
    for d in config.get("datasets") or []:
        found.append(d if isinstance(d, str) else next((d.get(k) for k in ("path", "name", "id") if
                                                        isinstance(d, dict) and d.get(k)), None))
    return [d for d in dict.fromkeys(found) if hub_id(d)]


def _q(s: str) -> str:
    return shlex.quote(str(s))


def _fmt(x, spec: str = ".4f") -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n} B"


def _download(repo: str, revision: str | None, local: str, include: str | None = None) -> str:
    rev = f" --revision {_q(revision)}" if revision else ""
    inc = f" --include {_q(include)}" if include else ""
    return f"hf download {_q(repo)}{rev}{inc} --local-dir {_q(local)}"


def _py_rev(revision: str | None) -> str:
    return f", revision={revision!r}" if revision else ""


def _usage(kind: str, repo: str, revision: str | None, base: str | None, gguf_file: str | None,
           modelfile: bool, window: int | None = None) -> list[str]:
    """Markdown sections with the commands for this kind of upload."""
    lines = _commands(kind, repo, revision, base, gguf_file, modelfile)
    if window and "### llama.cpp" in lines:
        lines.insert(lines.index("### llama.cpp") + 1,
                     f"llama.cpp and Ollama do not apply this model's {window}-token sliding window: keep prompt and "
                     f"answer within {window} tokens (`--ctx-size {window}`, Ollama `PARAMETER num_ctx {window}`) "
                     "to get the model's outputs.")
    return lines


def _commands(kind: str, repo: str, revision: str | None, base: str | None, gguf_file: str | None,
              modelfile: bool) -> list[str]:
    local = repo.split("/")[-1]
    base_s = base or "BASE_MODEL"
    p = _q(PROMPT)
    out = []
    if kind == "adapters":
        out += ["### transformers + PEFT", "```python",
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"base = AutoModelForCausalLM.from_pretrained({base_s!r}, dtype=\"auto\")",
                f"model = PeftModel.from_pretrained(base, {repo!r}{_py_rev(revision)})",
                f"tokenizer = AutoTokenizer.from_pretrained({base_s!r})", "```",
                "### mlx-lm", "```sh", _download(repo, revision, local, "mlx-lm/*"),
                f"mlx_lm.generate --model {_q(base_s)} --adapter-path {_q(local + '/mlx-lm')} --prompt {p}", "```",
                "### mlx-mistral", "```sh", _download(repo, revision, local, "mlx-mistral/*"),
                f"mlx-mistral generate --model {_q(base_s)} --adapter {_q(local + '/mlx-mistral')} --prompt {p}",
                "```",
                "### llama.cpp", "A GGUF of the base with these adapters fused in, or the adapters alone:",
                "```sh", _download(repo, revision, local, "mlx-mistral/*"),
                f"mlx-mistral export gguf --model {_q(base_s)} --adapter {_q(local + '/mlx-mistral')} "
                "--out model.gguf --dtype q8_0",
                f"llama-cli -m model.gguf -p {p}",
                f"mlx-mistral export gguf-lora --model {_q(base_s)} --adapter {_q(local + '/mlx-mistral')} "
                "--out adapter.gguf",
                f"llama-cli -m BASE.gguf --lora adapter.gguf -p {p}", "```",
                "### Ollama", "`export gguf` writes a Modelfile beside model.gguf (the chat format of training):",
                "```sh", f"ollama create {_q(local.lower())} -f Modelfile", f"ollama run {_q(local.lower())}", "```"]
    elif kind in ("model", "mlx-model"):
        if kind == "model":
            out += ["### transformers", "```python",
                    "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                    f"model = AutoModelForCausalLM.from_pretrained({repo!r}{_py_rev(revision)}, dtype=\"auto\")",
                    f"tokenizer = AutoTokenizer.from_pretrained({repo!r}{_py_rev(revision)})", "```"]
        else:
            out += ["### transformers", "These weights are in MLX's layout (quantized, or Mixtral experts stacked): "
                    "transformers does not load them; upload an `mlx-mistral export hf` directory for transformers."]
        gen = (f"mlx_lm.generate --model {_q(repo)} --prompt {p}" if not revision else
               f"{_download(repo, revision, local)}\nmlx_lm.generate --model {_q(local)} --prompt {p}")
        out += ["### mlx-lm", "```sh", gen, "```",
                "### mlx-mistral", "```sh", f"mlx-mistral generate --model {_q(repo if not revision else local)} "
                f"--prompt {p}", "```",
                "### llama.cpp", "```sh", _download(repo, revision, local),
                f"mlx-mistral export gguf --model {_q(local)} --out model.gguf --dtype q8_0",
                f"llama-cli -m model.gguf -p {p}", "```",
                "### Ollama", "`export gguf` writes a Modelfile beside model.gguf:", "```sh",
                f"ollama create {_q(local.lower())} -f Modelfile", f"ollama run {_q(local.lower())}", "```"]
    elif kind == "gguf":
        out += ["### llama.cpp", "```sh",
                f"llama-cli --hf-repo {_q(repo)} --hf-file {_q(gguf_file)} -p {p}" if not revision else
                f"{_download(repo, revision, local)}\nllama-cli -m {_q(local + '/' + gguf_file)} -p {p}", "```",
                "### Ollama", "```sh", _download(repo, revision, local), f"cd {_q(local)}"]
        if modelfile:
            out += [f"ollama create {_q(local.lower())} -f Modelfile"]
        else:
            out += [f"printf 'FROM ./%s\\n' {_q(gguf_file)} > Modelfile",
                    f"ollama create {_q(local.lower())} -f Modelfile"]
        out += [f"ollama run {_q(local.lower())}", "```"]
        if modelfile:
            out += ["The Modelfile holds the chat template and stop words of the format the model was trained on."]
        out += ["### transformers", "transformers dequantizes a GGUF to full precision on load (needs `gguf`):",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model = AutoModelForCausalLM.from_pretrained({repo!r}, gguf_file={gguf_file!r}{_py_rev(revision)})",
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r}, gguf_file={gguf_file!r}{_py_rev(revision)})",
                "```",
                "### mlx-lm", "mlx-lm does not read GGUF files: use an `mlx-mistral export hf` upload with mlx-lm."]
    elif kind == "gguf-lora":
        out += ["### llama.cpp", f"A LoRA adapter GGUF: apply it to a GGUF of the base model ({base_s}).", "```sh",
                _download(repo, revision, local),
                f"llama-cli -m BASE.gguf --lora {_q(local + '/' + gguf_file)} -p {p}", "```",
                "### Ollama", "```sh", _download(repo, revision, local),
                f"printf 'FROM BASE.gguf\\nADAPTER ./%s\\n' {_q(local + '/' + gguf_file)} > Modelfile",
                f"ollama create {_q(local.lower())} -f Modelfile", f"ollama run {_q(local.lower())}", "```",
                "### transformers / mlx-lm", "An adapter GGUF is for llama.cpp and Ollama; upload the run directory "
                "for PEFT and mlx-lm adapters."]
    return out


def _metrics_table(summary: dict) -> list[str]:
    s = summary
    rows = [("status", s.get("status")), ("steps", f"{s.get('step', 0)} / {s.get('total_steps', '?')}"),
            ("final train loss", _fmt(s.get("final_loss"))),
            ("best validation loss", f"{_fmt(s.get('best_val_loss'))} (step {s['best_val_step']})"
             if "best_val_loss" in s else "–"),
            ("final validation loss", _fmt(s.get("final_val_loss"))),
            ("validation perplexity", _fmt(math.exp(min(s["final_val_loss"], 700.0)), ".3f")
             if "final_val_loss" in s and math.isfinite(s["final_val_loss"]) else "–"),
            ("trained tokens", _fmt(s.get("tokens"), ",d") if isinstance(s.get("tokens"), int) else _fmt(s.get("tokens"), ",.0f")),
            ("training time", f"{s['elapsed'] / 60:.1f} min" if isinstance(s.get("elapsed"), (int, float)) else "–"),
            ("median throughput", f"{s['median_tokens_per_sec']:,.0f} tokens/s" if "median_tokens_per_sec" in s else "–"),
            ("peak memory", f"{s['peak_memory'] / 1e9:.2f} GB" if "peak_memory" in s else "–"),
            ("resumed", str(s.get("resumes", 0))),
            ("backend / device", f"{s['start'].get('backend', '?')} / {s['start'].get('device', '?')}"
             if s.get("start") else "–")]
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def model_card(kind: str, repo_id: str, *, files: dict[str, int], base_model: str | None = None,
               revision: str | None = None, run: dict | None = None, gguf: dict | None = None,
               license: str | None = None, notes: list[str] | tuple = (), sliding_window: int | None = None) -> str:
    """README.md text for `repo_id`. `files`: path in repo -> bytes. `run`: {"config": config.yaml dict,
    "summary": ui.metrics.summary(...), "adapter": adapter_config dict or None, "name": run dir name}.
    `gguf`: {"file": path in repo, "type": GGUF file type, "modelfile": bool}. `sliding_window`: the model's
    window when known (llama.cpp and Ollama ignore it: the card says so)."""
    from huggingface_hub import ModelCardData

    if kind not in KINDS:
        raise ValueError(f"model card kind must be one of {', '.join(KINDS)}, got {kind!r}")
    config = (run or {}).get("config") or {}
    base = base_model or (run or {}).get("base_model") or config.get("model")
    base_hub = hub_id(base)
    lic = license or (KNOWN_LICENSES.get(base_hub.lower()) if base_hub else None)
    datasets = datasets_of(config)
    library = {"adapters": "peft", "model": "transformers", "mlx-model": "mlx"}.get(kind)
    tags = ["mlx-mistral", "mistral", "text-generation"] + {
        "adapters": ["lora", "peft", "mlx", "mlx-lm"], "model": ["safetensors", "mlx"], "mlx-model": ["mlx"],
        "gguf": ["gguf", "llama.cpp", "ollama"], "gguf-lora": ["gguf", "llama.cpp", "lora"]}[kind]
    if kind == "adapters" and (run or {}).get("adapter", {}).get("rank_policy") == "gqa":
        tags.append("gqa-lora")
    data = ModelCardData(base_model=base_hub, library_name=library, tags=tags, license=lic,
                         datasets=datasets or None, pipeline_tag="text-generation")
    what = {"adapters": "LoRA adapters", "model": "A fine-tuned model (safetensors)",
            "mlx-model": "A fine-tuned model in MLX's layout", "gguf": f"A GGUF ({(gguf or {}).get('type', '?')})",
            "gguf-lora": "A LoRA adapter GGUF"}[kind]
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"{what} for [{base_hub}](https://huggingface.co/{base_hub}), trained with mlx-mistral."
             if base_hub else f"{what}, trained with mlx-mistral"
             + (f" from the local base model `{base}` (not a Hub id: give `--base-model` to name it)." if base else "."),
             ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Use it", ""] + _usage(kind, repo_id, revision, base_hub or (str(base) if base else None),
                                         (gguf or {}).get("file"), bool((gguf or {}).get("modelfile")),
                                         sliding_window) + [""]
    if run:
        s = run.get("summary") or {}
        data_desc = ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) or \
            (f"`{config['data']}` (local)" if config.get("data") else "–")
        lines += ["## Training", "",
                  f"- base model: {f'[{base_hub}](https://huggingface.co/{base_hub})' if base_hub else f'`{base}`'}",
                  f"- data: {data_desc}",
                  f"- fine-tuning: {config.get('fine_tune', '?')}"
                  + (f", rank {config.get('lora_rank')} (policy {config.get('rank_policy')}), alpha "
                     f"{config.get('lora_alpha')}, targets {config.get('targets')}"
                     if config.get("fine_tune", "lora") == "lora" else "")
                  + (f", base quantized to {config['quantize']} bits (QLoRA)" if config.get("quantize") else ""),
                  f"- rows of {config.get('seq_len', '?')} tokens, packing {config.get('packing', '?')}, batch "
                  f"{config.get('batch_size', '?')} x {config.get('grad_accum', 1)} accumulation, lr {config.get('lr', '?')}",
                  "", "### Final metrics (metrics.jsonl)", ""] + _metrics_table(s) + [""]
        if run.get("config"):
            lines += ["### config.yaml", "", "```yaml", run.get("config_text", "").rstrip() or
                      json.dumps(config, indent=2), "```", ""]
    lines += ["## Files", "", "| file | size |", "|---|---|"]
    lines += [f"| `{name}` | {_size(size)} |" for name, size in sorted(files.items())]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
