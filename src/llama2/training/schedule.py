"""The pretraining learning-rate schedule (SPEC §3): linear warmup, then cosine decay to a floor.

Llama 2 warms up for 2000 steps and decays to 10% of the peak. Past `total_steps` the rate stays at the floor,
so training longer than planned never drives it to zero.
"""

from __future__ import annotations

import math


def cosine_with_warmup(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate for optimizer update `step` (0-based).

    Warmup: `peak · (step + 1) / warmup_steps`, reaching the peak on the last warmup update, so the very
    first update is not taken with a zero rate. Then `floor + (peak − floor) · ½(1 + cos(π · progress))`,
    where progress runs from 0 at `warmup_steps` to 1 at `total_steps`, and floor = `min_lr_ratio · peak`.
    """
    floor = min_lr_ratio * peak_lr
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return floor
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
