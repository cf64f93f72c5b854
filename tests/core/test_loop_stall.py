"""The stall rule of the training loop (issue 13): gradients exactly 0 for several steps after warm-up,
the collapse a too-high learning rate leaves (loss at ln(vocab)), stop the run; a model trained from
scratch, whose loss starts at ln(vocab) with non-zero gradients, is not stopped. A numpy stand-in
backend drives the real `TrainLoop`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from mlx_mistral.core.config import ModelArgs
from mlx_mistral.core.loop import STALL_STEPS, Rows, TrainLoop
from mlx_mistral.core.train_config import TrainConfig

VOCAB = 1000


class FakeLoop(TrainLoop):
    backend = "fake"

    def __init__(self, norms, cfg, **kw):
        rows = Rows(*(np.ones((8, 16), np.int64) for _ in range(5)))
        args = ModelArgs(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4)
        super().__init__(SimpleNamespace(args=args, eval=lambda: None, train=lambda: None), cfg, rows, **kw)
        self.norms = list(norms)

    def train_step(self, step):
        return math.log(VOCAB), (lambda lr: self.norms[step]), 16

    def _loss_sums(self, rows, batches):
        return math.log(VOCAB) * 16, 16.0

    def _counts(self):
        return 1, 1

    def _memory(self):
        return 0, 0

    def _memory_total(self):
        return 0

    def _device_name(self):
        return "cpu"

    def _write_tensors(self, tmp):
        pass

    def _save_model_weights(self, path):
        path.write_bytes(b"")

    def _restore(self, path):
        pass


def cfg(tmp_path, **kw):
    return TrainConfig(**{"steps": 20, "warmup_steps": 3, "save_every": 0, "eval_every": 0, "batch_size": 1,
                          "out": str(tmp_path), "fine_tune": "full", **kw})


def test_zero_gradients_after_warmup_stop_the_run(tmp_path):
    end = FakeLoop([1.0, 1.0] + [0.0] * 18, cfg(tmp_path)).run()
    assert end["reason"] == "stalled"
    # zero from step 3 on, but warm-up ends after step 3: steps 4..8 are the STALL_STEPS zero steps
    assert end["step"] == 3 + STALL_STEPS
    assert "exactly 0" in end["message"] and f"ln(vocab) = {math.log(VOCAB):.4f}" in end["message"]
    assert "Lower the learning rate" in end["message"]


def test_from_scratch_at_ln_vocab_with_gradients_is_not_stalled(tmp_path):
    end = FakeLoop([1.0] * 20, cfg(tmp_path)).run()
    assert end["reason"] == "done" and end["final_loss"] == math.log(VOCAB)


def test_zero_gradients_during_warmup_or_interrupted_runs_of_zeros_do_not_stop(tmp_path):
    norms = [0.0, 0.0, 0.0] + ([0.0] * (STALL_STEPS - 1) + [1e-9]) * 4
    end = FakeLoop(norms[:20], cfg(tmp_path)).run()
    assert end["reason"] == "done"
