"""TensorBoard, MLflow and Weights & Biases, through Ray's own logger callbacks.

``--logger tensorboard|mlflow|wandb`` (repeatable) on ``grid`` and ``optuna`` hands Ray Tune
its ``TBXLoggerCallback``, ``MLflowLoggerCallback`` and ``WandbLoggerCallback``: Tune feeds
them each trial's reports (the store's per-epoch metrics) and its config (the trial's full
settings, see :func:`tvlars_ray.sweep.tune_settings`). The ``trial`` command runs without Tune:
:class:`TrialTrackers` feeds the same callbacks from the trial's epochs as the store receives
them (Ray Train's own callbacks run on its controller, out of reach when the run ends, and not
at all in local mode).

Where they write: TensorBoard event files in each Tune trial's folder
(``<store>/<experiment>/tune/<trial>/``) or, for ``trial``, in
``<store>/<experiment>/tensorboard/<trial_id>/``; MLflow to ``MLFLOW_TRACKING_URI``, else a
SQLite database in the store (``<store>/mlflow.db``), one MLflow experiment per experiment;
W&B to the project ``WANDB_PROJECT`` (default ``tvlars-ray``), grouped by experiment, its run
files under ``<store>/<experiment>/wandb/`` (offline runs with ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from .compat import LoggerTrial, wandb_logger_callback
from .errors import UserError
from .store import EPOCH_COLUMNS, Store

if TYPE_CHECKING:
    from ray.tune.logger import LoggerCallback

# tracker -> (the module it needs, how to install it)
TRACKERS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX (Ray Tune ships it)"),
    "mlflow": ("mlflow", "pip install 'tvlars-ray[mlflow]'"),
    "wandb": ("wandb", "pip install 'tvlars-ray[wandb]'"),
}
DEFAULT_WANDB_PROJECT = "tvlars-ray"
# The store's per-epoch numbers, as a tracker's metrics.
METRIC_COLUMNS = tuple(name for name, typ, *_ in EPOCH_COLUMNS
                       if pa.types.is_integer(typ) or pa.types.is_floating(typ)
                       or pa.types.is_boolean(typ))


class TrackerError(UserError, RuntimeError):
    """A tracker cannot run as asked; the message says what to install or set."""


def check(names: Sequence[str], store: Store) -> None:
    """Each tracker asked for can run: its package is there and it knows where to write.
    Called before anything starts."""
    for name in dict.fromkeys(names):
        module, install = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrackerError(f"--logger {name} needs the {module} package: {install}") from None
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI") and not store.is_local:
        raise TrackerError(f"--logger mlflow: the store {store.uri} is not a local folder, so "
                           f"MLflow has no default place: set MLFLOW_TRACKING_URI (a tracking "
                           f"server, or sqlite:////path/mlflow.db)")
    if "wandb" in names and not _wandb_ready():
        raise TrackerError("--logger wandb: no W&B login: run `wandb login` or set "
                           "WANDB_API_KEY, or set WANDB_MODE=offline to keep the runs on disk "
                           "(`wandb sync` uploads them later)")


def _wandb_ready() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    import wandb  # an optional extra, found installed by check() just before

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001 - any failure means: not logged in
        return False


def mlflow_uri(store: Store) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.path('mlflow.db')}"


def where(names: Sequence[str], store: Store, experiment: str, tune: bool) -> list[str]:
    """One line per tracker saying where to look."""
    lines = []
    if "tensorboard" in names:
        folder = store.uri_of(experiment, "tune" if tune else "tensorboard")
        lines.append(f"tensorboard: tensorboard --logdir {folder}")
    if "mlflow" in names:
        lines.append(f"mlflow: experiment '{experiment}' at {mlflow_uri(store)}")
    if "wandb" in names:
        project = os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT)
        mode = os.environ.get("WANDB_MODE", "online")
        lines.append(f"wandb: project '{project}', group '{experiment}' ({mode})"
                     + (f", run files in {store.uri_of(experiment, 'wandb')}"
                        if store.is_local else ""))
    return lines


def tune_callbacks(names: Sequence[str], store: Store, experiment: str,
                   provenance: dict[str, Any] | None = None) -> list[LoggerCallback]:
    """Ray's logger callbacks for the trackers asked for.

    Imported here, when asked for: Ray Tune takes seconds to import (the command line reads
    this module's TRACKERS for --help), and MLflow and W&B are optional extras."""
    out: list[LoggerCallback] = []
    if "tensorboard" in names:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(store),
                                        experiment_name=experiment, tags=_tags(provenance)))
    if "wandb" in names:
        run_dir = {"dir": store.path(experiment)} if store.is_local else {}
        if run_dir:
            os.makedirs(run_dir["dir"], exist_ok=True)
        # Ray's logging actor calls wandb.init in a Ray worker, whose environment is the one
        # its node started with, not this command's: WANDB_MODE=offline set here would not
        # reach it, and W&B there refuses to start without a login (the actor fails, nothing
        # is written). The mode goes to it as wandb.init's argument.
        mode = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
        out.append(wandb_logger_callback(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT), group=experiment,
            notes=provenance["command"] if provenance else None, **run_dir, **mode))
    return out


def _tags(provenance: dict[str, Any] | None) -> dict[str, str]:
    """MLflow tags from the command's provenance (MLflow's own tag for the commit)."""
    if not provenance:
        return {}
    git = provenance["git"]
    tags = {"tvlars.command": provenance["command"], "tvlars.host": provenance["host"]}
    if git.get("commit"):
        tags.update({"mlflow.source.git.commit": git["commit"],
                     "tvlars.git_dirty": str(git["dirty"])})
    return tags


def epoch_result(row: dict[str, Any], iteration: int) -> dict[str, Any]:
    """A stored epoch as a Tune result: its numbers, and Tune's iteration count."""
    result = {k: row[k] for k in METRIC_COLUMNS if row.get(k) is not None}
    return {**result, "training_iteration": iteration}


class TrialTrackers:
    """The ``trial`` command's trackers: Ray's logger callbacks, fed from the trial's epochs
    as the store receives them (every ``every`` seconds, and once more at the end).

    Use as a context manager around the trial; set ``failed`` before it ends if the trial
    failed. On a remote store, TensorBoard writes to a local folder that is copied to the
    store at the end.
    """

    def __init__(self, names: Sequence[str], store: Store, experiment: str, trial_id: str,
                 settings: dict[str, Any], provenance: dict[str, Any] | None = None,
                 every: float = 5.0) -> None:
        self.store, self.experiment, self.trial_id, self.every = store, experiment, trial_id, every
        self.callbacks = tune_callbacks(names, store, experiment, provenance)
        folder = (store.path(experiment, "tensorboard", trial_id) if store.is_local else
                  os.path.join(tempfile.mkdtemp(prefix="tvlars-tb-"), trial_id))
        self.trial = LoggerTrial(trial_id=trial_id, trial_name=trial_id, config=settings,
                                 local_path=folder, experiment_dir_name=experiment)
        self.failed = False
        self.seen: set[str] = set()
        self.iteration = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one poll at a time: the follower's or a caller's
        self._thread = threading.Thread(target=self._follow, name="trackers", daemon=True)

    def __enter__(self) -> TrialTrackers:
        for callback in self.callbacks:
            callback.setup()
            callback.on_trial_start(iteration=0, trials=[self.trial], trial=self.trial)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        end = "on_trial_error" if (self.failed or exc_type is not None) else "on_trial_complete"
        for callback in self.callbacks:
            getattr(callback, end)(iteration=self.iteration, trials=[self.trial],
                                   trial=self.trial)
            callback.on_experiment_end(trials=[self.trial])
        if not self.store.is_local and os.path.isdir(self.trial.local_path):
            pafs.copy_files(self.trial.local_path, self.store.uri_of(
                self.experiment, "tensorboard", self.trial_id))

    def _follow(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        """Hand the callbacks every epoch stored since the last poll."""
        with self._lock:
            new = [f for f in self.store.epoch_files(self.experiment, self.trial_id)
                   if f not in self.seen]
            if not new:
                return
            for row in self.store.read_epoch_files(new).to_dict("records"):
                self.iteration += 1
                result = epoch_result(row, self.iteration)
                for callback in self.callbacks:
                    callback.on_trial_result(iteration=self.iteration, trials=[self.trial],
                                             trial=self.trial, result=result)
            self.seen.update(new)
