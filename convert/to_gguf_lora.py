"""Same as `mlx-mistral export gguf-lora` (see `--help`).

    python convert/to_gguf_lora.py --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --out my-lora.gguf
"""

from mlx_mistral.cli.export import export_gguf_lora_cmd

if __name__ == "__main__":
    export_gguf_lora_cmd()
