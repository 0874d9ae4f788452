"""Learning-rate schedules as one pure function of the step.

    warmup + cosine   linear warmup to the peak, then a half cosine down to min_lr_ratio * peak
                      at the last step (Loshchilov & Hutter, SGDR; as nanoGPT / litgpt).
    warmup + WSD      warmup-stable-decay: linear warmup, the peak held, then over the last
                      `decay_frac` of the steps a decay to min_lr_ratio * peak, linear or "sqrt"
                      (1 - sqrt(p), Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
                      Beyond Fixed Training Durations"; MiniCPM).
    warmup + constant the peak after warmup.

The schedule has no state beyond the step, so resuming restores it exactly.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "wsd-sqrt", "constant")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine", min_ratio: float = 0.1,
              decay_frac: float = 0.2) -> float:
    """The multiplier of the peak learning rate for 0-based optimizer step `step` of `total`.

    Warmup: (step + 1) / warmup for the first `warmup` steps (the first step already moves).
    Cosine: min + (1 - min) * (1 + cos(pi * p)) / 2 with p = (step - warmup) / (total - 1 - warmup),
    so the last step runs at exactly min_ratio. WSD: 1 until the last round(decay_frac * total)
    steps, then min + (1 - min) * (1 - p) (or 1 - sqrt(p)) with p = (k + 1) / decay_steps for the
    k-th decay step, reaching min_ratio at the last step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = total - 1 - warmup
        p = min(1.0, (step - warmup) / span) if span > 0 else 1.0
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    decay_steps = max(1, round(decay_frac * total)) if decay_frac > 0 else 0
    decay_start = total - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    p = min(1.0, (step - decay_start + 1) / decay_steps)
    return min_ratio + (1 - min_ratio) * (1 - (math.sqrt(p) if schedule == "wsd-sqrt" else p))
