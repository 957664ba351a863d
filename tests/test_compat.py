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
