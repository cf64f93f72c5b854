"""The LR schedule against torch's LambdaLR/CosineAnnealing formulas and its own endpoints."""

import math

import pytest

from mlx_mistral.core.schedule import warmup_cosine


def test_warmup_then_cosine_endpoints():
    lrs = [warmup_cosine(s, 1.4e-4, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1.4e-5)
    assert lrs[9] == lrs[10] == pytest.approx(1.4e-4)
    assert lrs[99] == pytest.approx(1.4e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[10 + 89 // 2] == pytest.approx(1.4e-5 + 1.26e-4 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_matches_torch_cosine_annealing():
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=49, eta_min=0.5)
    for s in range(50):
        assert warmup_cosine(s, 2.0, total_steps=50, warmup_steps=0, min_lr_ratio=0.25) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_edge_cases():
    assert warmup_cosine(0, 1.0, total_steps=1) == 1.0
    assert warmup_cosine(5, 1.0, total_steps=3) == pytest.approx(0.1)  # past the end: stays at the floor
    with pytest.raises(ValueError):
        warmup_cosine(0, 1.0, total_steps=0)
