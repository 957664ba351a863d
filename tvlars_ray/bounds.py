"""The valid range of every numeric setting, in one place.

:class:`~tvlars_ray.config.TrialConfig` and the optimizers check against the same table, so a
value the config accepts is one the optimizer accepts, and the other way round. Every bound
also refuses NaN and infinity: a non-finite setting is never what a user meant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` (either end open, or absent), and finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low == 0 and self.high is None:
            text = "positive" if self.low_open else "non-negative"
        elif self.high is None and self.low is not None:
            text = f"{'more than' if self.low_open else 'at least'} {self.low:g}"
        elif self.low is None and self.high is None:
            text = "a finite number"
        else:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            text = f"in {left}{self.low:g}, {self.high:g}{right}"
        return f"{text} ({self.why})" if self.why else text


POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)
UNIT = Bound(0, 1, high_open=True, why="1 would never forget")
FINITE = Bound()

# Setting name -> its range. Optimizer arguments with other names map onto these entries
# (``weight_decay`` is ``wd``); ``eps`` and the betas are the optimizers' own.
BOUNDS: dict[str, Bound] = {
    "epochs": AT_LEAST_ONE,
    "bs": AT_LEAST_ONE,
    "lr": POSITIVE,
    "wd": NON_NEGATIVE,
    "momentum": UNIT,
    "eta": POSITIVE,
    "lmbda": NON_NEGATIVE,
    "alpha": Bound(0, low_open=True, why="phi peaks at 1/alpha"),
    "delay": FINITE,
    "gamma_min": NON_NEGATIVE,
    "norm_clip": POSITIVE,
    "warmup_epochs": NON_NEGATIVE,
    "train_subset": AT_LEAST_ONE,
    "test_subset": AT_LEAST_ONE,
    "loader_workers": NON_NEGATIVE,
    "cl_epochs": NON_NEGATIVE,
    "btlmbda": NON_NEGATIVE,
    "lr_classifier": POSITIVE,
    "lr_backbone": NON_NEGATIVE,
    "num_workers": NON_NEGATIVE,
    "cpus_per_worker": POSITIVE,
    "gpus_per_worker": Bound(0, 1, low_open=True, why="a fraction of one GPU or a whole one"),
    "checkpoint_every": AT_LEAST_ONE,
    "max_failures": NON_NEGATIVE,
    "eps": NON_NEGATIVE,
    "beta": UNIT,
}


def check(name: str, value: float | None, key: str | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in ``BOUNDS[key or name]``.

    ``None`` passes: whether a setting may be empty is the caller's business.
    """
    if value is None:
        return
    bound = BOUNDS[key or name]
    if not bound.contains(value):
        raise ValueError(f"{name} must be {bound.describe()}, got {value}")
