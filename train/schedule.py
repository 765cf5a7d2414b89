"""The learning-rate schedule of METHOD.md §3: linear warm-up from 0, then cosine to 0,
stepped per iteration, with the peak scaled by the global batch (LR = base · batch / 256)."""

from __future__ import annotations

import math


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule the recipe uses: base_lr is per 256 images."""
    return base_lr * global_batch / 256


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """LR for the update that follows `step` completed steps (step 0 -> 0 during warm-up)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
