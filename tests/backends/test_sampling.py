"""Samplers of both backends against transformers' own logits processors on the same logits.

transformers (the reference nobody here wrote): RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, each alone and chained in the order `generate` applies
them. Each backend's `process_logits` must give the same logits (exactly the same tokens ruled out, -inf).
On MLX, also mlx-lm's own sample_utils filters and repetition penalty.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from mlx_mistral.core.generation import Sampling

mlx_gen = importlib.import_module("mlx_mistral.backends.mlx.generate")  # the packages export generate() itself
torch_gen = importlib.import_module("mlx_mistral.backends.torch.generate")

VOCAB = 503
HISTORY = [5, 17, 17, 42, 99, 3, 250, 42]  # repeats on purpose


def _logits(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, VOCAB)) * 3).astype(np.float32)  # (B, vocab), no ties


def hf(logits: np.ndarray, s: Sampling, history=HISTORY) -> np.ndarray:
    procs = []
    if s.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.temp > 0:
        procs.append(TemperatureLogitsWarper(s.temp))
        if s.top_k:
            procs.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            procs.append(TopPLogitsWarper(s.top_p))
        if s.min_p:
            procs.append(MinPLogitsWarper(s.min_p))
    ids = torch.tensor([history] * logits.shape[0])  # (B, H)
    return LogitsProcessorList(procs)(ids, torch.tensor(logits)).numpy()


def ours(backend: str, logits: np.ndarray, s: Sampling, history=HISTORY) -> np.ndarray:
    if backend == "mlx":
        return np.array(mlx_gen.process_logits(mx.array(logits), s, history))
    return torch_gen.process_logits(torch.tensor(logits), s, history).numpy()


SETTINGS = {
    "top_k": Sampling(temp=1.0, top_k=20),
    "top_p": Sampling(temp=1.0, top_p=0.8),
    "min_p": Sampling(temp=1.0, min_p=0.05),
    "repetition_penalty": Sampling(temp=0.0, repetition_penalty=1.3, repetition_context=0),
    "temperature": Sampling(temp=0.7),
    "all, chained": Sampling(temp=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                             repetition_context=0),
}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_process_logits_equals_transformers(backend, name):
    s = SETTINGS[name]
    for seed in range(3):
        x = _logits(seed)
        want, got = hf(x, s), ours(backend, x, s)
        assert np.array_equal(np.isneginf(want), np.isneginf(got)), name
        kept = ~np.isneginf(want)
        assert kept.sum(axis=-1).min() > 0
        if name in ("temperature", "repetition_penalty"):
            assert kept.all() and not np.allclose(got, x)  # it changes the logits
        else:
            assert kept.sum() < kept.size  # it rules tokens out
        np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_repetition_context_looks_back_that_far(backend):
    s = Sampling(repetition_penalty=1.5, repetition_context=3)
    x = _logits(4)
    got = ours(backend, x, s)
    np.testing.assert_allclose(got, hf(x, s, history=HISTORY[-3:]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, hf(x, s, history=HISTORY))  # tokens further back are not penalised


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_draws_stay_among_the_kept_tokens_and_repeat_with_the_seed(backend):
    s = Sampling(temp=1.0, top_k=3, seed=0)
    x = _logits(5)[:1]
    kept = set(np.flatnonzero(~np.isneginf(hf(x, s))[0]))
    if backend == "mlx":
        draws = [mlx_gen.sample(mx.array(x), s, mx.random.key(i), HISTORY).item() for i in range(200)]
        again = [mlx_gen.sample(mx.array(x), s, mx.random.key(i), HISTORY).item() for i in range(200)]
    else:
        g, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        draws = [int(torch_gen.sample(torch.tensor(x), s, g, HISTORY)) for _ in range(200)]
        again = [int(torch_gen.sample(torch.tensor(x), s, g2, HISTORY)) for _ in range(200)]
    assert set(draws) == kept and draws == again
    greedy = Sampling(repetition_penalty=1.3)
    want = int(np.argmax(hf(x, greedy)[0]))
    if backend == "mlx":
        assert mlx_gen.sample(mx.array(x), greedy, mx.random.key(0), HISTORY).item() == want
    else:
        assert int(torch_gen.sample(torch.tensor(x), greedy, None, HISTORY)) == want


@pytest.mark.parametrize("bad, match", [
    (dict(temp=-1), "temp must be >= 0"), (dict(top_p=0), "top_p must be in"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.0), "min_p must be in"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_context=-1), "repetition_context")])
def test_bad_settings_name_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**bad).validate()
    with pytest.raises(ValueError, match=match):
        mlx_gen.generate(None, [1, 2], 3, **bad)


def test_mlx_filters_equal_mlx_lms():
    """mlx-lm's own samplers (sample_utils) rule out the same tokens on the same log-probabilities, and its
    repetition penalty gives the same logits over the same context."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty

    for seed in range(3):
        logprobs = mx.array(_logits(seed)) - mx.logsumexp(mx.array(_logits(seed)), axis=-1, keepdims=True)
        for ours_f, theirs_f, v in [(mlx_gen.apply_top_k, apply_top_k, 20), (mlx_gen.apply_min_p, apply_min_p, 0.05),
                                    (mlx_gen.apply_top_p, apply_top_p, 0.8)]:
            want, got = np.array(theirs_f(logprobs, v)), np.array(ours_f(logprobs, v))
            assert np.array_equal(np.isneginf(want), np.isneginf(got)) and np.isneginf(got).any(), ours_f.__name__
        x = mx.array(_logits(seed))
        want = make_repetition_penalty(1.3, context_size=5)(HISTORY, mx.array(x))
        recent = Sampling(repetition_penalty=1.3, repetition_context=5).history(HISTORY)
        got = mlx_gen.apply_repetition_penalty(x, recent, 1.3)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
