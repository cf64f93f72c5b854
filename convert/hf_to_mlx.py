"""Same as `mlx-mistral convert hf-to-mlx` (see `--help`).

    python convert/hf_to_mlx.py mistralai/Mistral-7B-v0.3 ./mistral-7b-4bit --quantize 4
"""

from mlx_mistral.cli.export import hf_to_mlx_cmd

if __name__ == "__main__":
    hf_to_mlx_cmd()
