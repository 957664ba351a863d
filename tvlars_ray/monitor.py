"""Live metrics for Prometheus / Grafana through ``ray.util.metrics``.

Ray exports them with its own metrics on each node's metrics port (``ray start
--metrics-export-port``), prefixed ``ray_``: per trial ``tvlars_epoch``, ``tvlars_test_acc``,
``tvlars_train_loss``, ``tvlars_samples_per_s`` (tags: experiment, trial_id, opt, bs);
per sweep ``tvlars_trials`` (tags: experiment, status: pending, running, completed,
diverged, stopped, failed).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.metrics import Gauge

from .store import STATUSES

TRIAL_TAGS = ("experiment", "trial_id", "opt", "bs")
TRIAL_GAUGES = {
    "epoch": "epochs finished by the trial",
    "test_acc": "test accuracy of the trial's last epoch",
    "train_loss": "training loss of the trial's last epoch",
    "samples_per_s": "training images per second of the trial's last epoch",
}


class TrialMetrics:
    """Per-epoch gauges of one trial, set by its rank 0 (a no-op where Ray is not running)."""

    def __init__(self, experiment: str | None, trial_id: str | None, opt: str, bs: int) -> None:
        self.gauges = {}
        if not ray.is_initialized() or not trial_id:
            return
        self.tags = {"experiment": str(experiment), "trial_id": str(trial_id), "opt": opt,
                     "bs": str(bs)}
        self.gauges = {name: Gauge(f"tvlars_{name}", description=text, tag_keys=TRIAL_TAGS)
                       for name, text in TRIAL_GAUGES.items()}

    def update(self, metrics: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            value = metrics.get(name)
            if isinstance(value, (int, float)) and value == value:
                gauge.set(float(value), tags=self.tags)


class SweepMetrics:
    """Trials of a sweep per status, set by the driver as Tune reports them."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.gauge = Gauge("tvlars_trials", description="trials of the sweep per status",
                           tag_keys=("experiment", "status"))

    def update(self, counts: dict[str, int]) -> None:
        for status in ("pending", *STATUSES):
            self.gauge.set(float(counts.get(status, 0)),
                           tags={"experiment": self.experiment, "status": status})
