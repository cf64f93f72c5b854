"""`mlx-mistral plan`: the breakdown, the attention path, the longest row that fits, defaults that fit a 7B
without a config (and said), advice naming only plan's own flags, and a Hub id read from its config.json
alone, offline, from a Hub-layout cache built here (`<HF_HUB_CACHE>/models--owner--name/refs/main` holds
the commit, `snapshots/<commit>/<file>` links into `blobs/`)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from hub_cache import offline_hub, publish

from mlx_mistral.cli import main
from mlx_mistral.cli.train import plan
from mlx_mistral.core.config import BUNDLED

FLAGS = {o for p in plan.params for o in (*p.opts, *p.secondary_opts)}


def run(*args) -> str:
    r = CliRunner().invoke(main, ["plan", *args])
    assert r.exit_code == 0, r.output
    return r.output


def named_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def test_no_config_no_flags_plans_a_7b_at_settings_that_fit_and_says_which():
    out = run("--model", "mistral-7b-v0.3", "--memory", "16GB")
    chosen = next(ln for ln in out.splitlines() if ln.startswith("chosen to fit"))
    for flag in ("--dtype bfloat16", "--batch-size 1", "--grad-checkpoint", "--quantize 4"):
        assert flag in chosen, out
    assert "weights at 4 bits" in out and "fits in 16GB" in out and "NOT" not in out
    assert "attention blockwise, query blocks of 512 (auto)" in out  # 2048 tokens: auto takes the blocks
    m = re.search(r"longest row that fits at batch 1, checkpointing on: --seq-len (\d+)", out)
    assert m and int(m.group(1)) >= 8192, out
    assert named_flags(out) <= FLAGS, named_flags(out) - FLAGS


def test_a_budget_that_holds_the_bf16_base_keeps_it_unquantized():
    out = run("--model", "mistral-7b-v0.1", "--memory", "32GB")
    assert "weights at bfloat16" in out and "--quantize" not in out


def test_flags_set_the_settings_and_the_attention_path():
    out = run("--model", "mistral-7b-v0.1", "--memory", "24GB", "--seq-len", "32768", "--batch-size", "1",
              "--quantize", "4", "--grad-checkpoint", "--dtype", "bfloat16", "--attention", "dense")
    assert "chosen to fit" not in out
    assert "batch 1 x seq 32768, checkpointing on, bfloat16 activations, attention dense" in out
    assert "does NOT fit" in out
    m = re.search(r"longest row that fits at batch 1, checkpointing on: --seq-len (\d+) \([\d.]+ GB, attention "
                  r"dense\); with --attention blockwise --seq-len (\d+)", out)
    assert m and int(m.group(1)) <= 4096 and int(m.group(2)) >= 4 * int(m.group(1)), out
    blockwise = run("--model", "mistral-7b-v0.1", "--memory", "32GB", "--seq-len", "32768", "--quantize", "4",
                    "--attention", "blockwise", "--attention-block", "256")
    assert "attention blockwise, query blocks of 256:" in blockwise and "fits in 32GB" in blockwise
    total = float(re.search(r"total\s+([\d.]+) GB", blockwise).group(1))
    assert total <= 22


def test_when_nothing_fits_the_advice_names_only_plan_flags():
    out = run("--model", "mistral-7b-v0.3", "--memory", "16GB", "--seq-len", "16384", "--attention", "dense",
              "--no-grad-checkpoint", "--batch-size", "4", "--dtype", "float32")
    advice = next(ln for ln in out.splitlines() if ln.startswith("no row of 512"))
    assert {"--grad-checkpoint", "--batch-size", "--attention"} <= named_flags(advice)
    assert named_flags(out) <= FLAGS, named_flags(out) - FLAGS
    tiny = run("--model", "mistral-7b-v0.3", "--memory", "2GB")
    assert "nothing fits at any batch size" in tiny and named_flags(tiny) <= FLAGS


def test_with_a_config_its_settings_are_planned_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seq_len: 4096\nbatch_size: 2\nquantize: 4\ngrad_checkpoint: false\ndtype: bfloat16\n")
    out = run("--model", "mistral-7b-v0.3", "--memory", "64GB", "--config", str(cfg))
    assert "chosen to fit" not in out and "batch 2 x seq 4096, checkpointing off" in out
    out = run("--model", "mistral-7b-v0.3", "--memory", "64GB", "--config", str(cfg), "--batch-size", "1")
    assert "batch 1 x seq 4096, checkpointing off" in out


# ---- a Hub id: config.json alone ------------------------------------------------------------------------------
@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline Hub cache; snapshot_download (what fetches weights) fails; hf_hub_download is recorded."""
    import huggingface_hub

    cache = offline_hub(tmp_path, monkeypatch)

    def no_snapshot(*a, **k):
        raise AssertionError(f"plan must not download a snapshot: {a} {k}")

    fetched = []
    real = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kw):
        fetched.append(filename)
        return real(repo_id, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return cache, fetched


def test_a_hub_id_is_planned_from_its_config_json_alone(hub):
    cache, fetched = hub
    config = (BUNDLED / "mistral-7b-v0.3.json").read_bytes()
    publish(cache, "mistralai/Mistral-7B-v0.3", {"config.json": config, "model-00001-of-00003.safetensors": b"x" * 64,
                                                 "tokenizer.model.v3": b"t"}, kind="models")
    out = run("--model", "mistralai/Mistral-7B-v0.3", "--memory", "16GB")
    assert fetched == ["config.json"]
    assert out == run("--model", "mistral-7b-v0.3", "--memory", "16GB").replace(
        "mistral-7b-v0.3 (", "mistralai/Mistral-7B-v0.3 (", 1)


def test_a_mistral_native_hub_repo_is_planned_from_params_json(hub):
    cache, fetched = hub
    params = (b'{"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, '
              b'"n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0}')
    publish(cache, "mistralai/native", {"params.json": params, "consolidated.safetensors": b"x" * 64}, kind="models")
    out = run("--model", "mistralai/native", "--memory", "16GB")
    assert fetched == ["config.json", "params.json"]
    assert "7.25B parameters, window none" in out and "(the checkpoint names none)" in out


def test_a_hub_id_missing_from_the_offline_cache_says_what_was_tried(hub):
    r = CliRunner().invoke(main, ["plan", "--model", "org/absent", "--memory", "16GB"])
    assert r.exit_code != 0
    assert "could not fetch the config of 'org/absent'" in r.output and "HF_HUB_OFFLINE" in r.output
