"""`mlx-mistral info`: versions, the BLAS in use and the compute device."""

from __future__ import annotations

import click


@click.command()
def info():
    """Show versions, the BLAS in use and the compute device."""
    import platform

    from .. import __version__
    from ..backends._blas import STATUS, preload_openblas

    preload_openblas(torch_first=False)  # this process never uses torch: do not pay its import
    import mlx.core as mx

    from ..backends import pick_backend
    from ..backends.mlx.trainer import device_name

    click.echo(f"mlx-mistral {__version__} on {platform.platform()}")
    click.echo(f"mlx {mx.__version__}, device {device_name()}")
    click.echo(f"BLAS: {STATUS['loaded'] or 'bundled'} ({STATUS['reason']})")
    click.echo(f"--backend auto trains with: {pick_backend('auto')}")
