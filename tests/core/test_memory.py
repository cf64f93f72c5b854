"""The memory planner against `mx.get_peak_memory()` of real training steps (within 20%)."""

from __future__ import annotations

import gc

import mlx_mistral  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral.backends.mlx.model import Model
from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model, trainable_count
from mlx_mistral.core.config import ModelArgs, bundled_config
from mlx_mistral.core.loop import Rows
from mlx_mistral.core.memory import estimate, parse_size, propose, weight_bytes
from mlx_mistral.core.packing import pack
from mlx_mistral.core.train_config import TrainConfig

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=16),
    "tiny-vocab32k": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32),
    "small": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=128),
}


@pytest.mark.parametrize("shape,batch,seq_len,ckpt,bits", [
    ("tiny", 4, 256, False, None), ("tiny", 4, 256, True, None), ("tiny-vocab32k", 2, 128, False, None),
    ("small", 2, 256, False, None), ("small", 2, 256, True, 4)])
def test_prediction_within_20_percent_of_measured_peak(tmp_path, shape, batch, seq_len, ckpt, bits):
    args = ModelArgs(**SHAPES[shape])
    gc.collect()
    mx.clear_cache()
    leftover = mx.get_active_memory()  # arrays other tests in this process still hold (not this run's)
    mx.random.seed(0)
    model = Model(args)
    rng = np.random.default_rng(0)
    rows = Rows.from_packed(pack([rng.integers(3, args.vocab_size, rng.integers(seq_len // 4, seq_len))
                                  for _ in range(4 * batch)], seq_len))
    cfg = TrainConfig(steps=2, batch_size=batch, seq_len=seq_len, grad_checkpoint=ckpt, quantize=bits,
                      eval_every=0, save_every=0, lora_rank=8, out=str(tmp_path))
    lc = prepare_model(model, cfg, "m")
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    Trainer(model, cfg, rows, lora_config=lc).run()
    measured = mx.get_peak_memory() - leftover
    pred = estimate(args, batch_size=batch, seq_len=seq_len, trainable_params=trainable_count(model),
                    grad_checkpoint=ckpt, bits=bits).total
    assert 0.8 <= pred / measured <= 1.2, (pred, measured)


@pytest.mark.parametrize("shape,batch,seq_len,ckpt,objective,weights", [
    ("tiny-vocab32k", 2, 128, False, "dpo", "lora"), ("tiny-vocab32k", 2, 128, False, "orpo", "lora"),
    ("tiny-vocab32k", 2, 128, False, "dpo", "full"), ("small", 2, 256, True, "orpo", "lora")])
def test_preference_prediction_within_20_percent_of_measured_peak(tmp_path, shape, batch, seq_len, ckpt, objective,
                                                                   weights):
    """DPO / ORPO steps on packed pairs (DPO's reference: adapters off in the step, or precomputed for full)."""
    from mlx_mistral.backends.mlx.preference import reference_table
    from mlx_mistral.core.pairs import Pair, pack_pairs

    args = ModelArgs(**SHAPES[shape])
    mx.random.seed(0)
    model = Model(args)
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(8 * batch):
        p = rng.integers(3, args.vocab_size, rng.integers(8, seq_len // 4))
        sides = []
        for _ in range(2):
            c = rng.integers(3, args.vocab_size, rng.integers(4, seq_len // 4))
            sides += [np.r_[p, c].astype(np.int32), np.r_[np.zeros(len(p)), np.ones(len(c))].astype(np.int32)]
        pairs.append(Pair(*sides))
    rows = pack_pairs(pairs, seq_len)
    if objective == "dpo" and weights == "full":
        rows.reference = reference_table(model, rows)
    cfg = TrainConfig(fine_tune=objective, pref_weights=weights, steps=2, batch_size=batch, seq_len=seq_len,
                      grad_checkpoint=ckpt, eval_every=0, save_every=0, lora_rank=8, out=str(tmp_path))
    lc = prepare_model(model, cfg, "m")
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    Trainer(model, cfg, rows, lora_config=lc).run()
    measured = mx.get_peak_memory()
    pred = estimate(args, batch_size=batch, seq_len=seq_len, fine_tune=weights, objective=objective,
                    trainable_params=trainable_count(model), grad_checkpoint=ckpt).total
    assert 0.8 <= pred / measured <= 1.2, (pred, measured)


def test_weight_bytes_and_sizes():
    args = bundled_config("mistral-7b-v0.3")
    assert weight_bytes(args, dtype="bfloat16") == 2 * args.param_count() == 2 * 7_248_023_552
    q4 = weight_bytes(args, bits=4, dtype="bfloat16")
    assert 0.28 < q4 / weight_bytes(args, dtype="bfloat16") < 0.29  # 4.5 bits of 16
    assert parse_size("16GB") == 16 * 10**9 and parse_size("24 GiB") == 24 * 2**30 and parse_size("512mb") == 512e6
    with pytest.raises(ValueError, match="16GB"):
        parse_size("lots")


def test_propose_fits_budget_and_prefers_more_tokens():
    args = bundled_config("mistral-7b-v0.3")
    fits = propose(args, parse_size("16GB"), bits=4, dtype="bfloat16", trainable_params=20_971_520)
    assert fits and all(f["estimate"].total <= 0.85 * 16e9 for f in fits)
    best = fits[0]
    assert best["seq_len"] * best["batch_size"] == max(f["seq_len"] * f["batch_size"] for f in fits)
    assert not propose(args, parse_size("4GB"), bits=None, dtype="bfloat16")  # 14.5 GB of bf16 weights
