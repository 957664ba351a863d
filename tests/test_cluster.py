"""The cluster plan: what a trial needs, whether it fits, how many run at once, GPU shares."""

import os

import pytest
import ray

from tvlars_ray.cluster import DRIVER_RESOURCE, ClusterError, cluster_nodes, connect, plan
from tvlars_ray.config import ConfigError, TrialConfig
from tvlars_ray.run import main


def test_plan_refuses_trials_that_cannot_fit():
    cfg = TrialConfig(ds="synthetic", num_workers=4, cpus_per_worker=1)
    nodes = [{"CPU": 2.0, DRIVER_RESOURCE: 100.0}]
    with pytest.raises(ClusterError, match="cannot fit"):
        plan([cfg], nodes)
    gpu = TrialConfig(ds="synthetic", num_workers=2, use_gpu=True)
    with pytest.raises(ClusterError, match="GPU"):
        plan([gpu], [{"CPU": 16.0, "GPU": 1.0}])
    # 8 GPUs, 2 per trial: 4 at a time, never more GPUs than there are
    four = plan([gpu], [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}])
    assert four.concurrency == 4 and four.driver == {"CPU": 0.01}
    # the driver takes the custom resource where the cluster declares it
    two = plan([TrialConfig(ds="synthetic", num_workers=2)], nodes)
    assert two.driver == {DRIVER_RESOURCE: 0.01} and two.concurrency == 1


def test_fractional_gpus_pack_trials_onto_each_gpu():
    quarter = TrialConfig(ds="synthetic", num_workers=1, use_gpu=True, gpus_per_worker=0.25,
                          cpus_per_worker=2)
    one_gpu = plan([quarter], [{"CPU": 16.0, "GPU": 1.0}])
    assert one_gpu.trials_per_gpu == 4 and one_gpu.concurrency == 4
    assert "4 trials per GPU" in one_gpu.describe()
    # 8 GPUs over two nodes: 32 quarter-GPU trials at once, CPUs permitting (16 of them here,
    # with the drivers on the custom resource; 15 when each driver also takes 0.01 CPU)
    node = {"CPU": 16.0, "GPU": 4.0, DRIVER_RESOURCE: 100.0}
    assert plan([quarter], [node, node]).concurrency == 16
    assert plan([quarter], [{"CPU": 16.0, "GPU": 4.0}] * 2).concurrency == 15
    third = plan([quarter.replace(gpus_per_worker=0.3)], [{"CPU": 64.0, "GPU": 2.0}])
    assert third.trials_per_gpu == 3 and third.concurrency == 6
    whole = plan([quarter.replace(gpus_per_worker=1.0)], [{"CPU": 16.0, "GPU": 2.0}])
    assert whole.trials_per_gpu == 1 and "per GPU" not in whole.describe()


def test_a_shared_gpu_needs_one_worker_per_trial():
    with pytest.raises(ConfigError, match="needs one worker per trial"):
        TrialConfig(ds="synthetic", num_workers=2, use_gpu=True, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        TrialConfig(ds="synthetic", num_workers=1, use_gpu=True, gpus_per_worker=1.5)
    # without GPUs the setting does not apply and is not checked
    assert TrialConfig(ds="synthetic", num_workers=2, gpus_per_worker=0.5).num_workers == 2


def test_dry_run_says_how_many_trials_share_a_gpu(capsys):
    assert main(["grid", "--space", "quickstart", "--workers-per-trial", "1",
                 "--gpus-per-worker", "0.25", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0.25 GPU" in out and "4 trials per GPU" in out


@pytest.fixture(scope="module")
def fake_gpu_node():
    """A local Ray node that declares one GPU on a machine without one: the planner and Ray's
    scheduler see a GPU, nothing here runs CUDA or NCCL. (Ray refuses to start a node with GPUs
    and an empty CUDA_VISIBLE_DEVICES, so it is left as it is.)"""
    if ray.is_initialized():
        ray.shutdown()
    connect(num_cpus=2, num_gpus=1)
    yield ray
    ray.shutdown()


def test_a_fake_gpu_node_runs_four_quarter_gpu_trials_at_once(fake_gpu_node):
    ray = fake_gpu_node
    quarter = TrialConfig(ds="synthetic", num_workers=1, use_gpu=True, gpus_per_worker=0.25,
                          cpus_per_worker=0.5)
    nodes = cluster_nodes()
    assert sum(n.get("GPU", 0) for n in nodes) == 1
    assert plan([quarter], nodes).concurrency == 4

    @ray.remote(num_gpus=0.25, num_cpus=0.5)
    class Share:
        def gpu(self):
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    shares = [Share.remote() for _ in range(4)]  # all four at once, or this waits forever
    seen = ray.get([s.gpu.remote() for s in shares], timeout=120)
    assert all(ids == [0] and visible == "0" for ids, visible in seen), seen
