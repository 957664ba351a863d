"""Every private Ray or torch API the project uses, behind one small module.

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
from ray._private.state import state as _ray_state
from ray.train._internal.session import get_session as _tune_session
from ray.train.v2._internal.execution import context as _train_context
from ray.train.v2._internal.execution import train_fn_utils as _train_fn_utils
from torch.distributed import _functional_collectives as _fcol

PINNED_RAY = "2.60.0"


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


def wait_until_tune_took_the_reports(poll_s: float = 0.1) -> None:
    """Return once the Tune trial running this function has taken every report Ray Train
    queued for it (the queue behind Tune's ``TuneReportCallback``).

    Ray 2.60's function trainable deadlocks when its function returns while such a report
    still waits: the function's end marker fills the trial's one-slot result queue, and the
    trial's main thread, moving the waiting report there, blocks for ever. Tune takes one
    report per ``train()`` call, so a controller slowed by its callbacks (trackers, a busy
    machine) leaves the last epoch's report waiting past the end of the fit."""
    session = _tune_session()
    queue = getattr(session, "_inter_actor_queue", None)
    while queue is not None and not queue.empty():
        time.sleep(poll_s)
