"""Data parallelism on MLX's own distributed layer (`mx.distributed`, started by `mlx.launch`).

    mlx.launch -n 2 --backend ring $(which python) -m mlx_mistral.cli train --config CFG   # 2 local processes
    mlx.launch --hostfile hosts.json --backend ring $(which python) -m mlx_mistral.cli train --config CFG

Every rank holds the whole (packed) dataset and computes the same global batch order; rank r trains on
its share of every micro-step (`core.loop.micro_rows`), the gradients are summed across ranks (each rank's
loss is already divided by the global batch's loss-token count), and only rank 0 writes the run
directory. `batch_size` is per rank: 2 ranks x batch b train exactly what 1 rank x batch 2b trains.
"""

from __future__ import annotations

import mlx.core as mx


def init_group():
    """The data-parallel group when more than one process was launched, else None (single process)."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def barrier(group):
    """Wait until every rank reaches this point (no-op without a group)."""
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
