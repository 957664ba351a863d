"""Learning-rate schedules, stepped every iteration, for any optimizer.

Each schedule is a multiplier of the configured ``lr`` at 0-based step ``s`` (the step about
to be taken) out of ``total`` steps:

- ``none``: 1.
- ``cosine``: one half-cosine from 1 to 0 over the whole run (the reference code stepped a
  cosine with ``T_max = epochs`` every iteration, so it oscillated; this does not).
- ``lars-warm``: the Barlow Twins recipe the reference uses, for every optimizer: with
  ``peak = bs / 256`` and ``warm`` warm-up steps, ``peak * s / warm`` while ``s < warm``, then
  a cosine from ``peak`` down to ``0.001 * peak`` over the remaining steps.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

END_FRACTION = 0.001


def lr_multiplier(sd: str, step: int, total: int, bs: int = 256, warmup: int = 0) -> float:
    """The factor applied to the base lr at 0-based ``step``."""
    if sd == "none":
        return 1.0
    if sd == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if sd == "lars-warm":
        peak = bs / 256
        if step < warmup:
            return peak * step / warmup
        q = 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup)
                                / max(total - warmup, 1)))
        return peak * q + peak * END_FRACTION * (1 - q)
    raise ValueError(f"unknown schedule '{sd}': choose none, cosine or lars-warm")


def build_schedule(optimizer: torch.optim.Optimizer, sd: str, epochs: int,
                   steps_per_epoch: int, bs: int, warmup_epochs: int) -> LambdaLR:
    """A per-iteration ``LambdaLR``: call ``step()`` after every optimizer step."""
    total = epochs * steps_per_epoch
    warm = warmup_epochs * steps_per_epoch
    return LambdaLR(optimizer, lambda s: lr_multiplier(sd, s, total, bs, warm))
