"""Adapters <-> PEFT and mlx-lm, judged by `peft.PeftModel` and `mlx_lm.load` themselves."""

from __future__ import annotations

import json
import shutil

import mlx_mistral  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from mlx_mistral.backends.mlx import lora
from mlx_mistral.export.adapters import export_mlx_lm, export_peft, import_mlx_lm, import_peft
from mlx_mistral.backends.mlx.loader import load


def make_run(model_dir, run_dir, policy="uniform", rank=8, alpha=16.0, targets="all-linear", steps=3, num_layers=-1):
    """Train a few LoRA steps on random tokens and save a run directory (the format of issue 4)."""
    model, _ = load(model_dir, dtype="float32")
    specs = lora.apply_lora(model, targets=targets, num_layers=num_layers, rank=rank, alpha=alpha, policy=policy)
    opt = optim.Adam(learning_rate=2e-2)
    tokens = mx.array(np.random.default_rng(0).integers(3, 1000, (2, 48)))

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        _, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    cfg = lora.adapter_config(specs, base_model=str(model_dir), args=model.args, targets=targets,
                              num_layers=num_layers, policy=policy, rank=rank, alpha=alpha, dropout=0.0)
    lora.save_adapters(run_dir, model, cfg)
    return run_dir


def ours_with_adapter(model_dir, run_dir):
    model, tok = load(model_dir, dtype="float32")
    lora.load_adapters(model, run_dir)
    return model, tok


def prompt_ids(tok, n=100):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    return tok.encode(text)[:n]


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("policy", ["uniform", "gqa"])
def test_peft_export_matches_peft_logits(tiny_models, tmp_path, policy):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = tiny_models("swa")
    run = make_run(src, tmp_path / "run", policy=policy)
    r = export_peft(run, tmp_path / "peft")
    pcfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if policy == "gqa":  # 4 heads, 2 kv heads: k/v get rank 8 * 2 / 4 = 4, alpha 8
        assert pcfg["rank_pattern"] == {"k_proj": 4, "v_proj": 4} and pcfg["alpha_pattern"] == {"k_proj": 8.0, "v_proj": 8.0}
    else:
        assert r["rank_pattern"] == {} and pcfg["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    model, tok = ours_with_adapter(src, run)
    ids = prompt_ids(tok)  # 100 tokens: past the 32-token window three times
    ours = np.array(model(mx.array([ids]))[0])
    theirs = torch_logits(peft_model, ids)
    assert np.abs(ours - theirs).max() < 1e-4
    plain = np.array(load(src, dtype="float32")[0](mx.array([ids]))[0])
    assert np.abs(plain - ours).max() > 1e-2  # the trained adapter changes the logits: not a vacuous match


def test_peft_import_round_trip(tiny_models, tmp_path):
    src = tiny_models("swa")
    run = make_run(src, tmp_path / "run", policy="gqa")
    export_peft(run, tmp_path / "peft")
    args = load(src)[0].args
    cfg = import_peft(tmp_path / "peft", tmp_path / "back", args)
    orig = json.loads((run / "adapter_config.json").read_text())
    assert cfg["modules"] == orig["modules"] and cfg["rank_policy"] == "gqa"
    assert cfg["base_fingerprint"] == orig["base_fingerprint"]
    a, b = mx.load(str(run / "adapters.safetensors")), mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k


def test_import_adapter_made_by_peft(tiny_models, tmp_path):
    """A PEFT adapter PEFT wrote itself (rank_pattern, alpha_pattern, rsLoRA off) gives PEFT's logits here."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    src = tiny_models("swa")
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                      rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 5}, task_type="CAUSAL_LM")
    pm = get_peft_model(base, pcfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft")
    model, tok = load(src, dtype="float32")
    cfg = import_peft(tmp_path / "peft", tmp_path / "run", model.args)
    assert cfg["modules"]["model.layers.1.self_attn.k_proj"]["rank"] == 2
    assert cfg["modules"]["model.layers.0.mlp.down_proj"]["alpha"] == 5.0
    lora.load_adapters(model, tmp_path / "run")
    ids = prompt_ids(tok)
    assert np.abs(np.array(model(mx.array([ids]))[0]) - torch_logits(pm.eval(), ids)).max() < 1e-4


def test_mlx_lm_adapter_round_trip(tiny_models, tmp_path):
    import mlx_lm

    src = tiny_models("full")  # mlx-lm runs Mistral without its window: compare on a window-less model
    run = make_run(src, tmp_path / "run", targets=["q_proj", "v_proj"], num_layers=1)
    export_mlx_lm(run, tmp_path / "mlxlm")
    theirs_model, _ = mlx_lm.load(str(src), adapter_path=str(tmp_path / "mlxlm"))
    model, tok = ours_with_adapter(src, run)
    ids = mx.array([prompt_ids(tok)])
    assert np.abs(np.array(model(ids)) - np.array(theirs_model(ids))).max() <= 1e-5
    cfg = import_mlx_lm(tmp_path / "mlxlm", tmp_path / "back", model.args)
    orig = json.loads((run / "adapter_config.json").read_text())
    assert cfg["modules"] == orig["modules"] and cfg["num_layers"] == 1
    a, b = mx.load(str(run / "adapters.safetensors")), mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a) and a.keys() == b.keys()


def mlx_lm_rope(model):
    """Our model rotating as mlx-lm does (`mx.fast.rope(base=theta)`) instead of with transformers' exact
    frequencies (they differ by ~1e-5 in logits at 100 positions), so a comparison isolates the adapters."""
    theta = model.args.rope_theta

    def apply(x, freqs, positions, offset):
        assert positions is None
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=theta, scale=1.0, offset=offset)

    return apply


def mlx_lm_vs_ours(src, run, out, ids):
    """max |logits| difference between mlx-lm's own loader on our export and our model on the run."""
    import mlx_lm

    from mlx_mistral.backends.mlx import model as mlx_model

    theirs_model, _ = mlx_lm.load(str(src), adapter_path=str(out))
    model, _ = ours_with_adapter(src, run)
    exact = mlx_model.apply_rope
    mlx_model.apply_rope = mlx_lm_rope(model)
    try:
        ours = np.array(model(mx.array([ids])))  # (1, L, vocab)
    finally:
        mlx_model.apply_rope = exact
    theirs = np.array(theirs_model(mx.array([ids])))  # (1, L, vocab)
    return float(np.abs(ours - theirs).max()), float(np.abs(ours).max())


@pytest.mark.parametrize("kind, n", [("full", 100), ("swa", 32), ("mixtral", 32)])  # mlx-lm drops the window
def test_mlx_lm_export_of_gqa_policy_matches_mlx_lm(tiny_models, tmp_path, kind, n):
    src = tiny_models(kind)
    if kind == "mixtral":  # mlx-lm's Mixtral reads only a top-level rope_theta (default 1e6), which Hub
        src = tmp_path / "base"  # checkpoints carry and transformers 5 writes under rope_parameters
        shutil.copytree(tiny_models(kind), src)
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(cfg, rope_theta=cfg["rope_parameters"]["rope_theta"])))
    run = make_run(src, tmp_path / "run", policy="gqa")  # q/o/MLP rank 8, k/v rank 4 (4 heads, 2 kv heads)
    ranks = {m["rank"] for m in json.loads((run / "adapter_config.json").read_text())["modules"].values()}
    assert ranks == {4, 8}
    r = export_mlx_lm(run, tmp_path / "mlxlm")
    assert (r["rank"], r["padded"], r["scale_folded"], r["zero_modules"]) == (8, 4, 0, 0)  # 2 layers x k, v
    assert r["num_layers"] == -1
    tok = load(src)[1]
    diff, size = mlx_lm_vs_ours(src, run, tmp_path / "mlxlm", prompt_ids(tok, n))
    assert diff <= 1e-5 and size > 1.0
    # back: the ranks, alphas and tensors of the run
    back = import_mlx_lm(tmp_path / "mlxlm", tmp_path / "back", load(src)[0].args)
    orig = json.loads((run / "adapter_config.json").read_text())
    assert back["modules"] == orig["modules"] and back["rank_policy"] == "gqa"
    a, b = mx.load(str(run / "adapters.safetensors")), mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_mlx_lm_export_folds_scales_and_fills_holes(tiny_models, tmp_path):
    """Per-module alphas (one scale differs) and modules missing in one layer: still mlx-lm's same function."""
    src = tiny_models("full")
    run = make_run(src, tmp_path / "run", policy="gqa", targets=["q_proj", "k_proj", "v_proj"])
    cfg_path = run / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules"]["model.layers.1.self_attn.v_proj"]["alpha"] = 3.0  # scale 0.75, the others 2.0
    del cfg["modules"]["model.layers.0.self_attn.q_proj"]  # layer 0 adapts k, v only
    cfg_path.write_text(json.dumps(cfg))
    w = mx.load(str(run / "adapters.safetensors"))
    mx.save_safetensors(str(run / "adapters.safetensors"), {k: v for k, v in w.items() if ".0.self_attn.q_proj" not in k})
    r = export_mlx_lm(run, tmp_path / "mlxlm")
    assert (r["scale"], r["scale_folded"], r["zero_modules"]) == (2.0, 1, 1)
    tok = load(src)[1]
    diff, size = mlx_lm_vs_ours(src, run, tmp_path / "mlxlm", prompt_ids(tok, 100))
    assert diff <= 1e-5 and size > 1.0
    back = import_mlx_lm(tmp_path / "mlxlm", tmp_path / "back", load(src)[0].args)
    assert set(back["modules"]) == set(cfg["modules"])  # the zero-filled q_proj of layer 0 is dropped
    assert back["modules"]["model.layers.1.self_attn.v_proj"] == dict(cfg["modules"]["model.layers.1.self_attn.v_proj"],
                                                                      alpha=2.0 * 4)  # the fold stays in lora_b
    model, _ = ours_with_adapter(src, tmp_path / "back")
    ref, _ = ours_with_adapter(src, run)
    ids = mx.array([prompt_ids(tok, 100)])
    assert np.abs(np.array(model(ids)) - np.array(ref(ids))).max() <= 1e-5


def test_mlx_lm_export_places_layers(tiny_models, tmp_path):
    src = tiny_models("full", num_hidden_layers=4)
    run = make_run(src, tmp_path / "run", targets=["q_proj"], num_layers=2, steps=0)  # layers 2, 3
    assert export_mlx_lm(run, tmp_path / "a")["num_layers"] == 2
    cfg_path = run / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), num_layers=-1)))
    with pytest.raises(ValueError, match="--model"):
        export_mlx_lm(run, tmp_path / "b")
    args = load(src)[0].args
    assert export_mlx_lm(run, tmp_path / "c", args)["num_layers"] == 2
    other = load(tiny_models("nemo"))[0].args
    with pytest.raises(ValueError, match="another base model"):
        export_mlx_lm(run, tmp_path / "d", other)


def test_peft_import_errors(tiny_models, tmp_path):
    src = tiny_models("swa")
    run = make_run(src, tmp_path / "run", steps=0)
    export_peft(run, tmp_path / "peft")
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="DoRA"):
        import_peft(tmp_path / "peft", tmp_path / "x")
    cfg_path.write_text(json.dumps(cfg))
    other = load(tiny_models("nemo"))[0].args  # hidden 80: every shape differs
    with pytest.raises(ValueError, match="belongs to another model"):
        import_peft(tmp_path / "peft", tmp_path / "y", other)
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        import_peft(tmp_path / "peft", tmp_path / "z")


def test_export_mlx_lm_command_reads_the_local_base(tiny_models, tmp_path):
    from click.testing import CliRunner

    from mlx_mistral.cli import main

    src = tiny_models("full", num_hidden_layers=4)
    run = make_run(src, tmp_path / "run", policy="gqa", targets=["k_proj", "o_proj"], num_layers=2, steps=0)
    cfg_path = run / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), num_layers=-1)))  # placed by the base
    res = CliRunner().invoke(main, ["export", "mlx-lm", "--adapter", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["num_layers"] == 2
    mc = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert mc["lora_parameters"]["rank"] == 8 and mc["lora_parameters"]["keys"] == ["self_attn.k_proj",
                                                                                    "self_attn.o_proj"]
