"""Same as `mlx-mistral convert peft-to-mlx` (see `--help`).

    python convert/peft_to_mlx.py ./trl-output ./runs/imported --model mistralai/Mistral-7B-v0.3
"""

from mlx_mistral.cli.export import peft_to_mlx_cmd

if __name__ == "__main__":
    peft_to_mlx_cmd()
