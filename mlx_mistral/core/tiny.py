"""Tiny random Mistral-family checkpoints for the demo, tests and benchmarks (no download needed).

The weights are random (normal, std `init_std`, as transformers initialises matrices; norms are ones),
drawn with numpy from `seed`, so building one needs neither MLX nor torch; the tokenizer is a real Mistral
one copied from the mistral-common wheel, or for "demo-tags" the 4096-piece cut of Mistral's v1 tokenizer
bundled with the demo's data (`mlx_mistral/data/demo_tags/tokenizer.model`, bench/make_tag_demo_data.py). The directory is a Hugging Face-style checkpoint (`config.json`,
`model.safetensors`, `tokenizer.model`) that both backends, transformers and mlx-lm read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .config import ModelArgs
from .data import DEMO_TAGS
from .io import save_safetensors, write_json
from .tokenizer import Tokenizer, bundled_tokenizer_path
from .weights import param_shapes

# The tokenizer file of each preset that does not use Mistral's full v1 vocabulary.
PRESET_TOKENIZERS = {"demo-tags": DEMO_TAGS / "tokenizer.model"}
# Named shapes: "demo-tags" is what `make demo` trains (the "demo" shape with a 4k vocabulary: 1.8M
# parameters instead of 9M); "bench-100m" matches the peers' benchmarks.
_DEMO = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, sliding_window=64)
PRESETS = {
    "demo": _DEMO,
    "demo-tags": _DEMO,
    "bench-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, sliding_window=256),
}


def build_tiny(out: str | Path, preset: str = "demo", tokenizer: str | None = None, seed: int = 0,
               init_std: float = 0.02, **overrides) -> Path:
    """Write a random checkpoint of `preset` shape (overridable) to `out`; returns the directory.
    `tokenizer`: a tokenizer file name in the mistral-common wheel (default: the preset's own tokenizer
    file, else "tokenizer.model.v1")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if tokenizer is None and preset in PRESET_TOKENIZERS:
        tok_path = PRESET_TOKENIZERS[preset]
    else:
        tok_path = bundled_tokenizer_path(tokenizer or "tokenizer.model.v1")
    vocab = Tokenizer(tok_path).vocab_size
    shape = dict(PRESETS[preset], **overrides)
    shape.setdefault("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    args = ModelArgs(vocab_size=vocab, rope_theta=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
                     **shape)
    rng = np.random.default_rng(seed)
    params = {name: np.ones(s, np.float32) if len(s) == 1 else (rng.standard_normal(s, np.float32) * init_std)
              for name, s in param_shapes(args).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "model.safetensors", params, metadata={"format": "pt"})
    write_json(out / "config.json", dict(args.to_hf_config(), torch_dtype="float32"))
    dst = out / ("tekken.json" if tok_path.suffix == ".json" else "tokenizer.model")
    shutil.copy(tok_path, dst)
    return out
