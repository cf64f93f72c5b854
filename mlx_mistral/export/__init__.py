"""Converters out of (and into) mlx-mistral, each proven by the program that loads its output.

- `hf`: Hugging Face <-> MLX model directories (sharded safetensors + index, config, tokenizer files);
  exports are fused (base + adapters) and dequantized, loadable by `transformers` and `mlx_lm.load`.
- `adapters`: our LoRA run directory <-> PEFT (`adapter_model.safetensors`, `rank_pattern`) and mlx-lm.
- `gguf_model`: the fused model as one GGUF for llama.cpp / Ollama (architecture `llama`, Q/K rows
  permuted, full tokenizer metadata), F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 in numpy (gguf-py) and
  K-quants through llama.cpp's own quantizer.
- `gguf_adapter`: an adapter-only GGUF to apply to a base GGUF (`llama-cli -m base.gguf --lora a.gguf`).
- `weights`, `tokenizer_files`: what those share (fusing, chat templates, Modelfile). Tensor names and
  the q/k permutation are core/weights.py's, the one table every loader and exporter uses.
Library functions never print: they return what the CLI should report and take a `progress` callback.
"""

from ..backends import mlx as _mlx  # noqa: F401, E402  (the exporters use MLX: OpenBLAS before mlx.core)
