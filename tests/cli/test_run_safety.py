"""Run safety through the real CLI in child processes (issue 13): every numbered case of the issue.

Each case runs `python -m mlx_mistral.cli train ...` (what `mlx-mistral train` runs) on a tiny random
Mistral from transformers, with real signals where the case is a fault. CI runs as root (a read-only
folder is writable for root), so an unwritable --out is a path under a regular file, and a full disk is
an injected ENOSPC."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import mlx_mistral
from mlx_mistral.core import checkpoints

DATA = mlx_mistral.__path__[0] + "/data/demo"
SMALL = ["--seq-len", "128", "--batch-size", "2", "--lora-rank", "8", "--no-dashboard"]


def cli(*args, env=None, cwd=None, timeout=240, pre: str = ""):
    """Run the CLI in a child process; `pre` is Python run first in that process (fault injection)."""
    code = f"{pre}\nimport sys\nfrom mlx_mistral.cli import main\nsys.argv[0] = 'mlx-mistral'\nmain()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, cwd=cwd)


ENV = dict(os.environ)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ENV["MLX_MISTRAL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return ENV


def train(model, out, *extra, steps=4, **kw):
    return cli("train", "--model", model, "--data", DATA, "--out", out, "--steps", steps, *SMALL, *extra, **kw)


def events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def done_run(tiny_models, tmp_path_factory, env):
    """A finished 4-step rank-8 run (checkpoints at steps 2 and 4, via a config file: save_every 2)."""
    run = tmp_path_factory.mktemp("runs") / "done"
    cfg = run.parent / "c.yaml"
    cfg.write_text("save_every: 2\nwarmup_steps: 1\nlr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string
    r = train(tiny_models("swa"), run, "--config", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


# 1. an existing run is never reused silently ------------------------------------------------------------
def test_existing_run_refused_without_resume_and_overwrite_starts_over(done_run, tiny_models, tmp_path):
    run = copy_run(done_run, tmp_path / "run")
    def files():  # (the lock file is the claim's own)
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    r = train(tiny_models("swa"), run, steps=2)
    assert r.returncode != 0 and "is not empty" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert files() == before  # nothing touched
    r = train(tiny_models("swa"), run, "--overwrite", steps=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in checkpoints.complete(run)] == ["step-0000002"]  # the old step-4 is gone
    assert [e["event"] for e in events(run)].count("start") == 1


# 2 + 3. --resume refuses what it cannot continue, before writing anything ---------------------------------
@pytest.mark.parametrize("flags, key", [(["--lora-rank", "4"], "lora_rank"), (["--rank-policy", "gqa"], "rank_policy"),
                                        (["--seq-len", "64"], "seq_len"), (["--packing", "naive"], "packing"),
                                        (["--batch-size", "1"], "batch_size"), (["--quantize", "4"], "quantize")])
def test_resume_refuses_fixed_keys_and_writes_nothing(done_run, tmp_path, flags, key):
    run = copy_run(done_run, tmp_path / "run")
    saved = (run / "config.yaml").read_bytes()
    n_events = len(events(run))
    r = cli("train", "--out", run, "--resume", "--steps", 6, *flags)
    assert r.returncode != 0 and "--resume cannot change" in r.stderr and key in r.stderr, r.stderr
    assert (run / "config.yaml").read_bytes() == saved and len(events(run)) == n_events
    assert "Traceback" not in r.stderr
    r = cli("train", "--out", run, "--resume", "--steps", 6, "--no-dashboard")  # a plain resume still works
    assert r.returncode == 0, r.stderr[-3000:]


def test_resume_with_a_model_of_another_shape_is_refused(done_run, tiny_models, tmp_path):
    run = copy_run(done_run, tmp_path / "run")
    saved = (run / "config.yaml").read_bytes()
    r = cli("train", "--out", run, "--resume", "--steps", 6, "--model", tiny_models("swa", hidden_size=96))
    assert r.returncode != 0 and "another model" in r.stderr and "fingerprint" in r.stderr, r.stderr
    assert (run / "config.yaml").read_bytes() == saved


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_checkpoint_of_another_rank_is_refused_by_shape(done_run, tmp_path, backend):
    """Even past the config check (a hand-edited config.yaml), the checkpoint's tensor shapes are checked."""
    run = copy_run(done_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(cfg, lora_rank=4, backend=backend)))
    r = cli("train", "--out", run, "--resume", "--steps", 6, "--no-dashboard")
    assert r.returncode != 0 and "has shape" in r.stderr and "(8," in r.stderr or ", 8)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr


def test_resume_records_changed_free_keys_and_works_from_another_folder(done_run, tmp_path):
    run = copy_run(done_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert all(Path(cfg[k]).is_absolute() for k in ("model", "data", "out")) or cfg["out"] != "runs/latest"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("train", "--out", run, "--resume", "--steps", 6, "--no-dashboard", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    resume = [e for e in events(run) if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 4 and resume[0]["changed"]["steps"] == [4, 6]
    assert "step-0000004" in resume[0]["checkpoint"]


# 4. the demo never deletes what it did not make -----------------------------------------------------------
def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    r = cli("demo", "--out", tmp_path / "mine", "--no-dashboard", "--skip-export")
    assert r.returncode != 0 and "not made by the demo" in r.stderr, r.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# 5. two processes on one run directory --------------------------------------------------------------------
def test_second_training_process_is_refused_while_the_first_runs(tiny_models, tmp_path, env):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mlx_mistral.cli", "train", "--model", str(tiny_models("swa")),
                              "--data", DATA, "--out", str(run), "--steps", "500", *SMALL], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        r = train(tiny_models("swa"), run, "--resume")
        assert r.returncode != 0 and f"in use by another training process (pid {first.pid}" in r.stderr, r.stderr
        r = train(tiny_models("swa"), run, "--overwrite")
        assert r.returncode != 0 and "in use by another training process" in r.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


# 6. divergence and collapse end with a message and a non-zero exit -----------------------------------------
def test_collapse_at_a_huge_lr_exits_non_zero(tiny_models, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e3\nwarmup_steps: 1\ngrad_clip: 0\nsave_every: 0\n")
    r = train(tiny_models("swa"), tmp_path / "run", "--config", cfg, steps=30)
    end = events(tmp_path / "run")[-1]
    assert r.returncode == 1 and end["reason"] in ("stalled", "nan"), (end, r.stderr[-2000:])
    assert "Lower the learning rate" in r.stderr


# 7. bad values, paths, files: one line naming them ------------------------------------------------------
def test_out_under_a_regular_file_fails_before_the_model_loads(tmp_path):
    (tmp_path / "f").write_text("x")
    r = cli("train", "--model", tmp_path / "no-such-model", "--data", DATA, "--out", tmp_path / "f" / "run")
    assert r.returncode != 0 and "is a file" in r.stderr and "no-such-model" not in r.stderr, r.stderr


def test_full_disk_is_one_line_with_the_path(tiny_models, tmp_path):
    inject = ("import errno, os\n_replace = os.replace\n"
              "def full(src, dst, *a, **k):\n"
              "    if str(dst).endswith('.safetensors'):\n"
              "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))\n"
              "    return _replace(src, dst, *a, **k)\n"
              "os.replace = full\n")
    r = train(tiny_models("swa"), tmp_path / "run", steps=2, pre=inject)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if "No space left on device" in x]
    assert line and str(tmp_path / "run") in line[0]


def test_corrupt_checkpoint_on_resume_is_named(done_run, tmp_path):
    run = copy_run(done_run, tmp_path / "run")
    w = checkpoints.latest(run) / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    r = cli("train", "--out", run, "--resume", "--steps", 6, "--no-dashboard")
    assert r.returncode != 0 and "step-0000004" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_invalid_adapter_config_json_is_named(done_run, tiny_models, tmp_path):
    run = copy_run(done_run, tmp_path / "run")
    (run / "adapter_config.json").write_text('{"format": "mlx-mistral-lora",')
    r = cli("generate", "--model", tiny_models("swa"), "--adapter", run, "--prompt", "hi", "--max-tokens", 2)
    assert r.returncode != 0 and "adapter_config.json is not valid JSON" in r.stderr, r.stderr


@pytest.mark.parametrize("yaml_text, match", [("rank_pattern: {q_projj: 4}\n", "match no adapted module"),
                                              ("lora_rank: 100\n", "above its smaller dimension")])
def test_lora_settings_that_fit_no_module_are_refused(tiny_models, tmp_path, yaml_text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    r = cli("train", "--model", tiny_models("swa"), "--data", DATA, "--out", tmp_path / "run", "--config", cfg,
            "--seq-len", 128, "--steps", 2, "--no-dashboard")
    assert r.returncode != 0 and match in r.stderr, r.stderr


# 8. signals, temp files, the log of a resumed run, converts, shard paths ------------------------------------
def test_sigterm_saves_like_ctrl_c_and_kill_9_temps_are_cleaned(tiny_models, tmp_path, env):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mistral.cli", "train", "--model", str(tiny_models("swa")),
                             "--data", DATA, "--out", str(run), "--steps", "500", *SMALL], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and '"event": "train"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    end = events(run)[-1]
    assert end["reason"] == "terminated" and "--resume" in end["message"]
    assert (checkpoints.latest(run) / "state.json").exists()
    # what kill -9 mid-checkpoint leaves behind: a temp checkpoint folder and a temp adapter file
    (run / "checkpoints" / ".step-0000099.tmp4242").mkdir()
    (run / ".adapters.safetensors.4242.safetensors").write_bytes(b"partial")
    r = cli("train", "--out", run, "--resume", "--steps", end["step"] + 1, "--no-dashboard")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run / "checkpoints" / ".step-0000099.tmp4242").exists()
    assert not (run / ".adapters.safetensors.4242.safetensors").exists()
    kinds = [e["event"] for e in events(run)]
    assert kinds.count("resume") == 1 and kinds.index("resume") < len(kinds) - 1


def test_convert_never_overwrites_a_run(done_run, tmp_path):
    run = copy_run(done_run, tmp_path / "run")
    peft = tmp_path / "peft"
    r = cli("export", "peft", "--adapter", run, "--out", peft)
    assert r.returncode == 0, r.stderr[-3000:]
    before = (run / "adapters.safetensors").read_bytes()
    r = cli("convert", "peft-to-mlx", peft, run)
    assert r.returncode != 0 and "is not empty" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (run / "adapters.safetensors").read_bytes() == before
    r = cli("convert", "peft-to-mlx", peft, tmp_path / "new")
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_shard_index_pointing_outside_the_model_folder_is_refused(tiny_models, tmp_path, shard):
    from mlx_mistral.core.hub import weight_files

    model = tmp_path / "m"
    shutil.copytree(tiny_models("swa"), model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(ValueError, match="points outside the model folder"):
        weight_files(model)


def test_demo_replaces_only_its_own_entries(tmp_path):
    from mlx_mistral.recipes.demo import MARKER, prepare_out

    out = tmp_path / "demo_out"
    (out / "lora").mkdir(parents=True)  # what an earlier demo (before the marker file) left
    (out / "pretrain").mkdir()
    assert sorted(prepare_out(out)) == ["lora", "pretrain"] and (out / MARKER).exists()
    (out / "export").mkdir()
    (out / "notes.txt").write_text("mine")  # a marked folder: the demo's entries go, the user's stay
    assert prepare_out(out) == ["export"] and (out / "notes.txt").read_text() == "mine"
