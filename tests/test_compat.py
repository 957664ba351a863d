"""The private Ray / torch APIs behind tvlars_ray.compat still work on the pinned releases."""

import logging
import re
import socket
from importlib.metadata import version
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from tvlars_ray import compat

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_ray_is_the_pinned_one():
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == compat.PINNED_RAY == ray.__version__ == version("ray")


def test_train_report_log_is_quieted():
    compat.quiet_train_report_log()
    from ray.train.v2._internal.execution import context, train_fn_utils

    for name in (context.__file__, train_fn_utils.__name__):
        assert logging.getLogger(name).level == logging.WARNING


def test_autoscaler_groups_without_a_cluster_is_an_empty_list():
    assert compat.autoscaler_node_groups() == []


def test_all_reduce_with_grad_sums_and_back_propagates():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        y = compat.all_reduce_with_grad(x * 3)
        y.sum().backward()
        assert y.tolist() == [3.0, 6.0] and x.grad.tolist() == [3.0, 3.0]
    finally:
        dist.destroy_process_group()


def test_tune_sessions_still_queue_trains_reports_where_the_wait_looks():
    """wait_until_tune_took_the_reports reads the queue Tune's TuneReportCallback fills."""
    from ray.train._internal.session import _TrainSession
    from ray.tune.integration.ray_train import TuneReportCallback

    assert hasattr(_TrainSession, "_get_or_create_inter_actor_queue")
    assert "_get_or_create_inter_actor_queue" in Path(
        __import__("inspect").getsourcefile(TuneReportCallback)).read_text()
    assert "self._inter_actor_queue" in Path(
        __import__("inspect").getsourcefile(_TrainSession)).read_text()
    compat.wait_until_tune_took_the_reports()  # outside Tune: returns at once


def test_the_controller_side_backend_is_rays_torch_backend():
    """train_controller's backend runs Ray's own worker functions; the trainer takes it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import config
    from ray.train.v2._internal.util import TrainingFramework

    from tvlars_ray.train_controller import TorchBackendConfig, on_worker

    for name in ("_set_torch_distributed_env_vars", "_setup_torch_process_group",
                 "_shutdown_torch", "TorchConfigContextManager"):
        assert callable(getattr(config, name))
    assert on_worker("_is_backend_nccl", backend="cpu:gloo,cuda:nccl")
    trainer = compat.TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                                  run_config=RunConfig(name="x"))
    backend = trainer.backend_config
    assert isinstance(backend, TorchBackendConfig) and backend.backend == "gloo"
    assert backend.framework == TrainingFramework.TORCH
    assert backend.to_dict() == {**config.TorchConfig(backend="gloo").to_dict()}


def test_the_trainer_leaves_out_ray_data_only_without_datasets(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    def kinds(**extra):
        trainer = compat.TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                                      run_config=RunConfig(storage_path=str(tmp_path)), **extra)
        return [type(c) for c in trainer._create_default_callbacks()]

    assert DatasetsCallback not in kinds()
    assert DatasetsCallback in kinds(datasets={"train": lambda: None})  # a dataset factory


def test_the_trainer_watches_its_placement_group_through_the_run_helper(tmp_path):
    """Ray's per-trial cleaner callback is swapped for ours, which falls back to Ray's own
    where the run has no helper; Tune's session still takes a queue object put in place."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train._internal.session import _TrainSession
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from tvlars_ray.train_controller import PlacementGroupWatch

    trainer = compat.TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                                  run_config=RunConfig(storage_path=str(tmp_path)))
    kinds = [type(c) for c in trainer._create_default_callbacks()]
    assert PlacementGroupWatch in kinds and PlacementGroupCleanerCallback not in kinds
    for hook in ("after_controller_start", "after_worker_group_start",
                 "before_controller_shutdown", "before_controller_abort"):
        assert callable(getattr(PlacementGroupCleanerCallback, hook))
    source = Path(__import__("inspect").getsourcefile(_TrainSession)).read_text()
    assert "if self._inter_actor_queue is None:" in source
    assert "self._inter_actor_queue.get(" in source and "except ray_queue.Empty" in source
