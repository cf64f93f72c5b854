"""Hub dataset ids (JSONL and Parquet, split, revision) read offline from a Hub-layout cache built here, and
weighted mixes of several sources (`datasets:`): deterministic, recorded, resumable, cached.

The cache layout is the one huggingface_hub's `snapshot_download` reads when offline
(huggingface_hub/_snapshot_download.py, file_download.repo_folder_name): `<HF_HUB_CACHE>/datasets--owner--name/
refs/<revision>` holds the commit hash, `snapshots/<commit>/<path>` are symlinks into `blobs/<hash>`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hub_cache import offline_hub, publish

from mlx_mistral.cli import main
from mlx_mistral.core.data import MissingSplit, load_dataset
from mlx_mistral.core.hub import dataset_split_files
from mlx_mistral.core.mix import load_split, mix_indices
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path
from mlx_mistral.core.train_config import TrainConfig

TOKENIZER = bundled_tokenizer_path("mistral_instruct_tokenizer_240323.model.v3")


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"It is {2 * i}."}]}


TRAIN = [chat(i) for i in range(8)] + [{"prompt": "Name a colour:", "completion": " Blue."}, {"text": "Plain."}]
VALID = [chat(i) for i in range(100, 103)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def parquet(records) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in records for k in r))  # one column per key: nulls where a row lacks it
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), buf)
    return buf.getvalue()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline Hub cache in tmp (env for child processes, constants for this one, read at import)."""
    cache = offline_hub(tmp_path, monkeypatch)
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "tokenized"))
    return cache


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def local_dataset(d: Path) -> Path:
    """A dataset directory with the TRAIN and VALID records."""
    d.mkdir()
    (d / "train.jsonl").write_bytes(jsonl(TRAIN))
    (d / "valid.jsonl").write_bytes(jsonl(VALID))
    return d


def same_docs(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_split_files_follow_the_hub_naming(tmp_path):
    for rel in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                "data/validation-00000-of-00001.parquet", "train_sft.jsonl", "test.jsonl", "README.md",
                ".cache/train.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    names = lambda split, fmt=None: [str(p.relative_to(tmp_path)) for p in dataset_split_files(tmp_path, split, fmt)]
    assert names("train") == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert names("valid") == ["data/validation-00000-of-00001.parquet"]
    assert names("train_sft") == ["train_sft.jsonl"] and names("test") == ["test.jsonl"]
    assert names("train", "jsonl") == []
    other = tmp_path / "plain"
    other.mkdir()
    (other / "data.jsonl").write_text("")
    assert [p.name for p in dataset_split_files(other, "train")] == ["data.jsonl"]  # no split names: all train
    assert dataset_split_files(other, "valid") == []


def test_hub_id_reads_the_splits_and_revisions_offline(tmp_path, hub, tok):
    local = local_dataset(tmp_path / "local")
    main_commit = publish(hub, "org/chats", {"train.jsonl": jsonl(TRAIN), "valid.jsonl": jsonl(VALID)})
    v2 = publish(hub, "org/chats", {"data/train.jsonl": jsonl(TRAIN[:3])}, revision="v2")
    for split in ("train", "valid"):
        want, _, _ = load_dataset(local, tok, split, cache=False)
        got, _, stats = load_dataset("org/chats", tok, split)
        assert same_docs(got, want) and stats["revision"] == main_commit and stats["dataset"] == "org/chats"
    want, _, _ = load_dataset(local, tok, "train", cache=False)
    for spec in ("org/chats@v2", f"org/chats@{v2}"):  # a tag, and a commit hash
        got, _, stats = load_dataset(spec, tok, "train")
        assert same_docs(got, want[:3]) and stats["revision"] == v2
    with pytest.raises(MissingSplit, match=r"no files for split 'test' \(splits found: train, valid"):
        load_dataset("org/chats", tok, "test")
    with pytest.raises(ValueError, match="could not fetch dataset 'org/absent'.*HF_HUB_OFFLINE"):
        load_dataset("org/absent", tok, "train")


def test_parquet_shards_read_like_the_jsonl_they_hold(tmp_path, hub, tok):
    (tmp_path / "train.jsonl").write_bytes(jsonl(TRAIN))
    want, want_masks, _ = load_dataset(tmp_path / "train.jsonl", tok, cache=False)
    publish(hub, "org/pq", {"data/train-00000-of-00002.parquet": parquet(TRAIN[:5]),
                            "data/train-00001-of-00002.parquet": parquet(TRAIN[5:]),
                            "data/validation-00000-of-00001.parquet": parquet(VALID)})
    got, masks, stats = load_dataset("org/pq", tok, "train")
    assert same_docs(got, want) and same_docs(masks, want_masks)
    assert stats["formats"] == {"chat": 8, "completion": 1, "text": 1} and not stats["cached"]
    again, _, stats = load_dataset("org/pq", tok, "train")  # each file from the tokenized cache
    assert same_docs(again, want) and stats["cached"]
    with pytest.raises(MissingSplit):
        load_dataset("org/pq", tok, "train", fmt="jsonl")


def test_parquet_without_pyarrow_names_the_extra(tmp_path, tok, monkeypatch):
    (tmp_path / "train.parquet").write_bytes(parquet(TRAIN))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"needs pyarrow: pip install 'mlx-mistral\[parquet\]'"):
        load_dataset(tmp_path / "train.parquet", tok, cache=False)


def test_data_inspect_takes_a_hub_id(hub):
    commit = publish(hub, "org/chats", {"train.jsonl": jsonl(TRAIN)})
    r = CliRunner().invoke(main, ["data", "inspect", "org/chats", "--model", str(TOKENIZER), "--seq-len", "64"])
    assert r.exit_code == 0, r.output
    assert f"Hubdatasetorg/chats,commit{commit}:train.jsonl" in "".join(r.output.split())  # rich may wrap it
    assert "documents 10" in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["data", "inspect", "org/chats", "--model", str(TOKENIZER), "--split", "valid"])
    assert r.exit_code != 0 and "no files for split 'valid'" in r.output


def test_mix_indices_are_weighted_and_seeded():
    a = mix_indices([10, 10, 3], [2.0, 0.5, 1.0], seed=0)
    assert [len(x) for x in a] == [20, 5, 3]
    assert np.array_equal(np.bincount(a[0], minlength=10), np.full(10, 2))  # every document twice
    assert len(set(a[1].tolist())) == 5  # a half, without repeats
    assert all(np.array_equal(x, y) for x, y in zip(a, mix_indices([10, 10, 3], [2.0, 0.5, 1.0], seed=0)))
    assert not np.array_equal(a[1], mix_indices([10, 10, 3], [2.0, 0.5, 1.0], seed=1)[1])


def test_datasets_key_is_normalized_and_checked():
    cfg = TrainConfig.from_dict({"datasets": ["some/dir", {"path": "org/x", "weight": "0.5", "split": "train_sft",
                                                            "valid_split": None, "format": "parquet"}]})
    assert cfg.datasets[0] == {"path": "some/dir", "split": "train", "valid_split": "valid", "revision": None,
                               "weight": 1.0, "format": None}
    assert cfg.datasets[1]["weight"] == 0.5 and cfg.datasets[1]["valid_split"] is None
    for bad, needle in (([{"path": "a", "weight": 0}], "'weight' must be a number > 0"),
                        ([{"path": "a", "shards": 2}], "unknown field"), ([{"split": "train"}], "needs 'path'"),
                        ([{"path": "a", "format": "csv"}], "'format'"), ("a", "must be a list")):
        with pytest.raises(ValueError, match=needle):
            TrainConfig.from_dict({"datasets": bad})
    with pytest.raises(ValueError, match="'data' and 'datasets' conflict"):
        TrainConfig.from_dict({"data": "x", "datasets": ["y"]})


def test_load_split_mixes_sources_with_their_weights(tmp_path, hub, tok):
    local = local_dataset(tmp_path / "local")
    commit = publish(hub, "org/pq", {"train-0.parquet": parquet([chat(i) for i in range(200, 210)])})
    entries = TrainConfig.from_dict({"datasets": [{"path": str(local), "weight": 2},
                                                  {"path": "org/pq", "weight": 0.5, "format": "parquet"}]}).datasets
    docs, masks, stats = load_split(entries, tok, "train", seed=3)
    a, _, _ = load_dataset(local, tok, "train")
    b, _, _ = load_dataset("org/pq", tok, "train")
    assert same_docs(docs[:20], a + a)
    picked = mix_indices([10, 10], [2.0, 0.5], seed=3)[1]
    assert same_docs(docs[20:], [b[i] for i in picked])
    assert [(s["n_docs"], s["n_used"]) for s in stats["sources"]] == [(10, 20), (10, 5)]
    assert stats["sources"][1]["revision"] == commit
    val, _, vstats = load_split(entries, tok, "valid", seed=3)  # the Hub source has no valid split: skipped
    assert len(val) == len(VALID) and len(vstats["sources"]) == 1


def test_a_mixed_run_resumes_exactly_and_records_its_sources(tmp_path, hub, tiny_models):
    local = local_dataset(tmp_path / "local")
    commit = publish(hub, "org/pq", {"data/train-00000-of-00001.parquet": parquet([chat(i) for i in range(50, 62)])})
    from safetensors.numpy import load_file

    from mlx_mistral.recipes.finetune import finetune

    def run(out, steps, resume=False):
        events = []
        cfg = dict(model=str(tiny_models("swa")), out=str(out), backend="mlx", steps=steps, seq_len=48,
                   batch_size=2, eval_every=2, save_every=2, warmup_steps=1, lr=1e-3, compile=False, seed=5,
                   datasets=[{"path": str(local), "weight": 1.5}, {"path": "org/pq", "weight": 2}])
        end = finetune(cfg, resume=resume, callbacks=[events.append])
        return end, events

    end_a, ev_a = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    end_b, ev_b = run(tmp_path / "b", 4, resume=True)
    loss = lambda ev: {e["step"]: e["loss"] for e in ev if e["event"] == "train"}
    assert loss(ev_b) == {s: v for s, v in loss(ev_a).items() if s > 2}  # the same rows, the same numbers
    wa = load_file(tmp_path / "a" / "adapters.safetensors")
    wb = load_file(tmp_path / "b" / "adapters.safetensors")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    start = next(e for e in ev_b if e["event"] == "start")
    assert [(s["path"], s["weight"], s["n_used"], s["cached"]) for s in start["data_sources"]] == [
        (str(local), 1.5, 15, True), ("org/pq", 2.0, 24, True)]  # the resumed run read the tokenized cache
    assert start["data_sources"][1]["revision"] == commit
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert [(d["path"], d["weight"]) for d in saved["datasets"]] == [(str(local), 1.5), ("org/pq", 2.0)]
