"""Every private Ray or torch API the project uses, behind one small module (and, for what Ray
Train's controller process unpickles, which must not import torch, :mod:`train_controller`).

Most are here for speed. Ray Train's public per-worker functions (``ray.train.get_context``,
``report``, ``get_checkpoint``, ``ray.train.torch.get_device`` and ``prepare_model``) import
all of Ray Tune on their first call, to check for a Tune session: about 3 CPU-seconds in every
worker process of every trial, a large part of a short trial's cost on a laptop. The shims
below reach the same Train internals those functions call, without that check (and
:mod:`tvlars_ray.process_setup` spares Ray's own calls of it).

Ray is pinned (``ray==2.60.0`` in pyproject.toml) and ``tests/test_compat.py`` checks each shim
against the installed release, so an upgrade that moves one of these fails there, in one
place, not deep inside a trial. (torch's ``_foreach_*`` multi-tensor kernels, which
``torch.optim`` itself is built on, are used directly by the optimizers.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from ray._private import worker as _ray_worker
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray._private.state import state as _ray_state
from ray.air._internal import torch_utils as _air_torch
from ray.train._internal.session import get_session as _train_session
from ray.train.torch import TorchTrainer as _RayTorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback as _DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback as _PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution import context as _train_context
from ray.train.v2._internal.execution import train_fn_utils as _train_fn_utils
from ray.train.v2.api.report_config import CheckpointUploadMode
from torch.distributed import _functional_collectives as _fcol

from .train_controller import PlacementGroupWatch, TorchBackendConfig

PINNED_RAY = "2.60.0"
# Where a Ray worker process finds the job's worker_process_setup_hook (a module path): set in
# the environment of a Ray started by this process, it reaches every worker without a
# runtime_env.
SETUP_HOOK_ENV = WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def autoscaler_node_groups() -> list[Any]:
    """The autoscaler's node types (``resources``, ``max_count``), or none where the cluster
    does not report its configuration (no autoscaler, an older cluster)."""
    try:
        config = _ray_state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older clusters do not report it
        return []
    return list(getattr(config, "node_group_configs", None) or [])


def quiet_train_report_log() -> None:
    """Ray Train logs every report at INFO, on workers under a logger named by its file path
    (so its LoggingConfig cannot reach it): a wall of text per epoch. Keep warnings only."""
    logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger(_train_fn_utils.__name__).setLevel(logging.WARNING)  # local mode


class TorchTrainer(_RayTorchTrainer):
    """Ray's TorchTrainer, less the Ray Data machinery when the run has no Ray datasets, with
    a backend config its controller can unpickle without importing torch, and the run's one
    placement-group cleaner instead of one per trial (:mod:`tvlars_ray.train_controller`).

    Train's datasets callback starts a ``DatasetManager`` actor for every worker group even
    with no datasets: one more process per trial, which imports Ray Data. Our data never
    goes through Ray Data, so a run without datasets leaves that callback out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("torch_config", TorchBackendConfig())
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = [PlacementGroupWatch() if isinstance(c, _PlacementGroupCleanerCallback)
                     else c for c in super()._create_default_callbacks()]
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, _DatasetsCallback)]


def train_context() -> Any:
    """``ray.train.get_context()``: this worker's rank, world size, ..."""
    return _train_fn_utils.get_train_fn_utils().get_context()


def train_report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
    """``ray.train.report(metrics, checkpoint)`` with its defaults (a synchronous upload)."""
    mode = CheckpointUploadMode.SYNC
    _train_fn_utils.get_train_fn_utils().report(
        metrics=metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=mode.default_delete_local_checkpoint_after_upload())


def train_checkpoint() -> Any:
    """``ray.train.get_checkpoint()``: the run's latest checkpoint, or None."""
    return _train_fn_utils.get_train_fn_utils().get_checkpoint()


def train_device() -> torch.device:
    """``ray.train.torch.get_device()``: this worker's GPU (or the CPU without one)."""
    if _train_fn_utils.get_train_fn_utils().is_distributed():
        return _air_torch.get_devices()[0]
    if torch.cuda.is_available():  # Train's local mode: the current device
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the DDP ranks, with a backward pass (the gradient is summed too): the
    functional collectives are the only differentiable all-reduce in torch."""
    return _fcol.all_reduce(tensor, "sum", dist.group.WORLD)


@contextlib.contextmanager
def ray_messages_to(logger: logging.Logger) -> Iterator[None]:
    """The errors and warnings Ray's raylets publish to a driver (a worker died, 'N worker
    processes have been started', ...) are printed to its stdout whatever ``log_to_driver``
    says, by ``print_to_stdstream`` (looked up when each arrives); while this lasts they go
    to ``logger`` instead."""
    original = _ray_worker.print_to_stdstream

    def to_logger(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            logger.warning("(%s) %s", data.get("pid"), line)

    _ray_worker.print_to_stdstream = to_logger
    try:
        yield
    finally:
        _ray_worker.print_to_stdstream = original


def session_logs_dir() -> str | None:
    """This node's folder of Ray's session logs (every worker's and actor's output), or None
    before Ray is up."""
    node = getattr(_ray_worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


@dataclass(eq=False)  # compared and hashed by identity, as Tune's Trial is
class LoggerTrial:
    """What Ray Tune's logger callbacks (TensorBoardX, MLflow, W&B in Ray 2.60) read of a
    Tune ``Trial``: enough to feed them a trial that runs without Tune (the ``trial``
    command). Hyperparameters are its whole config, as a grid's are."""

    trial_id: str
    trial_name: str
    config: dict[str, Any]
    local_path: str
    experiment_dir_name: str
    checkpoint: Any = None
    evaluated_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.evaluated_params = self.evaluated_params or dict(self.config)

    def init_local_path(self) -> None:
        os.makedirs(self.local_path, exist_ok=True)

    def __str__(self) -> str:
        return self.trial_name


def wandb_logger_callback(**kwargs: Any) -> Any:
    """Ray's ``WandbLoggerCallback`` (its arguments), whose W&B run files are whole when a
    trial's logging ends.

    Ray 2.60's logging actor returns once ``wandb.finish()`` has, and is then ``ray.kill``-ed;
    a killed Ray worker kills its child processes. W&B's service (``wandb-core``, a child)
    still writes the run's file after ``finish()`` returns, so the kill could cut the file
    short: offline runs lost their history and end records. The actor here also waits for
    the service to end (``wandb.teardown()``) before it returns."""
    # imported here: W&B is an optional extra, and a slow import for every process that
    # imports this module (each Train worker does)
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class WholeRunLoggingActor(_WandbLoggingActor):
        def run(self) -> None:
            super().run()
            self._wandb.teardown()

    class WholeRunWandbLoggerCallback(WandbLoggerCallback):
        _logger_actor_cls = WholeRunLoggingActor

    return WholeRunWandbLoggerCallback(**kwargs)


def wait_until_tune_took_the_reports(poll_s: float = 0.1) -> None:
    """Return once the Tune trial running this function has taken every report Ray Train
    queued for it (the queue ``train_controller.TrainToTune`` fills, as Tune's
    ``TuneReportCallback`` does).

    Ray 2.60's function trainable deadlocks when its function returns while such a report
    still waits: the function's end marker fills the trial's one-slot result queue, and the
    trial's main thread, moving the waiting report there, blocks for ever. Tune takes one
    report per ``train()`` call, so a controller slowed by its callbacks (trackers, a busy
    machine) leaves the last epoch's report waiting past the end of the fit."""
    session = _train_session()
    queue = getattr(session, "_inter_actor_queue", None)
    while queue is not None and not queue.empty():
        time.sleep(poll_s)
