"""What Ray Train's controller process unpickles for each trial, kept free of torch.

Every trial starts a fresh Train controller process, and every trial's start waits for it. It
unpickles the run's backend config and callbacks; Ray's ``TorchConfig`` lives in a module that
imports torch, and so did our Tune hand-off, so each controller spent ~4 CPU-seconds importing
a library it never calls. Here are the same two pieces with torch imported only where it runs,
on the workers:

- :class:`TorchBackendConfig`: Ray Train's torch backend (``ray.train.torch.TorchConfig``): the
  same process-group set-up on the workers (Ray's own worker functions, looked up there), for
  gloo, NCCL or any backend torch takes by name.
- :class:`TrainToTune`: Ray Tune's ``TuneReportCallback``, without importing Ray Tune.
- :class:`PlacementGroupWatch`: Ray Train's ``PlacementGroupCleanerCallback``, through the
  run's one helper actor (:mod:`tvlars_ray.run_helper`) instead of a cleaner per trial.

Like :mod:`tvlars_ray.compat`, this reaches Ray internals, checked against the pinned release in
``tests/test_compat.py``; ``tests/test_imports.py`` checks that it stays free of torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError
from ray.train._internal.session import get_session as _train_session
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.callback import UserCallback

from . import run_helper


def on_worker(name: str, **kwargs: Any) -> Any:
    """Run Ray's worker-side function ``ray.train.torch.config.<name>`` on a Train worker,
    importing it (and torch) there, not in the controller that sends it."""
    from ray.train.torch import config  # torch: only ever imported on a worker

    return getattr(config, name)(**kwargs)


class CudaDeviceContext:
    """Ray's ``TorchConfigContextManager``: the worker's default CUDA device set around the
    training function."""

    def __enter__(self) -> None:
        on_worker("TorchConfigContextManager").__enter__()

    def __exit__(self, *exc: Any) -> bool:
        return False


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class TorchBackend(Backend):
    """Ray's ``_TorchBackend`` for a V2 worker group: the DDP process group of the trial's
    workers (TPU set-up left out: no TPU here)."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo"
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(on_worker, name="_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(
            rank, on_worker, name="_setup_torch_process_group", backend=backend,
            world_rank=rank, world_size=len(worker_group), init_method="env://",
            timeout_s=backend_config.timeout_s) for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        futures = worker_group.execute_async(on_worker, name="_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=ray_constants.env_integer(
                TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        except GetTimeoutError:
            pass  # as Ray's: the workers are killed next anyway


@dataclass
class TorchBackendConfig(BackendConfig):
    """``ray.train.torch.TorchConfig`` (backend: None picks NCCL on GPUs, else gloo)."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[TorchBackend]:
        return TorchBackend

    @property
    def train_func_context(self) -> type[CudaDeviceContext]:
        return CudaDeviceContext

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class TrainToTune(UserCallback):
    """Ray Tune's ``TuneReportCallback`` (ray.tune.integration.ray_train), without Ray Tune.

    The Train controller and every Train worker unpickle the run's callbacks, and Tune's own
    class lives in ``ray.tune``, whose import costs each of those processes seconds per trial.
    This one hands the same metrics (rank 0's, with the checkpoint's path) to the queue of
    the Tune session it was built in, and imports nothing from Tune. That queue is the
    trial's in the run's helper (:mod:`tvlars_ray.run_helper`) where the run has one, rather
    than a queue actor of its own.
    """

    CHECKPOINT_PATH_KEY = "checkpoint_path"

    def __init__(self) -> None:
        session = _train_session()
        if getattr(session, "_inter_actor_queue", None) is None:
            helper = run_helper.find()
            if helper is not None:
                session._inter_actor_queue = run_helper.ReportQueue(helper)
        self._queue = session._get_or_create_inter_actor_queue()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        reported = dict(metrics[0])
        if checkpoint:
            reported[self.CHECKPOINT_PATH_KEY] = checkpoint.path
        self._queue.put(reported)

    def close(self) -> None:
        """Let the helper drop the trial's queue (Ray's own queue actor ends with its
        handle)."""
        if isinstance(self._queue, run_helper.ReportQueue):
            self._queue.close()


class PlacementGroupWatch(ControllerCallback, WorkerGroupCallback):
    """Ray Train's ``PlacementGroupCleanerCallback``, with the run's helper as the cleaner:
    it removes the trial's placement group if this controller dies first. Without a helper
    (a TorchTrainer started outside this tool's commands) it is Ray's callback itself."""

    def __init__(self) -> None:
        self._ray = PlacementGroupCleanerCallback()
        self._helper: Any = None
        self._controller_id: str | None = None

    def after_controller_start(self, train_run_context: Any) -> None:
        self._helper = run_helper.find()
        if self._helper is None:
            self._ray.after_controller_start(train_run_context)
            return
        self._controller_id = ray.get_runtime_context().get_actor_id()

    def after_worker_group_start(self, worker_group: Any) -> None:
        if self._helper is None:
            self._ray.after_worker_group_start(worker_group)
            return
        state = worker_group.get_worker_group_state()
        group = state.placement_group_handle.placement_group
        ray.get(self._helper.watch.remote(self._controller_id, group))

    async def before_controller_shutdown(self) -> None:
        if self._helper is None:
            await self._ray.before_controller_shutdown()
            return
        self._forget()

    def before_controller_abort(self) -> None:
        if self._helper is None:
            self._ray.before_controller_abort()
            return
        self._forget()

    def _forget(self) -> None:
        try:
            ray.get(self._helper.forget.remote(self._controller_id), timeout=10)
        except Exception:  # noqa: BLE001 - the helper is gone with its driver: nothing to do
            pass
