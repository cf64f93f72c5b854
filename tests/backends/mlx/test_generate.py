"""Sampling and the `generate` command."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_mistral.cli import main
from mlx_mistral.backends.mlx.generate import generate, sample
from mlx_mistral.backends.mlx.loader import load
from mlx_mistral.core.generation import Sampling


def test_top_p_keeps_only_the_nucleus():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample(logits, Sampling(temp=1.0, top_p=0.7), mx.random.key(i)).item() for i in range(200)}
    assert draws == {0, 1}
    assert sample(logits, Sampling(), mx.random.key(0)).item() == 0


def test_seeded_sampling_is_reproducible(tiny_models):
    model, tok = load(tiny_models("swa"))
    prompt = tok.encode("The quick brown fox")
    a = generate(model, prompt, 20, temp=0.9, top_p=0.9, seed=7)
    b = generate(model, prompt, 20, temp=0.9, top_p=0.9, seed=7)
    c = generate(model, prompt, 20, temp=0.9, top_p=0.9, seed=8)
    assert a == b and a != c and len(a) == 20
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)


def test_generate_cli(tiny_models):
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_models("swa")), "--prompt", "Hello",
                                    "--max-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip()) > 0
    bad = CliRunner().invoke(main, ["generate", "--model", "/nonexistent/dir", "--prompt", "x"])
    assert bad.exit_code != 0 and "neither an existing directory" in bad.output


def test_streaming_stops_at_eos(tiny_models):
    from mlx_mistral.backends.mlx.generate import stream_generate

    model, tok = load(tiny_models("swa"))
    prompt = tok.encode("stop")
    first = generate(model, prompt, 5)
    out = list(stream_generate(model, prompt, 5, stop_ids={first[2]}))
    assert out == first[:3]
    assert np.isfinite(np.array(model(mx.array([prompt])))).all()
