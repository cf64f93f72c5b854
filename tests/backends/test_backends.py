"""Backend choice and generation on torch: greedy tokens equal transformers' and the MLX backend's."""

import numpy as np
import pytest
import torch

import mlx_mistral
from mlx_mistral.backends import dataset_loss, generate, pick_backend, training_backend
from mlx_mistral.backends.torch.generate import stream_generate as stream_generate_torch


def test_pick_backend():
    assert pick_backend("mlx") == "mlx" and pick_backend("torch") == "torch"
    import platform

    if platform.system() == "Linux":  # with torch installed: CUDA or a plain CPU -> torch (BENCHMARKS.md)
        assert pick_backend("auto") == "torch"
    with pytest.raises(ValueError, match="auto, mlx, torch"):
        pick_backend("cuda")
    load, prepare, trainer = training_backend("torch")
    assert trainer.__name__ == "TorchTrainer" and prepare.__module__ == "mlx_mistral.backends.torch.trainer"


@pytest.mark.parametrize("kind", ["swa", "mixtral", "mqa"])
def test_greedy_generation_matches_transformers_and_mlx(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_models(kind)
    model, _ = mlx_mistral.load(path, backend="torch")
    prompt = np.random.default_rng(3).integers(3, 32000, 60).tolist()  # longer than the window already
    ours = generate(model, prompt, 50, prefill_chunk=16)
    assert len(prompt) + 50 > 3 * model.args.sliding_window
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False, min_new_tokens=50,
                           pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
    mlx_model, _ = mlx_mistral.load(path)
    assert generate(mlx_model, prompt, 50, prefill_chunk=16) == ours


def test_sampling_is_seeded_and_stops(tiny_models):
    model, _ = mlx_mistral.load(tiny_models("swa"), backend="torch")
    prompt = [1, 5, 9, 200]
    a = list(stream_generate_torch(model, prompt, 20, temp=1.0, top_p=0.9, seed=7))
    assert a == list(stream_generate_torch(model, prompt, 20, temp=1.0, top_p=0.9, seed=7))
    assert a != list(stream_generate_torch(model, prompt, 20, temp=1.0, top_p=0.9, seed=8))
    stop = list(stream_generate_torch(model, prompt, 20, stop_ids={a[0]}, temp=1.0, top_p=0.9, seed=7))
    assert stop == a[:1]
    with pytest.raises(ValueError, match="empty"):
        list(stream_generate_torch(model, [], 5))


def test_dataset_loss_equals_mlx(tiny_models):
    from mlx_mistral.core.loop import Rows
    from mlx_mistral.core.packing import pack

    rng = np.random.default_rng(0)
    rows = Rows.from_packed(pack([rng.integers(3, 32000, n) for n in (90, 40, 130, 7)], 96))
    path = tiny_models("nemo")
    t, tn = dataset_loss(mlx_mistral.load(path, backend="torch")[0], rows, 2)
    m, mn = dataset_loss(mlx_mistral.load(path)[0], rows, 2)
    assert tn == mn == int(rows.weights.sum()) and abs(t - m) < 1e-4
