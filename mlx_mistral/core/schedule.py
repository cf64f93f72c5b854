"""Learning-rate schedule: linear warmup, then cosine decay to a floor. Pure functions of the step."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warmup: peak * (step + 1) / warmup for the first `warmup_steps` steps (the first step already learns,
    the last warmup step is at peak). Then a half cosine from peak at step `warmup_steps` down to
    `min_lr_ratio * peak` at the last step (`total_steps - 1`).
    """
    if total_steps < 1 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1 or peak_lr < 0:
        raise ValueError(f"bad schedule: total_steps={total_steps}, warmup_steps={warmup_steps}, "
                         f"min_lr_ratio={min_lr_ratio}, peak_lr={peak_lr}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = total_steps - 1 - warmup_steps
    if decay <= 0:
        return peak_lr
    t = min(1.0, (step - warmup_steps) / decay)
    floor = min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
