"""`mlx-mistral upload`, tested up to the Hub API: huggingface_hub.HfApi is replaced by a recorder that keeps
what would be sent (repo id, options, every file's bytes). The model card is read back with huggingface_hub's
own `ModelCard`, the uploaded PEFT adapter is loaded by PEFT, the mlx-lm one by mlx-lm, the GGUFs are
written by gguf-py."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import mlx_mistral  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_mistral.backends.mlx import lora
from mlx_mistral.backends.mlx.loader import load
from mlx_mistral.cli import main
from mlx_mistral.core.train_config import TrainConfig, write_run_config
from mlx_mistral.recipes.upload import upload

BASE_ID = "mistralai/Mistral-7B-v0.3"


class FakeHub:
    """Stands in for `huggingface_hub.HfApi(token=...)`: records every call and the uploaded files' bytes."""

    instances: list["FakeHub"] = []

    def __init__(self, token=None, fail: Exception | None = None):
        self.token, self.fail, self.calls, self.files = token, fail, [], {}
        FakeHub.instances.append(self)

    def create_repo(self, **kw):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_branch(self, **kw):
        self.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", {k: v for k, v in kw.items() if k != "folder_path"}))
        root = Path(kw["folder_path"])
        self.files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub.instances


def make_run(model_dir: Path, run_dir: Path, data: str = "me/chat-data") -> Path:
    """A LoRA run directory: adapters (random B, so they change the logits), config.yaml, metrics.jsonl."""
    model, _ = load(model_dir, dtype="float32")
    specs = lora.apply_lora(model, targets="all-linear", rank=8, alpha=16.0, policy="gqa")
    for i, m in enumerate(lora.lora_modules(model).values()):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(i))  # (r, out)
    cfg = lora.adapter_config(specs, base_model=str(model_dir), args=model.args, targets="all-linear",
                              num_layers=-1, policy="gqa", rank=8, alpha=16.0, dropout=0.0)
    lora.save_adapters(run_dir, model, cfg)
    write_run_config(run_dir, TrainConfig(model=str(model_dir), data=data, steps=4, seq_len=64, rank_policy="gqa",
                                          lora_rank=8, lora_alpha=16.0, out=str(run_dir)))
    events = [{"event": "start", "time": 1.0, "total_steps": 4, "start_step": 0, "backend": "mlx", "device": "cpu"}]
    events += [{"event": "train", "time": 1.0 + s, "step": s, "loss": 3.0 - 0.25 * s, "lr": 1e-4, "tokens": 100 * s,
                "tokens_per_sec": 50.0, "elapsed": float(s), "peak_memory": 1e8 + s} for s in (1, 2, 3, 4)]
    events += [{"event": "eval", "time": 6.0, "step": 4, "val_loss": 2.5, "val_ppl": float(np.exp(2.5))},
               {"event": "end", "time": 7.0, "step": 4, "reason": "done", "tokens": 400, "elapsed": 5.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-0000004" / "state.json").write_text("{}")
    return run_dir


def tree_digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def card_of(files: dict):
    from huggingface_hub import ModelCard

    return ModelCard(files["README.md"].decode())


def test_upload_run_sends_peft_mlx_lm_run_files_and_card(tiny_models, tmp_path, fake_hub):
    src = tiny_models("full")
    run = make_run(src, tmp_path / "run")
    before = tree_digest(run)
    res = CliRunner().invoke(main, ["upload", str(run), "me/tiny-lora", "--private", "--revision", "v1",
                                    "--commit-message", "first adapters", "--base-model", BASE_ID, "--token", "hf_x"])
    assert res.exit_code == 0, res.output
    assert tree_digest(run) == before  # the run is not written to
    (hub,) = fake_hub
    assert hub.token == "hf_x"
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "me/tiny-lora", "repo_type": "model", "private": True, "exist_ok": True}
    assert hub.calls[1][1] == {"repo_id": "me/tiny-lora", "branch": "v1", "repo_type": "model", "exist_ok": True}
    assert hub.calls[2][1] == {"repo_id": "me/tiny-lora", "repo_type": "model", "revision": "v1",
                               "commit_message": "first adapters"}
    assert set(hub.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                              "mlx-lm/adapter_config.json", "mlx-lm/adapters.safetensors",
                              "mlx-mistral/adapter_config.json", "mlx-mistral/adapters.safetensors",
                              "mlx-mistral/config.yaml", "mlx-mistral/metrics.jsonl"}
    for name in ("adapters.safetensors", "config.yaml", "metrics.jsonl"):
        assert hub.files[f"mlx-mistral/{name}"] == (run / name).read_bytes()
    assert json.loads(res.output[res.output.index("{"):])["url"].endswith("/commit/abc")

    card = card_of(hub.files)
    assert card.data.base_model == BASE_ID and card.data.library_name == "peft"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["me/chat-data"]
    assert {"mlx-mistral", "lora", "gqa-lora"} <= set(card.data.tags)
    text = card.text
    assert "PeftModel.from_pretrained(base, 'me/tiny-lora', revision='v1')" in text
    assert "| final train loss | 2.0000 |" in text and "| best validation loss | 2.5000 (step 4) |" in text
    assert "| steps | 4 / 4 |" in text and (run / "config.yaml").read_text().strip() in text
    # each `hf download --include 'DIR/*'` of the card fetches files that the next command reads
    downloads = list(re.finditer(r"hf download .*--include (\S+) --local-dir (\S+)\n(.*)", text))
    assert len(downloads) == 3  # mlx-lm, mlx-mistral, llama.cpp
    for m in downloads:
        pattern, local, nxt = shlex.split(m.group(1))[0], shlex.split(m.group(2))[0], m.group(3)
        folder = pattern.rstrip("/*")
        assert any(f.startswith(folder + "/") for f in hub.files) and f"{local}/{folder}" in nxt

    # the uploaded PEFT files load in PEFT on the base and give our logits; mlx-lm loads its files
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = tmp_path / "downloaded"
    for name, data in hub.files.items():
        (got / name).parent.mkdir(parents=True, exist_ok=True)
        (got / name).write_bytes(data)
    ours, tok = load(src, dtype="float32")
    lora.load_adapters(ours, run)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 6)[:60]
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), got).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor([ids])).logits[0].numpy()
    ref = np.array(ours(mx.array([ids]))[0])  # (L, vocab)
    assert np.abs(ref - theirs).max() < 1e-4 and np.abs(ref).max() > 1.0

    import mlx_lm

    lm, _ = mlx_lm.load(str(src), adapter_path=str(got / "mlx-lm"))
    assert np.abs(np.array(lm(mx.array([ids]))[0]) - ref).max() <= 1e-5


def write_gguf(path: Path, adapter: bool = False):
    """A small GGUF written by gguf-py: a Q8_0-typed model header, or a LoRA adapter."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if adapter:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
    else:
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_upload_gguf_with_its_modelfile_and_a_lora_gguf(tmp_path, fake_hub):
    write_gguf(tmp_path / "m-q8_0.gguf")
    (tmp_path / "Modelfile").write_text('FROM ./m-q8_0.gguf\nPARAMETER stop "</s>"\n')
    run = upload(tmp_path / "m-q8_0.gguf", "me/tiny-gguf", base_model=BASE_ID)
    (hub,) = fake_hub
    assert set(hub.files) == {"m-q8_0.gguf", "Modelfile", "README.md"} and run["kind"] == "gguf"
    assert hub.files["m-q8_0.gguf"] == (tmp_path / "m-q8_0.gguf").read_bytes()
    assert hub.calls[0][1]["private"] is False and hub.calls[-1][1]["revision"] is None
    card = card_of(hub.files)
    assert card.data.base_model == BASE_ID and {"gguf", "llama.cpp"} <= set(card.data.tags)
    assert "llama-cli --hf-repo me/tiny-gguf --hf-file m-q8_0.gguf" in card.text
    assert "ollama create tiny-gguf -f Modelfile" in card.text and "Q8_0" in card.text
    assert "gguf_file='m-q8_0.gguf'" in card.text

    (tmp_path / "lora").mkdir()
    write_gguf(tmp_path / "lora" / "adapter.gguf", adapter=True)
    r = upload(tmp_path / "lora", "me/tiny-gguf-lora", dry_run=True)
    assert r["kind"] == "gguf-lora" and set(r["files"]) == {"adapter.gguf", "README.md"} and r["url"] is None
    assert "--lora tiny-gguf-lora/adapter.gguf" in r["card"] and len(fake_hub) == 1  # a dry run: no Hub client


def test_upload_model_directory_replaces_readme_only_in_the_upload(tmp_path, fake_hub):
    from safetensors.numpy import save_file

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    save_file({"w": np.zeros(3, np.float32)}, str(d / "model.safetensors"))
    (d / "README.md").write_text("my notes\n")
    before = tree_digest(d)
    r = upload(d, "me/tiny-hf", revision="main", commit_message=None)
    (hub,) = fake_hub
    assert tree_digest(d) == before and (d / "README.md").read_text() == "my notes\n"
    assert any("README.md" in n and "replaced" in n for n in r["notes"])
    assert set(hub.files) == {"config.json", "model.safetensors", "README.md"}
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]  # main: no branch to create
    assert hub.calls[-1][1]["commit_message"] == "Upload model with mlx-mistral"
    card = card_of(hub.files)
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert "AutoModelForCausalLM.from_pretrained('me/tiny-hf', dtype=\"auto\")" in card.text
    assert "mlx_lm.generate --model me/tiny-hf" in card.text


def test_upload_errors(tiny_models, tmp_path, fake_hub):
    with pytest.raises(ValueError, match="owner/name"):
        upload(tmp_path, "just-a-name")
    with pytest.raises(ValueError, match="not a run directory"):
        upload(tmp_path, "me/x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        upload(tmp_path / "notes.txt", "me/x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.yaml").write_text("fine_tune: full\n")
    (full / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="export hf"):
        upload(full, "me/x")
    run = make_run(tiny_models("full"), tmp_path / "run")
    import huggingface_hub

    huggingface_hub.HfApi = lambda token=None: FakeHub(token, fail=RuntimeError("401 Unauthorized"))
    with pytest.raises(ValueError, match="401 Unauthorized.*hf auth login"):
        upload(run, "me/x")
    assert not fake_hub[0].calls


def test_upload_model_directories_by_layout(tiny_models, tmp_path, fake_hub):
    """An HF-layout tiny model: transformers' commands and the window note; MLX's stacked Mixtral: mlx-lm only."""
    swa = tiny_models("swa")  # window 32
    r = upload(swa, "me/tiny-swa", dry_run=True)
    assert r["kind"] == "model" and "32-token sliding window" in r["card"] and "--ctx-size 32" in r["card"]
    assert "sliding window" not in upload(tiny_models("full"), "me/tiny-full", dry_run=True)["card"]
    from mlx_mistral.export.hf import hf_to_mlx

    hf_to_mlx(str(tiny_models("mixtral")), str(tmp_path / "mlx-mixtral"))
    r = upload(tmp_path / "mlx-mixtral", "me/tiny-mixtral", dry_run=True)
    assert r["kind"] == "mlx-model" and "transformers does not load them" in r["card"]
    assert card_of({"README.md": r["card"].encode()}).data.library_name == "mlx" and not fake_hub
