"""`mlx-mistral`: the command line, a thin layer over the library, and the only package that imports click.

One module per command group; every command is registered below, by name. The modules import only click
at the top: the library (and MLX or torch) is imported inside the command that runs, so `--help` and the
light commands start fast (BENCHMARKS.md). Library errors are `ValueError`s; the commands turn them into
click errors with the same message.
"""

from __future__ import annotations

import click

from .. import __version__
from . import dashboard, data, demo, export, generate, info, report, train, upload


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what failed and on which path ("No space left on device: runs/x/...")."""
    what = e.strerror or str(e)
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
    return f"{what}: {paths}" if paths else what


class Main(click.Group):
    """The command group; an OSError (full disk, permissions) or a RuntimeError from a native library that
    reaches it is one line naming the path instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as e:
            raise click.ClickException(os_error_line(e)) from None
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise click.ClickException(f"{type(e).__name__}: {first}") from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlx-mistral")
def main():
    """Fine-tune Mistral 7B, Mixtral 8x7B and Mistral-Nemo on a Mac (MLX) or an NVIDIA box (torch).

    \b
    Typical session:
      mlx-mistral data inspect ./my-data --model mistralai/Mistral-7B-v0.3 --seq-len 2048
      mlx-mistral plan --model mistralai/Mistral-7B-v0.3 --memory 16GB
      mlx-mistral train --config configs/mistral-7b-v0.3-qlora-16gb.yaml --data ./my-data
      mlx-mistral generate --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --prompt "..."
      mlx-mistral chat --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --system "..."
      mlx-mistral export gguf --model mistralai/Mistral-7B-v0.3 --adapter runs/my-run --out my.gguf
    """


for _command in (train.train, train.eval_cmd, train.plan, generate.generate, generate.chat, data.data_group,
                 dashboard.dashboard_cmd, export.export_group, export.convert_group, demo.demo, info.info,
                 upload.upload_cmd, report.report_cmd):
    main.add_command(_command)
