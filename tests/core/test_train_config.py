"""The typed training config: YAML scalars as people write them, every bad type and range named."""

import dataclasses

import pytest
import yaml

from mlx_mistral.core.train_config import TrainConfig, describe, load_config, resume_differences, specs_by_name


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_key_has_a_type_range_and_help():
    for name, spec in specs_by_name().items():
        assert spec["help"] and spec["kind"], name
        assert spec["resume"] in ("free", "fixed", "fingerprint"), name
        describe(spec)  # every kind can be described


@pytest.mark.parametrize("text, key, value", [
    ("lr: 1e-4", "lr", 1e-4),                # YAML 1.1 reads this as the string "1e-4"
    ("lr: 2E-5", "lr", 2e-5),
    ("lr: 3", "lr", 3.0),                    # an int for a float key
    ("steps: 1000.0", "steps", 1000),       # an integral float for an int key
    ("steps: '12'", "steps", 12),
    ("eps: 1.0e-8", "eps", 1e-8),
    ("quantize: null", "quantize", None),
    ("quantize: 4", "quantize", 4),
])
def test_yaml_scalars_become_the_keys_type(tmp_path, text, key, value):
    cfg = load_config(_yaml(tmp_path, text))
    got = getattr(cfg, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, key", [
    ("seq_len: abc", "seq_len"),
    ("seed: hello", "seed"),
    ("log_every: 0", "log_every"),
    ("beta2: 2", "beta2"),
    ("beta1: 1", "beta1"),
    ("eval_rows: -1", "eval_rows"),
    ("save_every: -1", "save_every"),
    ("grad_clip: -1", "grad_clip"),
    ("compile: maybe", "compile"),
    ("lora_alpha: 0", "lora_alpha"),
    ("lr: .nan", "lr"),
    ("lr: -1e-4", "lr"),
    ("seq_len: true", "seq_len"),            # a bool is never a number
    ("steps: 10.5", "steps"),
    ("quantize: 3", "quantize"),
    ("packing: greedy", "packing"),
    ("num_layers: 0", "num_layers"),
    ("rank_pattern: {q_proj: 0}", "rank_pattern"),
    ("rank_pattern: {q_proj: 2.5}", "rank_pattern"),
    ("rank_pattern: {'(': 4}", "rank_pattern"),
    ("rank_pattern: [4]", "rank_pattern"),
    ("targets: []", "targets"),
    ("lora_dropout: 1", "lora_dropout"),
])
def test_bad_values_name_the_key_and_what_it_accepts(tmp_path, text, key):
    with pytest.raises(ValueError) as e:
        load_config(_yaml(tmp_path, text))
    msg = str(e.value)
    assert f"{key!r}" in msg and "must be" in msg or "must be -1" in msg, msg
    assert "c.yaml" in msg


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'learning_rate'"):
        load_config(_yaml(tmp_path, "learning_rate: 1e-4"))


def test_flags_override_yaml_and_none_flags_are_ignored(tmp_path):
    cfg = load_config(_yaml(tmp_path, "lr: 1e-4\nsteps: 5"), {"steps": 9, "lr": None})
    assert cfg.steps == 9 and cfg.lr == 1e-4


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match="'batch_size'"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="conflict"):
        TrainConfig(fine_tune="full", quantize=4).validate()


def test_saved_config_round_trips(tmp_path):
    cfg = TrainConfig(lr=1e-4, rank_pattern={"k_proj": 4}, targets=["q_proj", "v_proj"]).validate()
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(p) == cfg


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = TrainConfig(model="mistralai/Mistral-7B-v0.3", data="data", out="runs/a").with_absolute_paths()
    assert cfg.model == "mistralai/Mistral-7B-v0.3"  # a Hub id stays one
    assert cfg.data == str(tmp_path / "data") and cfg.out == str(tmp_path / "runs/a")
    assert TrainConfig(model="tiny:demo").with_absolute_paths().model == "tiny:demo"


def test_resume_differences_split_fixed_and_free():
    saved = TrainConfig(model="a", steps=10, seq_len=128)
    asked = dataclasses.replace(saved, model="b", steps=20, seq_len=256, log_every=5)
    fixed, free = resume_differences(saved, asked)
    assert fixed == {"seq_len": (128, 256)}
    assert free == {"steps": (10, 20), "log_every": (1, 5)}


def test_preference_keys_defaults_and_conflicts():
    """fine_tune: dpo|orpo with pref_weights; lr null = the objective's default; keys that would be ignored
    are refused by name."""
    assert (TrainConfig().lr, TrainConfig(fine_tune="full").lr) == (1.4e-4, 1.4e-4)
    assert TrainConfig(fine_tune="dpo").lr == 5e-6 and TrainConfig(fine_tune="orpo", pref_weights="full").lr == 1e-6
    assert TrainConfig(fine_tune="dpo", lr=1e-4).lr == 1e-4
    c = TrainConfig.from_dict({"fine_tune": "dpo", "beta": "0.5", "dpo_loss": "robust", "label_smoothing": 0.1})
    assert (c.objective, c.trains_full, c.beta) == ("dpo", False, 0.5)
    assert TrainConfig(fine_tune="orpo", pref_weights="full").trains_full
    for bad, match in [({"beta": 0.2}, "'beta' apply to preference tuning only"),
                       ({"fine_tune": "dpo", "label_smoothing": 0.1}, "use dpo_loss: robust or cdpo"),
                       ({"fine_tune": "orpo", "dpo_loss": "robust"}, "DPO's; ORPO has one loss"),
                       ({"fine_tune": "dpo", "pref_weights": "full", "quantize": 4}, "'pref_weights: full' and 'quantize'"),
                       ({"fine_tune": "dpo", "beta": 0}, "'beta'"),
                       ({"fine_tune": "dpo", "label_smoothing": 0.5, "dpo_loss": "robust"}, "'label_smoothing'")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict(bad)
