"""`report_to: [wandb, tensorboard]`: a real run's metrics read back from the files the loggers wrote, with
their own packages' protobufs (wandb offline: `run-*.wandb` records as `wandb_internal_pb2.Record`;
tensorboardX: TFRecord event files as `event_pb2.Event`), framing and checksums verified; a missing
package is an error naming the extra.

wandb 0.31 ships no reader for its `.wandb` files; they are the LevelDB log format
(github.com/google/leveldb/blob/main/doc/log_format.md) after a 7-byte header (":W&B", 0xBEE1, version):
32 KiB blocks of records `crc32 (of type byte + data) u32, length u16, type u8 (FULL/FIRST/MIDDLE/LAST)`.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

from mlx_mistral.ui.loggers import check_reporters


def read_wandb(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), (ident, magic, version)
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def read_tensorboard(logdir: Path) -> list:
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(b: bytes) -> int:
        c = crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events = []
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (length,), (len_crc,) = struct.unpack("<Q", data[pos:pos + 8]), struct.unpack("<I", data[pos + 8:pos + 12])
            assert masked(data[pos:pos + 8]) == len_crc
            body = data[pos + 12:pos + 12 + length]
            assert masked(body) == struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0]
            e = event_pb2.Event()
            e.ParseFromString(body)
            events.append(e)
            pos += 16 + length
    return events


@pytest.mark.parametrize("name, module, extra", [("wandb", "wandb", "wandb"),
                                                 ("tensorboard", "tensorboardX", "tensorboard")])
def test_a_missing_package_names_the_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ValueError, match=rf"report_to: {name} needs the '{module}' package: pip install "
                                         rf"'mlx-mistral\[{extra}\]'"):
        check_reporters([name])
    from mlx_mistral.recipes.finetune import finetune

    with pytest.raises(ValueError, match=rf"mlx-mistral\[{extra}\]"):  # before the model is even looked at
        finetune(dict(model="no/such-model", data="no/such-data", report_to=[name]))


def test_a_run_reports_to_wandb_and_tensorboard(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i} of the data, long enough to train on."}) + "\n"
                            for i in range(12)))
    from mlx_mistral.recipes.finetune import finetune

    run = tmp_path / "run"
    end = finetune(dict(model=str(tiny_models("swa")), data=str(data), out=str(run), backend="mlx", steps=3,
                        seq_len=32, batch_size=2, eval_every=3, val_fraction=0.2, compile=False, lr=1e-3,
                        report_to=["wandb", "tensorboard"], wandb_project="tests"))
    assert end["reason"] == "done"
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = {e["step"]: e["loss"] for e in events if e["event"] == "train"}
    want_val = {e["step"]: e["val_loss"] for e in events if e["event"] == "eval"}
    assert sorted(want) == [1, 2, 3] and list(want_val) == [3]

    # TensorBoard: scalars by tag and step, the config as text
    tb = read_tensorboard(run / "tensorboard")
    got = {(v.tag, e.step): v.simple_value for e in tb for v in e.summary.value if v.HasField("simple_value")}
    assert {s: got[("train/loss", s)] for s in want} == pytest.approx(want, rel=1e-6)  # float32 in the file
    assert got[("eval/loss", 3)] == pytest.approx(want_val[3], rel=1e-6)
    texts = [v.tensor.string_val[0].decode() for e in tb for v in e.summary.value if v.tag.startswith("config")]
    assert texts and '"report_to"' in texts[0] and '"wandb_project": "tests"' in texts[0]

    # Weights & Biases (offline): history rows by step, config and summary
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = (run / "wandb_run_id").read_text().strip()
    assert [f.name for f in files] == [f"run-{run_id}.wandb"]
    records = read_wandb(files[0])
    def items(updates) -> dict:  # a key with "/" is written as nested_key parts
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in updates}

    history = {r.history.step.num: items(r.history.item) for r in records if r.HasField("history")}
    assert {s: history[s]["train/loss"] for s in want} == want  # JSON: the float64 exactly
    assert history[3]["eval/loss"] == want_val[3]
    config = {}
    for r in records:  # the run record carries the config given to wandb.init; config records update it
        config.update(items(r.run.config.update) if r.HasField("run") else
                      items(r.config.update) if r.HasField("config") else {})
    assert config["lr"] == 1e-3 and config["report_to"] == ["wandb", "tensorboard"]
    assert config["start"]["dtype"] == "float32" and config["start"]["backend"] == "mlx"
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(items(r.summary.update))
    assert summary["final_loss"] == end["final_loss"] and summary["reason"] == "done"
    run_records = [r.run for r in records if r.HasField("run")]
    assert run_records[0].run_id == run_id and run_records[0].project == "tests"
