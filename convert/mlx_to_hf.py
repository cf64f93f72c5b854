"""Same as `mlx-mistral export hf` (see `--help`).

    python convert/mlx_to_hf.py --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --out ./my-model-hf
"""

from mlx_mistral.cli.export import export_hf_cmd

if __name__ == "__main__":
    export_hf_cmd()
