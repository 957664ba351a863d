"""The Ray cluster a run uses: joining or starting it, what its nodes hold, and whether the
trials fit.

Both the grid (Tune) and the single ``trial`` command go through here; nothing in it knows
Tune or touches tensors.

Resources: a Tune trial's own process (its driver function) takes a sliver of the custom
resource ``TUNE_DRIVER``, not a CPU, so the CPUs and GPUs all go to the DDP workers; otherwise a
trial's driver CPU plus its workers' CPUs can exceed a node and Ray waits forever. A Ray
started here declares that resource; on a cluster without it the driver takes 0.01 CPU and the
plan is checked to fit before anything starts.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from . import compat, process_setup, run_helper
from .config import TrialConfig
from .errors import UserError
from .store import Store

DRIVER_RESOURCE = "TUNE_DRIVER"
DRIVER_SHARE = 0.01
# Ray Train's controller polls its workers this often; its default (2 s) makes every
# ray.train.report wait up to 2 s, which dominates short epochs.
TRAIN_POLL_S = "0.25"
# A local Ray's dashboard agent samples every process every 5 s by default; on a laptop whose
# cores all train, that costs the DDP workers ~10% of their speed. Every 15 s is plenty there.
LOCAL_REPORTER_MS = "15000"


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run the trials as asked; the message says why and what to change."""


# Ray Train starts a PreemptionWatcher actor per trial (one more process, and an error line in
# the terminal each time) to serve ray.train.get_preemption_info, which nothing here reads: a
# drained node still ends its workers, and the trial restarts from its checkpoint as before.
PREEMPTION_WATCHER = "0"


def ray_env() -> dict[str, str]:
    """Settings every Ray Train controller and worker of a run reads from its environment
    (a variable the user set wins)."""
    return {name: os.environ.get(name, value) for name, value in (
        ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S),
        ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", PREEMPTION_WATCHER))}


def connect(address: str | None = None, num_cpus: int | None = None,
            num_gpus: int | None = None, log_to_driver: bool = True) -> str | None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a new local Ray
    (with its dashboard, and the driver resource declared).

    ``log_to_driver=False`` leaves what Ray's workers and actors print (trial drivers, Train
    controllers, DDP workers, raylets) in Ray's session logs instead of this terminal.
    Returns the dashboard's address when this call connected (None if Ray was up already).
    Either way the run's helper actor is started (see :mod:`tvlars_ray.run_helper`).
    """
    if ray.is_initialized():
        run_helper.start()
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.update(ray_env())
    # ray.init replaces the SIGTERM handler with one that exits at once (and its C++ core's,
    # which aborts): a handler the caller installed, to stop gracefully, is put back.
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        runtime_env = {"env_vars": ray_env(), "worker_process_setup_hook": process_setup.HOOK}
        context = ray.init(address=address, runtime_env=runtime_env,
                           log_to_driver=log_to_driver)
    else:
        # A Ray started here hands this process's environment to every worker process, so
        # the hook and the settings go there rather than into a runtime_env: a job with a
        # runtime_env starts each worker process through Ray's setup_worker.py, a second
        # Python start (~1 s) for each of the five processes of every trial.
        os.environ[compat.SETUP_HOOK_ENV] = process_setup.HOOK
        os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", LOCAL_REPORTER_MS)
        context = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                           resources={DRIVER_RESOURCE: 1000.0}, include_dashboard=True,
                           log_to_driver=log_to_driver)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    run_helper.start()
    return _dashboard(context)


def _dashboard(context) -> str | None:
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each node the run may use: the alive ones, or, on an autoscaling
    cluster whose node types can hold more GPUs than are up now, the nodes it may grow to."""
    alive = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    potential = autoscaler_nodes()
    head = [n for n in alive if not n.get("GPU")]

    def gpus(nodes: list[dict[str, float]]) -> float:
        return sum(n.get("GPU", 0) for n in nodes)

    return head + potential if gpus(potential) > gpus(alive) else alive


def autoscaler_nodes(cap: int = 64) -> list[dict[str, float]]:
    """The GPU node types the autoscaler may launch, each at its max count (none without an
    autoscaler, or where Ray does not report its configuration)."""
    nodes: list[dict[str, float]] = []
    for group in compat.autoscaler_node_groups():
        resources = {k: float(v) for k, v in group.resources.items()}
        if resources.get("GPU"):
            count = group.max_count if group.max_count >= 0 else cap
            nodes += [resources] * min(count, cap)
    return nodes


def cluster_gpus() -> float:
    """GPUs in the cluster (or that it may grow to): decides the default worker kind."""
    return sum(n.get("GPU", 0) for n in cluster_nodes())


def worker_resources(cfg: TrialConfig) -> dict[str, float]:
    """What one DDP worker of the trial reserves."""
    res = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        res["GPU"] = cfg.gpus_per_worker
    return res


@dataclass
class Plan:
    """What one trial asks of the cluster, and how many trials run at once."""

    driver: dict[str, float]
    worker: dict[str, float]
    workers: int
    concurrency: int

    @property
    def trials_per_gpu(self) -> int:
        """How many trials share one GPU (0 for CPU trials)."""
        share = self.worker.get("GPU", 0) * self.workers
        return int(1 / share + 1e-9) if share else 0

    def describe(self) -> str:
        def fmt(res: dict[str, float]) -> str:
            return ", ".join(f"{v:g} {k}" for k, v in res.items() if v)

        shared = f"; {self.trials_per_gpu} trials per GPU" if self.trials_per_gpu > 1 else ""
        return (f"each trial: driver {{{fmt(self.driver)}}} + {self.workers} x worker "
                f"{{{fmt(self.worker)}}}{shared}; {self.concurrency} trial(s) at a time")


def plan(trials: Sequence[TrialConfig], nodes: list[dict[str, float]] | None,
         max_concurrent: int | None = None) -> Plan:
    """Check that every trial fits the cluster and derive the concurrency.

    ``nodes=None`` plans for a Ray started here (it will declare the driver resource).
    """
    shapes = {(c.num_workers, tuple(sorted(worker_resources(c).items()))) for c in trials}
    if len(shapes) > 1:
        raise ClusterError("trials of one sweep must ask for the same resources (workers, "
                           "CPUs, GPUs per worker): split the grid or fix them with --set")
    first = trials[0]
    worker = worker_resources(first)
    workers = max(first.num_workers, 1)
    has_driver = nodes is None or any(n.get(DRIVER_RESOURCE, 0) >= DRIVER_SHARE for n in nodes)
    driver = {DRIVER_RESOURCE: DRIVER_SHARE} if has_driver else {"CPU": DRIVER_SHARE}
    if nodes is None:
        return Plan(driver, worker, workers, max_concurrent or 1)

    need = {k: v * workers for k, v in worker.items()}
    for key, value in driver.items():
        need[key] = need.get(key, 0) + value
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0) + value
    fits_node = any(all(node.get(k, 0) >= v for k, v in worker.items()) for node in nodes)
    short = [f"{need[k]:g} {k} (cluster has {totals.get(k, 0):g})" for k in need
             if totals.get(k, 0) + 1e-9 < need[k]]
    if short or not fits_node:
        what = "; ".join(short) or f"a worker needing {worker} fits on no single node"
        hint = ("lower --workers-per-trial / --cpus-per-worker, or add nodes"
                if not first.use_gpu else
                "lower --workers-per-trial / --gpus-per-worker, or add GPU nodes")
        raise ClusterError(f"one trial cannot fit on this cluster: it needs {what}: {hint}")
    fit = min(math.floor(totals.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)
    concurrency = max(1, fit)
    if max_concurrent:
        concurrency = min(concurrency, max_concurrent)
    return Plan(driver, worker, workers, concurrency)


def check_shared_store(st: Store) -> None:
    """A multi-node cluster must write to storage every node sees."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    hosts = {n.get("NodeManagerAddress") for n in alive}
    if len(hosts) <= 1 or not st.is_local:  # one machine sees its own disk
        return
    if os.environ.get("TVLARS_SHARED_FS") == "1":
        return
    raise ClusterError(
        f"the store {st.uri} is a local path but the cluster has {len(alive)} nodes: use "
        f"storage every node sees (s3://..., gs://..., or an NFS mount, then set "
        f"TVLARS_SHARED_FS=1)")
