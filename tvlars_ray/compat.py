"""Every private Ray or torch API the project uses, behind one small module.

Ray is pinned (``ray==2.60.0`` in pyproject.toml) and ``tests/test_compat.py`` checks each shim
against the installed release, so an upgrade that moves one of these fails there, in one
place, not deep inside a trial. (torch's ``_foreach_*`` multi-tensor kernels, which
``torch.optim`` itself is built on, are used directly by the optimizers.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from ray._private.state import state as _ray_state
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
