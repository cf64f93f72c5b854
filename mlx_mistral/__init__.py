"""mlx-mistral: fine-tune Mistral-family models with MLX (or torch), exactly, and export them.

The library API, the same as the CLI (`mlx-mistral --help`):

    import mlx_mistral

    end = mlx_mistral.finetune("configs/tiny-demo.yaml")      # what `mlx-mistral train` runs
    model, tok = mlx_mistral.load("runs/tiny-pretrain")        # backend="mlx" | "torch" | "auto"
    mlx_mistral.load_adapters(model, end["run_dir"])
    ids = mlx_mistral.generate(model, tok.encode("Hello"), max_tokens=20)
    mlx_mistral.export_gguf("runs/tiny-pretrain", "model.gguf", adapter=end["run_dir"], dtype="q8_0")

- `finetune(config, resume=False, display=None, callbacks=())`: config a `TrainConfig`, dict or YAML path;
  returns the final "end" event; raises ValueError.
- `load(path_or_repo, backend="mlx", dtype=None)` -> (model, tokenizer); `load_adapters(model, run_dir)`;
  `generate` / `stream_generate(model, prompt_ids, max_tokens, temp=, top_p=, top_k=, min_p=,
  repetition_penalty=, seed=, stop_ids=, stats=)` and `dataset_loss(model, rows)` on a model of either backend.
- Exports: `export_hf`, `export_peft`, `export_mlx_lm`, `export_gguf`, `export_gguf_lora`; imports:
  `hf_to_mlx`, `import_peft`, `import_mlx_lm`.
- `upload(path, repo_id, private=, revision=, ...)`: a run or an export to the Hub with a model card;
  `write_report(run_dir, out=None)`: the HTML page of a run.
- Configs: `ModelArgs`, `TrainConfig`, `load_config`; `pick_backend`; `build_tiny` (random tiny models).

Names are imported on first use (PEP 562), so `import mlx_mistral` imports neither MLX nor torch; MLX is
imported (after its OpenBLAS preload, see backends/_blas.py) when a name that needs it is first used.
Layout: core/ (backend-neutral), backends/mlx and backends/torch (tensor code), export/, ui/, recipes/,
cli/ (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_API = {
    "finetune": "mlx_mistral.recipes.finetune",
    "load": "mlx_mistral.backends",
    "load_adapters": "mlx_mistral.backends",
    "generate": "mlx_mistral.backends",
    "stream_generate": "mlx_mistral.backends",
    "dataset_loss": "mlx_mistral.backends",
    "pick_backend": "mlx_mistral.backends",
    "export_hf": "mlx_mistral.export.hf",
    "hf_to_mlx": "mlx_mistral.export.hf",
    "export_peft": "mlx_mistral.export.adapters",
    "export_mlx_lm": "mlx_mistral.export.adapters",
    "import_peft": "mlx_mistral.export.adapters",
    "import_mlx_lm": "mlx_mistral.export.adapters",
    "export_gguf": "mlx_mistral.export.gguf_model",
    "export_gguf_lora": "mlx_mistral.export.gguf_adapter",
    "ModelArgs": "mlx_mistral.core.config",
    "TrainConfig": "mlx_mistral.core.train_config",
    "load_config": "mlx_mistral.core.train_config",
    "build_tiny": "mlx_mistral.core.tiny",
    "upload": "mlx_mistral.recipes.upload",
    "write_report": "mlx_mistral.recipes.report",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mlx_mistral' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
