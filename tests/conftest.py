"""Shared fixtures: one real local Ray, shared by every test module that needs one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

ROOT = Path(__file__).resolve().parent.parent
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"

_SHARED: dict[str, str] = {}  # the GCS address of the Ray that ray_session started


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules that use ``ray_session`` last and one after another, so that one Ray
    start (~10 s of the suite's 2 cores) serves them all; each module keeps its own order,
    except that their tests that need no Ray up (``no_ray``) run before any of them."""
    uses_ray = {item.module for item in items if "ray_session" in item.fixturenames}

    def place(item: pytest.Item) -> int:
        if item.module not in uses_ray:
            return 0
        return 1 if "no_ray" in item.fixturenames else 2

    items.sort(key=place)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 2 CPUs and the trial-driver resource. Kept up for the next module
    that asks; started again where a test shut it down, connected elsewhere, or left CPUs
    held (a leaked placement group would make every later trial wait forever)."""
    import ray

    from tvlars_ray.cluster import connect

    if ray.is_initialized() and not _ours_and_free(ray):
        ray.shutdown()
    if not ray.is_initialized():
        connect(num_cpus=2)
        _SHARED["address"] = ray.get_runtime_context().gcs_address
    return ray


def _ours_and_free(ray, wait_s: float = 20.0) -> bool:
    if ray.get_runtime_context().gcs_address != _SHARED.get("address"):
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def no_ray():
    """For a test that checks a command starts no Ray: the shared one is shut down first
    (the next module that needs it starts it again)."""
    import ray

    ray.shutdown()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
