"""Same as `mlx-mistral export peft` (see `--help`).

    python convert/to_peft.py --adapter runs/my-run --out ./my-adapter-peft
"""

from mlx_mistral.cli.export import export_peft_cmd

if __name__ == "__main__":
    export_peft_cmd()
