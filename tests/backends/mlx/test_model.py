"""The MLX model against transformers' MistralForCausalLM / MixtralForCausalLM, far past the window."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_mistral.backends.mlx.loader import load
from mlx_mistral.backends.mlx.model import KVCache, RotatingKVCache, make_cache

KINDS = ["swa", "full", "mixtral", "nemo", "mqa"]
L = 130  # > 3x every tiny window (16, 24, 32)


def reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(n=L, batch=2, seed=0):
    return np.random.default_rng(seed).integers(3, 32000, (batch, n))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_past_the_window(tiny_models, kind):
    path = tiny_models(kind)
    model, _ = load(path)
    w = model.args.sliding_window
    assert w is None or L >= 3 * w
    x = tokens()
    with torch.no_grad():
        ref = reference(path)(torch.tensor(x)).logits.numpy()
    ours = np.array(model(mx.array(x)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4
    assert ref.std() > 0.05  # the comparison is not between near-constant logits


def test_window_changes_logits_after_it(tiny_models):
    """Sanity of the test model: with the window the logits differ from full attention from position W on."""
    import dataclasses

    from mlx.utils import tree_flatten

    from mlx_mistral.backends.mlx.model import Model

    model, _ = load(tiny_models("swa"))
    unwindowed = Model(dataclasses.replace(model.args, sliding_window=None))
    unwindowed.load_weights(tree_flatten(model.parameters()))
    x = mx.array(tokens(batch=1))
    diff = np.abs(np.array(model(x)) - np.array(unwindowed(x))).max(axis=-1)[0]
    assert diff[:32].max() < 1e-6 and diff[32:].min() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_forward(tiny_models, kind):
    model, _ = load(tiny_models(kind))
    x = mx.array(tokens())
    full = np.array(model(x))
    cache = make_cache(model)
    w = model.args.sliding_window
    outs, pos = [], 0
    for chunk in (20, 1, 1, 7, 1, 40):  # prefill chunks mixed with single steps, then one by one
        outs.append(model(x[:, pos:pos + chunk], cache=cache))
        pos += chunk
        if w:
            assert all(c.size <= w for c in cache)
    while pos < L:
        outs.append(model(x[:, pos:pos + 1], cache=cache))
        pos += 1
        if w:
            assert all(c.size == w for c in cache)
    cached = np.array(mx.concatenate(outs, axis=1))
    assert np.abs(cached - full).max() < 1e-4
    assert all(isinstance(c, RotatingKVCache if w else KVCache) for c in cache)
    assert cache[0].offset == L


@pytest.mark.parametrize("kind", ["swa", "mixtral", "mqa"])
def test_greedy_generation_matches_transformers(tiny_models, kind):
    from mlx_mistral.backends.mlx.generate import generate

    path = tiny_models(kind)
    model, _ = load(path)
    prompt = tokens(n=60, batch=1, seed=3)[0].tolist()  # longer than the window already
    ours = generate(model, prompt, max_tokens=50, temp=0.0, prefill_chunk=16)
    ref = reference(path)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False, min_new_tokens=50,
                           pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
    assert len(prompt) + 50 > 3 * model.args.sliding_window


def test_param_count_matches_model(tiny_models):
    from mlx.utils import tree_flatten

    for kind in KINDS:
        model, _ = load(tiny_models(kind))
        n = sum(v.size for _, v in tree_flatten(model.parameters()))
        assert n == model.args.param_count()


def test_per_token_positions_equal_offset_rope(tiny_models):
    """Explicit positions 0..L-1 give the same logits as the implicit ones (RoPE per-token path)."""
    model, _ = load(tiny_models("nemo"))
    x = mx.array(tokens())
    pos = mx.broadcast_to(mx.arange(L)[None], (2, L))
    assert np.abs(np.array(model(x, positions=pos)) - np.array(model(x))).max() < 1e-5
