"""Data parallelism: 2 processes (mlx.launch, ring backend) x batch b == 1 process x batch 2b."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r'''
import sys
import mlx_mistral.backends.mlx
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_mistral.backends.mlx.distributed import init_group
from mlx_mistral.backends.mlx.model import Model
from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model
from mlx_mistral.core.config import ModelArgs
from mlx_mistral.core.loop import Rows
from mlx_mistral.core.packing import pack
from mlx_mistral.core.train_config import TrainConfig

out, batch = sys.argv[1], int(sys.argv[2])
group = init_group()
args = ModelArgs(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=16)
mx.random.seed(0)
model = Model(args)
rng = np.random.default_rng(0)
rows = Rows.from_packed(pack([rng.integers(3, 256, rng.integers(10, 60)) for _ in range(40)], 64))
# eps 1e-5 (default 1e-8): at step 2 lora_a's gradient is proportional to lora_b, which one step made
# lr-sized, so some of its elements are ~1e-9; near eps Adam turns the rounding of a differently ordered
# fp32 sum into an lr-sized update (max |diff| 9.8e-6 with eps 1e-8; with 1e-6, 3.5e-7 before RoPE took
# transformers' inv_freq and 1.5e-6 after, the same noise on other values). The losses agree
# either way: they are summed per row in float64.
cfg = TrainConfig(steps=3, batch_size=batch, grad_accum=2, seq_len=64, lr=1e-3, warmup_steps=1, eval_every=0,
                  save_every=0, lora_rank=4, lora_alpha=8, eps=1e-5, out=out + "_run")
lc = prepare_model(model, cfg, "small")
events = []
Trainer(model, cfg, rows, None, callbacks=[events.append], lora_config=lc, group=group).run()
if group is None or group.rank() == 0:
    losses = [e["loss"] for e in events if e["event"] == "train"]
    np.savez(out, losses=np.array(losses), **{k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())})
'''


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path):
    launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if launch is None:
        pytest.skip("mlx.launch is not installed")
    script = tmp_path / "dp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"], check=True, env=env, timeout=300)
    r = subprocess.run([launch, "-n", "2", "--backend", "ring", sys.executable, str(script), str(tmp_path / "two"), "2"],
                       env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert len(one["losses"]) == 3
    np.testing.assert_allclose(two["losses"], one["losses"], atol=1e-6, rtol=0)
    for k in one.files:
        if k != "losses":
            assert np.abs(one[k] - two[k]).max() <= 1e-6, k
