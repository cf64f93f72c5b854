"""DPO / ORPO through the trainers of both backends: exact resume, accumulation, the full-parameter path
with reference log-probs precomputed once and cached with the tokenized pairs, `finetune` end to end with
the events the dashboard reads, and adapters that export as ordinary LoRA adapters."""

from __future__ import annotations

import json

import mlx_mistral.backends.mlx  # noqa: F401  (first: OpenBLAS before mlx.core)
import numpy as np
import pytest

from mlx_mistral.core.pairs import Pair, pack_pairs
from mlx_mistral.core.train_config import TrainConfig

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def rand_pairs(n, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(3, vocab, rng.integers(5, 15))
        sides = []
        for _ in range(2):
            c = rng.integers(3, vocab, rng.integers(3, 12))
            sides += [np.r_[p, c].astype(np.int32), np.r_[np.zeros(len(p)), np.ones(len(c))].astype(np.int32)]
        out.append(Pair(*sides))
    return out


def _cfg(tmp_path, name, **kw):
    kw = {"fine_tune": "dpo", "steps": 6, "batch_size": 2, "seq_len": 64, "lr": 1e-2, "warmup_steps": 1,
          "eval_every": 0, "save_every": 2, "lora_rank": 4, "lora_alpha": 8, "weight_decay": 0.0,
          "out": str(tmp_path / name), **kw}
    return TrainConfig(**kw).validate()


def small(backend, cfg):
    """(the backend's Trainer class, the small model of tests/backends/mlx/test_trainer.py, its adapter config)."""
    from test_trainer import SMALL, small_model

    if backend == "mlx":
        from mlx_mistral.backends.mlx.trainer import Trainer, prepare_model

        model = small_model()
    else:
        import torch

        from mlx_mistral.backends.torch.model import Model
        from mlx_mistral.backends.torch.trainer import TorchTrainer as Trainer
        from mlx_mistral.backends.torch.trainer import prepare_model

        torch.manual_seed(0)
        model = Model(SMALL)
    return Trainer, model, prepare_model(model, cfg, "small")


def run(backend, tmp_path, name, stop_at=None, resume=False, **kw):
    """A DPO/ORPO run of the small model of tests/backends/mlx/test_trainer.py on random pairs (stopped with
    a checkpoint after `stop_at` steps when given)."""
    cfg = _cfg(tmp_path, name, **kw)
    Trainer, model, lc = small(backend, cfg)
    events = []
    tr = Trainer(model, cfg, pack_pairs(rand_pairs(24), 64), pack_pairs(rand_pairs(6, 1), 64),
                 callbacks=[events.append], lora_config=lc)
    if stop_at:
        tr.callbacks = [_stopper(events, tr, stop_at)]
    return events, tr.run(resume=resume)


def _stopper(events, trainer, step):
    def cb(e):
        events.append(e)
        if e["event"] == "train" and e["step"] == step:
            trainer.stop()
    return cb


def trains(events):
    return {e["step"]: e for e in events if e["event"] == "train"}


@pytest.fixture(autouse=True)
def _path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.config.rootpath / "tests" / "backends" / "mlx"))


@pytest.mark.parametrize("backend, objective, quantize", [("mlx", "dpo", None), ("mlx", "dpo", 4),
                                                         ("mlx", "orpo", None), ("torch", "dpo", None)])
def test_resume_is_exact(tmp_path, backend, objective, quantize):
    """Stopped after step 3 and resumed == uninterrupted (LoRA; QLoRA: the reference is the quantized base)."""
    kw = dict(fine_tune=objective, quantize=quantize)
    whole, _ = run(backend, tmp_path, "a", **kw)
    _, end = run(backend, tmp_path, "b", stop_at=3, **kw)
    assert end["reason"] == "interrupted" and end["step"] == 3
    second, end2 = run(backend, tmp_path, "b", resume=True, **kw)
    assert end2["reason"] == "done"
    a, b = trains(whole), trains(second)
    assert sorted(b) == [4, 5, 6]
    for s in b:
        for k in ("loss", *REWARDS):
            assert b[s][k] == pytest.approx(a[s][k], abs=1e-6), (s, k)
    if objective == "dpo":
        assert a[1]["rewards/margins"] == 0.0  # fresh adapters: the policy is the reference at step 1
    assert abs(a[6]["rewards/margins"] - a[1]["rewards/margins"]) > 1e-4  # and the adapters moved


def test_accumulation_changes_only_speed(tmp_path):
    one, _ = run("mlx", tmp_path, "a", batch_size=2, grad_accum=1, steps=3)
    two, _ = run("mlx", tmp_path, "b", batch_size=1, grad_accum=2, steps=3)
    for s, e in trains(one).items():
        for k in ("loss", *REWARDS):
            assert trains(two)[s][k] == pytest.approx(e[k], abs=2e-6), (s, k)


def _pref_data(tmp_path, tok_dir):
    """A preference dataset of the bundled demo pairs (train + a valid split)."""
    from mlx_mistral.core.data import DEMO

    d = tmp_path / "prefs"
    d.mkdir()
    for split, n in (("train", 12), ("valid", 4)):
        lines = (DEMO / "preference" / f"{split}.jsonl").read_text().splitlines()[:n]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_full_dpo_precomputes_the_reference_once_and_resumes(tmp_path, monkeypatch, backend, tiny_models):
    """pref_weights: full: the reference table is computed from the initial weights before step 1 and stored
    beside the tokenized pairs; step 1's rewards are then exactly 0 (policy == reference); a resumed run
    reads the table back (not recomputed from the trained weights) and continues."""
    import mlx_mistral

    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))
    model = tiny_models("swa", sliding_window=16)
    data = _pref_data(tmp_path, model)
    cfg = {"model": str(model), "data": str(data), "out": str(tmp_path / "run"), "backend": backend,
           "fine_tune": "dpo", "pref_weights": "full", "steps": 2, "batch_size": 2, "seq_len": 512,
           "lr": 1e-4, "warmup_steps": 0, "eval_every": 2, "save_every": 1}
    end = mlx_mistral.finetune(dict(cfg, steps=1))
    assert end["reason"] == "done"
    tables = list((tmp_path / "cache").rglob("reference-*.npy"))
    assert len(tables) == 2  # train and valid
    first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    t1 = [e for e in first if e["event"] == "train"][0]
    assert t1["rewards/margins"] == 0.0 and t1["rewards/chosen"] == 0.0
    stamp = {t: t.stat().st_mtime_ns for t in tables}
    end = mlx_mistral.finetune(cfg, resume=True)
    assert end["reason"] == "done" and end["step"] == 2
    assert {t: t.stat().st_mtime_ns for t in tables} == stamp  # read back, not recomputed
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [e for e in events if e["event"] == "eval"][-1]
    assert "val_rewards/accuracies" in ev and "val_ppl" not in ev
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_orpo_lora_on_torch_then_peft_loads_the_adapters(tmp_path, monkeypatch, tiny_models):
    """An ORPO LoRA run (torch backend, finetune) writes ordinary adapters: the PEFT export loads them."""
    import mlx_mistral

    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))
    model = tiny_models("swa", sliding_window=16)
    cfg = {"model": str(model), "data": str(_pref_data(tmp_path, model)), "out": str(tmp_path / "run"),
           "backend": "torch", "fine_tune": "orpo", "steps": 2, "batch_size": 2, "seq_len": 512, "lr": 1e-3,
           "warmup_steps": 0, "eval_every": 0, "save_every": 0, "lora_rank": 4, "lora_alpha": 8}
    end = mlx_mistral.finetune(cfg)
    assert end["reason"] == "done"
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    t = [e for e in events if e["event"] == "train"][-1]
    assert {"nll_loss", "log_odds_ratio", *REWARDS} <= set(t)
    import torch
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from mlx_mistral.backends.torch.loader import load_model
    from mlx_mistral.backends.torch.lora import load_adapters
    from mlx_mistral.export.adapters import export_peft

    export_peft(tmp_path / "run", tmp_path / "peft", str(model))
    peft = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(model, dtype=torch.float32), tmp_path / "peft")
    ours = load_model(model, dtype="float32", device="cpu")
    load_adapters(ours, tmp_path / "run")
    ids = torch.arange(3, 83).reshape(1, -1)
    with torch.no_grad():
        theirs, mine = peft(ids).logits, ours(ids)
        base = MistralForCausalLM.from_pretrained(model, dtype=torch.float32)(ids).logits
    assert (theirs - base).abs().max() > 1e-4  # ORPO moved the adapters
    assert torch.allclose(mine, theirs, atol=1e-4)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_batch_larger_than_the_data_repeats_whole_rows(tmp_path, backend):
    """One row of pairs, two rows a step: the row is taken twice with slots of its own, so the step's loss
    and metrics are those of the row alone (a mean over its pairs, each counted twice)."""
    losses = {}
    for b in (1, 2):
        cfg = _cfg(tmp_path, f"r{b}", batch_size=b, steps=1, save_every=0, seq_len=128)
        Trainer, model, lc = small(backend, cfg)
        rows = pack_pairs(rand_pairs(2), 128)
        assert len(rows) == 1
        events = []
        Trainer(model, cfg, rows, None, callbacks=[events.append], lora_config=lc).run()
        losses[b] = trains(events)[1]
    for k in ("loss", "rewards/accuracies", "logps/chosen"):
        assert losses[2][k] == pytest.approx(losses[1][k], abs=1e-6), k


def test_pair_rows_of_one_file_hold_out_val_fraction_of_whole_pairs(tmp_path, monkeypatch):
    """A single .jsonl: `val_fraction` of the pairs (whole pairs, seeded) become the validation rows."""
    from mlx_mistral.core.data import DEMO
    from mlx_mistral.core.pairs import load_pairs
    from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path
    from mlx_mistral.recipes.finetune import load_pair_rows

    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))
    tok = Tokenizer(bundled_tokenizer_path("tokenizer.model.v1"))
    cfg = TrainConfig(fine_tune="orpo", data=str(DEMO / "preference" / "train.jsonl"), seq_len=512, val_fraction=0.1)
    train, val = load_pair_rows(cfg, tok)
    assert (train.n_pairs, val.n_pairs) == (142, 16)  # 158 pairs, 10% held out
    real = int((train.segment_ids > 0).sum() + (val.segment_ids > 0).sum())
    assert real == sum(len(p) for p in load_pairs(cfg.data, tok)[0])  # every pair in exactly one of them
