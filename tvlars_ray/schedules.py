"""Learning-rate schedules, stepped every iteration, for any optimizer.

Each schedule is a multiplier of the configured ``lr`` at 0-based step ``s`` (the step about
to be taken) out of ``total`` steps:

- ``none``: 1.
- ``cosine``: one half-cosine from 1 to 0 over the whole run (the reference code stepped a
  cosine with ``T_max = epochs`` every iteration, so it oscillated; this does not).
- ``lars-warm``: the Barlow Twins recipe the reference uses, for every optimizer: with
  ``peak = bs / 256`` and ``warm`` warm-up steps, ``peak * s / warm`` while ``s < warm``, then
  a cosine from ``peak`` down to ``0.001 * peak`` over the remaining steps.
- ``phi``: TVLARS's ``phi(t)`` (``tvlars_phi`` with the trial's lmbda, alpha, delay and
  gamma_min) at ``t = s + 1``, counted from 1 at the first step as TVLARS counts it. With
  momentum 0 and no norm clip, LARS under this schedule takes TVLARS's steps exactly: the
  ablation that tells TVLARS's time-varying ratio from a decaying learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from .optim import tvlars_phi

END_FRACTION = 0.001


def lr_multiplier(sd: str, step: int, total: int, bs: int = 256, warmup: int = 0,
                  phi: Mapping[str, float] | None = None) -> float:
    """The factor applied to the base lr at 0-based ``step``; ``phi``: the keyword
    arguments of ``tvlars_phi`` (lmbda, alpha, delay, gamma_min), for ``sd`` phi."""
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
    if sd == "phi":
        if phi is None:
            raise ValueError("schedule 'phi' needs phi's settings: lmbda, alpha, delay, gamma_min")
        return tvlars_phi(step + 1, **phi)
    raise ValueError(f"unknown schedule '{sd}': choose none, cosine, lars-warm or phi")


def build_schedule(optimizer: torch.optim.Optimizer, sd: str, epochs: int,
                   steps_per_epoch: int, bs: int, warmup_epochs: int,
                   phi: Mapping[str, float] | None = None) -> LambdaLR:
    """A per-iteration ``LambdaLR``: call ``step()`` after every optimizer step."""
    total = epochs * steps_per_epoch
    warm = warmup_epochs * steps_per_epoch
    return LambdaLR(optimizer, lambda s: lr_multiplier(sd, s, total, bs, warm, phi))
