"""What every Ray worker process of a run does first (the job's ``worker_process_setup_hook``).

1. Ray Train's torch backend calls ``ray.train.get_context`` while it sets each worker up, and
that call checks for a Tune session by importing ``ray.tune.trainable.trainable_fn_utils``.
Imported the usual way, that runs ``ray/tune/__init__.py``, which loads all of Ray Tune:
about 3 CPU-seconds in every worker process of every trial, for a check that imports nothing
from Tune itself. The hook loads that one module from its file ahead of time, so the check
finds it loaded. Every use of it in Ray is ``from ... import``, which finds it in
``sys.modules``; a process that later imports Ray Tune gets this same module object.

2. Ray Train's placement-group cleaner asks Ray's state API about actors without naming a
cluster, and the state API then looks for the cluster on this machine: with two local Ray
instances (two local grids, or a grid beside a test run) it finds both, fails, and the cleaner
dies. The hook points ``RAY_ADDRESS`` of each worker process at the cluster it belongs to.

Only the standard library and ``ray`` (already loaded in a Ray worker) are imported here: the
hook runs in every worker process of the job, light actors included.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import ray

TUNE_SESSION_CHECK = "ray.tune.trainable.trainable_fn_utils"
HOOK = f"{__name__}.setup_worker"


def setup_worker() -> None:
    """The hook: both steps above."""
    load_tune_session_check()
    pin_cluster_address()


def pin_cluster_address() -> None:
    """Name this process's own cluster to Ray's state API, unless an address is set."""
    if os.environ.get("RAY_ADDRESS"):
        return
    try:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected yet: the state API guesses as before
        pass


def load_tune_session_check() -> None:
    """Load the module of Tune's session check by itself, unless it is loaded already."""
    if TUNE_SESSION_CHECK in sys.modules:
        return
    path = Path(ray.__file__).parent / "tune" / "trainable" / "trainable_fn_utils.py"
    spec = importlib.util.spec_from_file_location(TUNE_SESSION_CHECK, path)
    if spec is None or spec.loader is None:
        return  # not where Ray 2.60 keeps it: the check imports Tune as usual
    module = importlib.util.module_from_spec(spec)
    sys.modules[TUNE_SESSION_CHECK] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - never break a worker's start over a speed-up
        sys.modules.pop(TUNE_SESSION_CHECK, None)
