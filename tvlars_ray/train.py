"""Ray Train's per-worker entry point: the trial's mode picks its recipe from a small table.

The recipes (classification, Barlow Twins) sit on the shared worker library
(:mod:`tvlars_ray.worker`); this module only dispatches. It knows nothing of Tune: the
trial's settings, store and id arrive in the ``train_loop_config`` dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import bt, classification
from .compat import quiet_train_report_log
from .config import TrialConfig

RECIPES: dict[str, Callable[[TrialConfig, dict[str, Any]], None]] = {
    "clf": classification.run,
    "bt": bt.run,
}


def train_fn_per_worker(job: dict[str, Any]) -> None:
    """Run on every Ray Train worker (and in-process by ``trial --local``).

    ``job`` holds ``cfg`` (a TrialConfig as a dict) and, to record epochs, ``store``,
    ``experiment`` and ``trial_id``.
    """
    job = {**job, "ready_at": time.time()}  # Ray Train's start-up ends here (see Recorder)
    cfg = TrialConfig.from_dict(job["cfg"])
    quiet_train_report_log()
    RECIPES[cfg.mode](cfg, job)
