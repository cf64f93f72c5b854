"""The trainer: loss definition against transformers, learning, QLoRA, exact resume, accumulation, faults."""

from __future__ import annotations

import json
import math

import mlx_mistral  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mistral.backends.mlx.loader import load
from mlx_mistral.backends.mlx.model import Model
from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model, token_losses
from mlx_mistral.core.config import ModelArgs
from mlx_mistral.core.loop import Rows, batch_rows
from mlx_mistral.core.packing import pack
from mlx_mistral.core.train_config import TrainConfig, load_config

SMALL = ModelArgs(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16)


def small_model(seed=0):
    mx.random.seed(seed)
    m = Model(SMALL)
    mx.eval(m.parameters())
    return m


def random_rows(n_docs=24, seq_len=64, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 256, rng.integers(10, 60)) for _ in range(n_docs)]
    return Rows.from_packed(pack(docs, seq_len))


def run(tmp_path, name, rows=None, callbacks=(), resume=False, model=None, **kw):
    kw = {"steps": 6, "batch_size": 4, "seq_len": 64, "lr": 1e-3, "warmup_steps": 2, "eval_every": 0,
          "save_every": 2, "lora_rank": 4, "lora_alpha": 8, "out": str(tmp_path / name), **kw}
    cfg = TrainConfig(**kw).validate()
    model = model or small_model()
    lc = prepare_model(model, cfg, "small")
    events = []
    tr = Trainer(model, cfg, rows or random_rows(), None, callbacks=[events.append, *callbacks], lora_config=lc)
    end = tr.run(resume=resume)
    return events, end, model, tr


def losses(events):
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def test_config_layers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nlora_rank: 4\nrank_policy: gqa\n")
    cfg = load_config(p, {"steps": 9, "batch_size": None})
    assert (cfg.steps, cfg.lora_rank, cfg.rank_policy, cfg.batch_size) == (9, 4, "gqa", TrainConfig().batch_size)
    assert TrainConfig().lr == 1.4e-4
    p.write_text("steps: 7\nlora_rnak: 4\n")
    with pytest.raises(ValueError, match="'lora_rnak'"):
        load_config(p)
    with pytest.raises(ValueError, match="'packing'"):
        load_config(None, {"packing": "greedy"})


def test_batch_order_is_a_function_of_seed_and_step():
    seen = np.concatenate([batch_rows(0, s, 5, 20) for s in range(4)])
    assert sorted(seen) == list(range(20))  # one epoch = every row once
    np.testing.assert_array_equal(batch_rows(0, 5, 5, 20), batch_rows(0, 5, 5, 20))
    assert sorted(np.concatenate([batch_rows(1, s, 6, 20) for s in range(10)])) == sorted(list(range(20)) * 3)


def test_step_loss_is_per_document_loss_of_transformers(tiny_models):
    """Packed rows, labels shifted inside segments, loss over loss tokens: the same number transformers
    gives for the documents one at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_models("swa")
    model, _ = load(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 32000, n) for n in (90, 40, 70, 25, 100)]  # window 32: most docs are longer
    masks = [np.r_[np.zeros(5, np.int32), np.ones(len(d) - 5, np.int32)] for d in docs]
    rows = Rows.from_packed(pack(docs, 128, masks))
    s, n = token_losses(model, *rows.take(np.arange(len(rows))))
    total, count = 0.0, 0
    for d, m in zip(docs, masks):
        logits = hf(torch.from_numpy(d[None])).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(d[1:]), reduction="none")
        w = torch.from_numpy(m[1:]).float()
        total += float((ce * w).sum())
        count += int(w.sum())
    assert int(n) == count == sum(len(d) - 5 for d in docs)
    assert float(s) / float(n) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("quantize", [None, 4])
def test_loss_decreases_on_real_text(tiny_models, tmp_path, quantize):
    from mlx_mistral.core.data import load_dataset

    path = tiny_models("swa")
    model, tok = load(path, dtype="float32")
    docs, masks, _ = load_dataset(mlx_mistral.__path__[0] + "/data/demo", tok, "train", cache_dir=tmp_path)
    rows = Rows.from_packed(pack(docs, 128, masks))
    events, end, model, _ = run(tmp_path, "r", rows=rows, model=model, steps=12, lr=1e-2, warmup_steps=2,
                                lora_rank=8, lora_alpha=16, quantize=quantize, save_every=0)
    ls = list(losses(events).values())
    assert end["reason"] == "done" and len(ls) == 12
    assert np.mean(ls[-4:]) < np.mean(ls[:4]) - 0.3, ls
    if quantize:
        assert any("QuantizedLinear" in type(m).__name__ for _, m in model.named_modules())


def test_resume_is_exact(tmp_path):
    kw = dict(lora_dropout=0.1, grad_accum=2, batch_size=2)
    full, _, _, _ = run(tmp_path, "a", **kw)

    class StopAt:
        def __init__(self):
            self.trainer = None

        def __call__(self, e):
            if e["event"] == "train" and e["step"] == 3:
                self.trainer.stop()

    stopper = StopAt()
    cfg = TrainConfig(steps=6, batch_size=2, grad_accum=2, seq_len=64, lr=1e-3, warmup_steps=2, eval_every=0,
                      save_every=2, lora_rank=4, lora_alpha=8, lora_dropout=0.1, out=str(tmp_path / "b"))
    model = small_model()
    lc = prepare_model(model, cfg, "small")
    first = []
    tr = Trainer(model, cfg, random_rows(), None, callbacks=[first.append, stopper], lora_config=lc)
    stopper.trainer = tr
    end = tr.run()
    assert end["reason"] == "interrupted" and end["step"] == 3 and "--resume" in end["message"]
    assert (tmp_path / "b" / "checkpoints" / "step-0000003" / "optimizer.safetensors").exists()

    second, end2, _, _ = run(tmp_path, "b", resume=True, **kw)  # same base; adapters and optimizer from disk
    assert end2["reason"] == "done"
    got = {**losses(first), **losses(second)}
    assert [e["start_step"] for e in second if e["event"] == "start"] == [3]
    assert got == losses(full)  # bit-exact, every step


def test_accumulation_equivalence(tmp_path):
    one, _, m1, _ = run(tmp_path, "a", batch_size=4, grad_accum=1, steps=3)
    two, _, m2, _ = run(tmp_path, "b", batch_size=2, grad_accum=2, steps=3)
    for s in (1, 2, 3):
        assert losses(one)[s] == pytest.approx(losses(two)[s], rel=1e-6)  # fp32: sums in another order
    a, b = dict(tree_flatten(m1.trainable_parameters())), dict(tree_flatten(m2.trainable_parameters()))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_gradient_checkpointing_changes_nothing(tmp_path):
    plain, _, _, _ = run(tmp_path, "a", steps=2)
    ckpt, _, _, _ = run(tmp_path, "b", steps=2, grad_checkpoint=True)
    for s in (1, 2):
        assert losses(ckpt)[s] == pytest.approx(losses(plain)[s], abs=1e-6)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    """Issue 13 (6): a checkpoint is good only once its weights gave a finite loss. Step 1 trains at a
    normal lr (checkpoint 1, verified by step 2's loss); then lr jumps to 1e30, so step 2's update blows
    the adapters up: checkpoint 2 holds finite weights that give a NaN loss at step 3."""
    from mlx_mistral.core import checkpoints

    cfg = TrainConfig(steps=5, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=0, eval_every=0, save_every=1,
                      grad_clip=0, lora_rank=4, lora_alpha=8, out=str(tmp_path / "n")).validate()
    model = small_model()
    lc = prepare_model(model, cfg, "small")

    def diverge(e):
        if e["event"] == "train" and e["step"] == 1:
            cfg.lr = 1e30

    events = []
    end = Trainer(model, cfg, random_rows(), None, callbacks=[events.append, diverge], lora_config=lc).run()
    assert end["reason"] == "nan" and end["step"] == 2
    assert "last good checkpoint is" in end["message"] and "step-0000001" in end["message"]
    assert "deleted step-0000002" in end["message"] and "learning rate" in end["message"]
    ck = checkpoints.complete(tmp_path / "n")
    assert [p.name for p in ck] == ["step-0000001"] and checkpoints.is_verified(ck[0])
    saved = mx.load(str(ck[0] / "weights.safetensors"))
    assert saved and all(bool(mx.isfinite(v).all()) for v in saved.values())
    # the model and the run's adapters were restored from the good checkpoint, not left diverged
    now = dict(tree_flatten(model.trainable_parameters()))
    for k, v in saved.items():
        np.testing.assert_array_equal(np.array(now[k]), np.array(v))
    out = mx.load(str(tmp_path / "n" / "adapters.safetensors"))
    assert all(bool(mx.isfinite(v).all()) for v in out.values())
    assert [e["event"] for e in events][-1] == "end"


def test_run_directory(tmp_path):
    from mlx_mistral.backends.mlx.lora import load_adapters
    from mlx_mistral.ui.callbacks import JSONLLogger

    log = JSONLLogger(tmp_path / "r" / "metrics.jsonl")
    events, end, model, _ = run(tmp_path, "r", steps=5, save_every=2, keep_checkpoints=2, callbacks=[log])
    log.close()
    d = tmp_path / "r"
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["format"] == "mlx-mistral-lora" and cfg["base_model"] == "small" and cfg["base_fingerprint"]
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == [e["event"] for e in events]
    start = lines[0]
    for key in ("run_dir", "model", "backend", "device", "fine_tune", "rank_policy", "trainable_params",
                "total_params", "total_steps", "start_step", "seq_len", "batch_size", "grad_accum", "packing",
                "packing_efficiency", "memory_total", "time"):
        assert key in start
    train = next(x for x in lines if x["event"] == "train")
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "it_per_sec", "elapsed",
                "peak_memory", "active_memory", "packing_efficiency"):
        assert key in train
    fresh = small_model()
    load_adapters(fresh, d)
    ids = mx.array([[5, 6, 7, 8] * 10])
    np.testing.assert_array_equal(np.array(fresh(ids)), np.array(model(ids)))


def test_full_finetune_trains_every_parameter(tmp_path):
    model = small_model()
    events, end, model, tr = run(tmp_path, "f", model=model, fine_tune="full", steps=3, lr=1e-3)
    assert events[0]["trainable_params"] == events[0]["total_params"] == SMALL.param_count()
    assert end["reason"] == "done" and math.isfinite(end["final_loss"])


def test_sigint_leaves_a_resumable_checkpoint(tiny_models, tmp_path):
    """Ctrl-C to `mlx-mistral train` in a subprocess: checkpoint at the step boundary, exit 130, resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    data = mlx_mistral.__path__[0] + "/data/demo"
    cmd = [sys.executable, "-m", "mlx_mistral.cli", "train", "--model", str(tiny_models("swa")), "--data", data,
           "--out", str(run_dir), "--steps", "500", "--seq-len", "128", "--batch-size", "2", "--lora-rank", "4",
           "--no-dashboard"]
    env = dict(os.environ, MLX_MISTRAL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"event": "train"' in metrics.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "interrupted" and "--resume" in end["message"]
    assert "--resume" in err
    step = end["step"]
    assert (run_dir / "checkpoints" / f"step-{step:07d}" / "state.json").exists()
    assert (run_dir / "adapters.safetensors").exists() and (run_dir / "config.yaml").exists()

    cmd = [sys.executable, "-m", "mlx_mistral.cli", "train", "--out", str(run_dir), "--resume",
           "--steps", str(step + 2), "--no-dashboard"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert starts[-1]["start_step"] == step
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "done" and events[-1]["step"] == step + 2
