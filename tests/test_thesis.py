"""The thesis experiment (bench/thesis): its metrics as pure functions, per-document losses against
transformers far past the window, the corpus split, and the miniature run end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx_mistral.backends.mlx  # noqa: F401  (first: loads OpenBLAS before mlx.core)
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package

from bench.thesis import corpus as C  # noqa: E402
from bench.thesis import metrics as M  # noqa: E402
from bench.thesis.report import aggregate  # noqa: E402


# ---- pure functions --------------------------------------------------------------------------------------
def test_position_edges_double_from_the_window():
    assert M.position_edges(128, 0) == [0, 128]
    assert M.position_edges(128, 128) == [0, 128]
    assert M.position_edges(128, 129) == [0, 128, 256]
    assert M.position_edges(128, 4000) == [0, 128, 256, 512, 1024, 2048, 4096]
    assert [M.bucket_label(a, b, 128) for a, b in [(0, 128), (128, 256), (256, 512), (512, 1024)]] == \
        ["0–W", "W–2W", "2W–4W", "4W–8W"]
    with pytest.raises(ValueError):
        M.position_edges(0, 10)


def test_bucket_losses_by_hand():
    # W = 2: buckets [0,2) [2,4) [4,8)
    a = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]  # 6 positions
    b = [2.0, 4.0, 6.0]
    got = M.bucket_losses([a, b], window=2)
    assert [(g["label"], g["lo"], g["hi"], g["tokens"]) for g in got] == \
        [("0–W", 0, 2, 4), ("W–2W", 2, 4, 3), ("2W–4W", 4, 8, 2)]
    assert [g["loss"] for g in got] == [pytest.approx(10 / 4), pytest.approx(18 / 3), pytest.approx(20 / 2)]


def test_perplexity_is_token_weighted():
    assert M.perplexity([[1.0, 1.0, 1.0], [4.0]]) == pytest.approx(math.exp(7 / 4))
    with pytest.raises(ValueError):
        M.perplexity([[]])


def test_mean_spread():
    s = M.mean_spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert M.mean_spread([5.0])["std"] == 0.0
    with pytest.raises(ValueError):
        M.mean_spread([1.0, float("nan")])


def test_reduced_vocabulary_keeps_specials_and_most_frequent():
    counts = np.array([50, 40, 30, 1, 9, 9, 100, 0])  # old ids 0..7; 0/1/2 are unk/bos/eos
    vocab = C.build_vocab(counts, 5)
    assert vocab.tolist() == [0, 1, 2, 6, 4]  # then by count desc, ties by lower id (4 before 5)
    lut = C.remap_table(vocab, len(counts))
    assert lut.tolist() == [0, 1, 2, 0, 4, 0, 3, 0]  # 3, 5, 7 fall out -> unk
    with pytest.raises(ValueError):
        C.build_vocab(counts, 9)


def test_split_is_by_package_and_stable():
    assert C.package_of("email/mime/text.py") == "email" and C.package_of("json.py") == "json"
    assert C.unit_hash("email", 0) == C.unit_hash("email", 0) != C.unit_hash("email", 1)
    files = C.source_files()
    assert files and not any("/test/" in p.as_posix() or "site-packages" in p.as_posix() for p in files)


# ---- per-document losses against transformers -----------------------------------------------------------
def test_document_losses_match_transformers_far_past_the_window(tiny_models):
    from transformers import AutoModelForCausalLM

    from mlx_mistral.backends.mlx.loader import load

    path = tiny_models("swa")
    model, _ = load(path)
    w = model.args.sliding_window
    doc = np.random.default_rng(0).integers(3, 32000, 5 * w + 7)  # 5+ windows, chunks not window-aligned
    ours = M.document_losses(model, doc, chunk=w + 5)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref_model(torch.tensor(doc)[None]).logits[0]
        ref = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(doc[1:]), reduction="none").numpy()
    assert ours.shape == (len(doc) - 1,)
    assert np.abs(ours - ref).max() < 1e-4
    assert ref.std() > 0.05


# ---- the miniature, end to end ----------------------------------------------------------------------------
def test_miniature_experiment_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "bench.thesis.run", "--config", "bench/thesis/config.yaml", "--mini",
           "--out", str(out), "--cache", str(cache)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    import yaml

    approaches = yaml.safe_load((ROOT / "bench/thesis/config.yaml").read_text())["approaches"]
    names = [a["name"] for a in approaches]
    assert {"generic", "mistral-aware"} <= set(names)
    seeds = res["seeds"]
    assert len(seeds) >= 3
    assert sorted((r["approach"], r["seed"]) for r in res["runs"]) == sorted((n, s) for n in names for s in seeds)
    assert [s["approach"] for s in res["summaries"]] == names

    window = res["config"]["model"]["sliding_window"]
    longest = max(int(n) for n in [res["corpus"]["eval"]["max_len"]])
    edges = M.position_edges(window, longest - 1)
    for r in res["runs"]:
        for key in ("eval_ppl", "eval_loss", "latency_unfused_ms", "latency_fused_ms", "peak_memory_gb",
                    "tokens_per_sec", "final_train_loss"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["approach"], key, r[key])
        assert r["trainable_params"] > 0 and r["train_tokens"] > 0
        assert [(b["lo"], b["hi"]) for b in r["buckets"]] == list(zip(edges[:-1], edges[1:]))
        assert r["buckets"][0]["label"] == "0–W" and all(math.isfinite(b["loss"]) for b in r["buckets"])
        assert sum(b["tokens"] for b in r["buckets"]) == res["corpus"]["eval"]["tokens"] - res["corpus"]["eval"]["docs"]
        assert r["fuse_max_abs_diff"] < 1e-4  # fusing the adapter changes nothing but speed
    by = {r["approach"]: r for r in res["runs"] if r["seed"] == seeds[0]}
    # the rank policy is what the config says: GQA k/v ranks are smaller, so fewer trainable parameters
    assert by["mistral-aware"]["trainable_params"] < by["generic"]["trainable_params"]
    # the summaries are the runs, aggregated
    again = aggregate(res["runs"], approaches)
    assert again[0]["eval_ppl"]["mean"] == pytest.approx(res["summaries"][0]["eval_ppl"]["mean"])
    assert (out / "results.md").read_text().count("\n| ") >= len(names)

    # a rerun reuses the cached base and reproduces the quality numbers exactly (fp32, CPU, seeded)
    out2 = tmp_path / "out2"
    proc = subprocess.run(cmd[:-4] + ["--out", str(out2), "--cache", str(cache), "--seeds", str(seeds[0])],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["base_info"]["reused"] and not res["base_info"]["reused"]
    assert res2["base"]["eval_ppl"] == res["base"]["eval_ppl"]
    for r2 in res2["runs"]:
        r = next(x for x in res["runs"] if (x["approach"], x["seed"]) == (r2["approach"], r2["seed"]))
        assert (r2["eval_ppl"], r2["final_train_loss"], r2["buckets"]) == \
            (r["eval_ppl"], r["final_train_loss"], r["buckets"])


def test_configs_validate_and_unknown_keys_are_named(tmp_path):
    from bench.thesis.run import load_experiment

    for name in ("config.yaml", "mac.yaml"):
        full = load_experiment(ROOT / "bench/thesis" / name)
        mini = load_experiment(ROOT / "bench/thesis" / name, mini=True)
        assert mini["model"]["hidden_size"] < full["model"]["hidden_size"]
        assert full["finetune"]["seq_len"] >= 4 * full["model"]["sliding_window"]
    text = (ROOT / "bench/thesis/config.yaml").read_text().replace("  lr: 2.0e-3\n", "  lr: 2.0e-3\n  lrr: 1\n", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match="'pretrain' has unknown key.*lrr"):
        load_experiment(bad)
