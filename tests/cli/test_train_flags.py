"""`train`'s flags come from the typed config (help, type, range, choices); --loss-on reaches the loss masks;
dtype "auto" follows the checkpoint, except where the backend is slow in it (said in the start event)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import mlx_mistral.recipes.finetune as recipe
from mlx_mistral.cli import main
from mlx_mistral.cli.train import TRAIN_FLAGS, train
from mlx_mistral.core.weights import storage_dtype
from mlx_mistral.core.data import load_dataset
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path
from mlx_mistral.core.train_config import TrainConfig, resolve_dtype, specs_by_name

CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"},
                       {"role": "assistant", "content": f"Answer {i}."}, {"role": "user", "content": "And then?"},
                       {"role": "assistant", "content": f"Then {i} again."}]} for i in range(6)]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))


def write_chats(path: Path) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return path


def test_every_flag_is_generated_from_the_typed_config():
    specs = specs_by_name()
    params = {p.name: p for p in train.params}
    for name in TRAIN_FLAGS:
        p, spec = params[name], specs[name]
        assert p.help.startswith(spec["help"]), name
        assert p.default is None, name  # not given: the config file / the dataclass default decide
        if spec["choices"] and spec["kind"] != "list":
            assert list(p.type.choices) == [str(c) for c in spec["choices"]], name
    assert params["grad_checkpoint"].opts == ["--grad-checkpoint"] and params["grad_checkpoint"].secondary_opts
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for flag in ("--lr", "--dtype", "--loss-on", "--grad-accum", "--warmup-steps", "--save-every", "--eval-every"):
        assert flag in help_text
    # the values of --loss-on, per record shape, are spelled out
    assert "the last assistant turn" in help_text and "the completion" in help_text


def test_flags_override_the_config_file_and_reach_finetune(tmp_path, monkeypatch):
    seen = {}

    def fake_finetune(cfg, **kw):
        seen["cfg"] = cfg
        return {"reason": "done"}

    monkeypatch.setattr(recipe, "finetune", fake_finetune)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"lr": 1.0e-3, "warmup_steps": 9, "model": "m", "data": "d"}))
    r = CliRunner().invoke(main, ["train", "--config", str(cfg_file), "--lr", "2e-4", "--dtype", "bfloat16",
                                  "--loss-on", "last", "--grad-accum", "3", "--save-every", "5", "--eval-every", "0",
                                  "--quantize", "4", "--grad-checkpoint", "--backend", "mlx",
                                  "--report-to", "tensorboard,wandb"])
    assert r.exit_code == 0, r.output
    c = seen["cfg"]
    assert (c.lr, c.dtype, c.loss_on, c.grad_accum, c.save_every, c.eval_every) == (2e-4, "bfloat16", "last", 3, 5, 0)
    assert c.quantize == 4 and c.grad_checkpoint is True and c.warmup_steps == 9  # unflagged: from the file
    assert c.report_to == ["tensorboard", "wandb"]


@pytest.mark.parametrize("args, needle", [(["--lr", "-1"], "--lr"), (["--loss-on", "prompt"], "--loss-on"),
                                          (["--dtype", "fp8"], "--dtype"), (["--grad-accum", "0"], "--grad-accum"),
                                          (["--report-to", "mlflow"], "--report-to")])
def test_bad_flag_values_name_the_flag(args, needle):
    r = CliRunner().invoke(main, ["train", "--model", "m", "--data", "d", *args])
    assert r.exit_code == 2 and needle in r.output


def test_loss_on_reaches_the_training_rows(tmp_path):
    tok = Tokenizer(bundled_tokenizer_path("mistral_instruct_tokenizer_240323.model.v3"))
    data = write_chats(tmp_path / "train.jsonl")
    counts = {}
    for loss_on in ("default", "last", "all"):
        rows, _ = recipe.load_rows(str(data), tok, TrainConfig(seq_len=64, packing="swa", loss_on=loss_on), "train")
        _, masks, _ = load_dataset(data, tok, "train", loss_on=loss_on)
        # each document's first token predicts nothing: the packed weights are the masks past position 0
        assert rows.weights.sum() == sum(int(m[1:].sum()) for m in masks)
        counts[loss_on] = int(rows.weights.sum())
    assert counts["last"] < counts["default"] < counts["all"]


def test_resolve_dtype():
    assert resolve_dtype("float16", "bfloat16", ("float16",))[0] == "float16"  # explicit: as configured
    assert resolve_dtype("auto", "bfloat16", ())[0] == "bfloat16"
    dt, why = resolve_dtype("auto", "bfloat16", ("bfloat16", "float16"))
    assert dt == "float32" and "slow" in why
    assert resolve_dtype("auto", None, ())[0] == "float32"


def test_storage_dtype_reads_dtype_and_torch_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert storage_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert storage_dtype(tmp_path) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert storage_dtype(tmp_path) is None
    assert storage_dtype(Path(recipe.__file__).parents[1] / "configs" / "mistral-7b-v0.3.json") == "bfloat16"


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny checkpoint stored in bfloat16, as Hub checkpoints are (config.json says so)."""
    import torch
    from safetensors.torch import load_file, save_file

    from mlx_mistral.core.tiny import build_tiny

    d = build_tiny(tmp_path_factory.mktemp("bf16"), "demo", hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, sliding_window=16)
    w = {k: v.to(torch.bfloat16) for k, v in load_file(d / "model.safetensors").items()}
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    (d / "config.json").write_text(json.dumps(dict(cfg, dtype="bfloat16")))
    return d


@pytest.mark.parametrize("backend, expected", [("mlx", "float32"), ("torch", "bfloat16")])
def test_dtype_auto_follows_the_checkpoint_unless_the_backend_is_slow_in_it(tmp_path, bf16_checkpoint, backend,
                                                                             expected):
    """On this CPU machine: MLX's CPU backend is ~20x slower in bf16 (fp32 instead, said why); torch's CPU
    backend is not, so it loads the bf16 checkpoint as bf16."""
    events = []
    data = write_chats(tmp_path / "train.jsonl")
    end = recipe.finetune(dict(model=str(bf16_checkpoint), data=str(data), out=str(tmp_path / "run"),
                               backend=backend, steps=1, seq_len=64, batch_size=2, eval_every=0, val_fraction=0,
                               compile=False), callbacks=[events.append])
    assert end["reason"] == "done"
    start = next(e for e in events if e["event"] == "start")
    assert start["dtype"] == expected
    assert ("slow" in start["dtype_reason"]) == (expected == "float32")
    from mlx_mistral.ui.dashboard import format_line

    assert f"dtype {expected} (" in format_line(start)  # the plain log line says it too
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["dtype"] == expected  # recorded, so --resume loads the same
    assert np.isfinite(end["final_loss"])
