"""Shared fixtures: one real local Ray per test module that needs one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

ROOT = Path(__file__).resolve().parent.parent
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 2 CPUs and the trial-driver resource, shared by a test module."""
    import ray

    from tvlars_ray.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(num_cpus=2)
    yield ray
    ray.shutdown()
