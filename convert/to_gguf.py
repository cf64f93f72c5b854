"""Same as `mlx-mistral export gguf` (see `--help`).

    python convert/to_gguf.py --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --out my.gguf --dtype q8_0
"""

from mlx_mistral.cli.export import export_gguf_cmd

if __name__ == "__main__":
    export_gguf_cmd()
