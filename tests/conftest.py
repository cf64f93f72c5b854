"""Shared fixtures: tiny random Mistral-family checkpoints written by transformers (the reference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx_mistral.backends.mlx  # noqa: F401  (first: loads OpenBLAS before mlx.core, see backends/_blas.py)
import pytest

from mlx_mistral.core.tokenizer import bundled_tokenizer_path

# The tiny configs of the foundation issue. Windows are small so every test can run far past them.
TINY = {
    "swa": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=32),
    "full": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=32,
                    num_local_experts=4, num_experts_per_tok=2),
    "nemo": dict(model_type="mistral", hidden_size=80, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=24),
    "mqa": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, sliding_window=16),
}


def make_hf_model(out: Path, kind: str = "swa", vocab_size: int = 32000, tokenizer: str = "tokenizer.model.v1",
                  seed: int = 0, **overrides) -> Path:
    """Write a tiny random HF checkpoint of `kind` (see TINY) with a real Mistral tokenizer; returns `out`."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    spec = dict(TINY[kind], **overrides)
    model_type = spec.pop("model_type")
    torch.manual_seed(seed)
    cfg_cls, model_cls = ((MixtralConfig, MixtralForCausalLM) if model_type == "mixtral"
                          else (MistralConfig, MistralForCausalLM))
    cfg = cfg_cls(vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=10000.0, **spec)
    model = model_cls(cfg)
    with torch.no_grad():  # the default init is too small to show differences in logits: widen it
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out)
    tok_src = bundled_tokenizer_path(tokenizer)
    shutil.copy(tok_src, Path(out) / ("tekken.json" if tokenizer.endswith(".json") else "tokenizer.model"))
    return Path(out)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(kind, **overrides)` -> directory of a cached tiny HF checkpoint."""
    cache = {}

    def get(kind="swa", **overrides):
        key = (kind, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_hf_model(tmp_path_factory.mktemp(kind), kind, **overrides)
        return cache[key]

    return get


# ---- the llama.cpp judge in the session log ---------------------------------------------------------------
_LLAMA: dict = {"tally": {}}


def _llama_info() -> str:
    """Which llama.cpp build judges the GGUF files (`llama_print_system_info`, from a child process)."""
    if "info" not in _LLAMA:
        from llama_judge import system_info

        info = system_info()
        _LLAMA["info"] = "not installed" if info is None else info
    return _LLAMA["info"]


def pytest_report_header(config):
    return [f"llama.cpp judge: {_llama_info()}"]


def pytest_runtest_logreport(report):
    if "llama" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _LLAMA["tally"][report.outcome] = _LLAMA["tally"].get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    """Printed even under -q: the build in use and how many llama tests ran (CI's log shows both)."""
    counts = ", ".join(f"{n} {k}" for k, n in sorted(_LLAMA["tally"].items())) or "none ran"
    terminalreporter.write_line(f"llama.cpp judge: {_llama_info()}")
    terminalreporter.write_line(f"llama.cpp judge tests (marker 'llama'): {counts}")
