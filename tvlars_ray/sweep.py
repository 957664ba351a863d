"""Ray Tune over trials: each Tune trial is a function that builds and fits one TorchTrainer.

This is the only module that knows Tune. It never touches tensors: it sizes resources, starts
(or joins) Ray, hands each trial's settings to Ray Train, and keeps the store's per-trial rows
right when Tune itself ends a trial (an early stop, a crash).

Resources: a trial's own process (the Tune function) takes a sliver of the custom resource
``TUNE_DRIVER``, not a CPU, so the CPUs and GPUs all go to the DDP workers; otherwise a trial's
driver CPU plus its workers' CPUs can exceed a node and Ray waits forever. Ray started here
declares that resource; on a cluster without it the driver takes 0.01 CPU and the plan is
checked to fit before anything starts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from .config import ConfigError, TrialConfig
from .monitor import SweepMetrics
from .store import Store
from .trial import expected_epochs, final_status, fit_trial, one_line, worker_resources

DRIVER_RESOURCE = "TUNE_DRIVER"
DRIVER_SHARE = 0.01
# Ray Train's controller polls its workers this often; its default (2 s) makes every
# ray.train.report wait up to 2 s, which dominates short epochs.
TRAIN_POLL_S = "0.25"
# A local Ray's dashboard agent samples every process every 5 s by default; on a laptop whose
# cores all train, that costs the DDP workers ~10% of their speed. Every 15 s is plenty there.
LOCAL_REPORTER_MS = "15000"


class SweepError(RuntimeError):
    """The sweep cannot start as asked; the message says why and what to change."""


# -- Ray -----------------------------------------------------------------------------------
def ray_env() -> dict[str, str]:
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":
            os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)}


def connect(address: str | None = None, num_cpus: int | None = None,
            num_gpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a new local Ray
    (with its dashboard, and the driver resource declared)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.update(ray_env())
    runtime_env = {"env_vars": ray_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", LOCAL_REPORTER_MS)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
             resources={DRIVER_RESOURCE: 1000.0}, include_dashboard=True,
             runtime_env=runtime_env)


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each node the sweep may use: the alive ones, or, on an autoscaling
    cluster whose node types can hold more GPUs than are up now, the nodes it may grow to."""
    alive = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    potential = _autoscaler_nodes()
    head = [n for n in alive if not n.get("GPU")]

    def gpus(nodes: list[dict[str, float]]) -> float:
        return sum(n.get("GPU", 0) for n in nodes)

    return head + potential if gpus(potential) > gpus(alive) else alive


def _autoscaler_nodes(cap: int = 64) -> list[dict[str, float]]:
    """The GPU node types the autoscaler may launch, each at its max count (none without an
    autoscaler, or where Ray does not report its configuration)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older clusters do not report it
        return []
    nodes: list[dict[str, float]] = []
    for group in getattr(config, "node_group_configs", []) or []:
        resources = {k: float(v) for k, v in group.resources.items()}
        if resources.get("GPU"):
            count = group.max_count if group.max_count >= 0 else cap
            nodes += [resources] * min(count, cap)
    return nodes


# -- planning ------------------------------------------------------------------------------
@dataclass
class Plan:
    """What one trial asks of the cluster, and how many trials run at once."""

    driver: dict[str, float]
    worker: dict[str, float]
    workers: int
    concurrency: int

    def describe(self) -> str:
        def fmt(res: dict[str, float]) -> str:
            return ", ".join(f"{v:g} {k}" for k, v in res.items() if v)

        return (f"each trial: driver {{{fmt(self.driver)}}} + {self.workers} x worker "
                f"{{{fmt(self.worker)}}}; {self.concurrency} trial(s) at a time")


def plan(trials: Sequence[TrialConfig], nodes: list[dict[str, float]] | None,
         max_concurrent: int | None = None) -> Plan:
    """Check that every trial fits the cluster and derive the concurrency.

    ``nodes=None`` plans for a Ray started here (it will declare the driver resource).
    """
    shapes = {(c.num_workers, tuple(sorted(worker_resources(c).items()))) for c in trials}
    if len(shapes) > 1:
        raise SweepError("trials of one sweep must ask for the same resources (workers, CPUs, "
                         "GPUs per worker): split the grid or fix them with --set")
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
        raise SweepError(f"one trial cannot fit on this cluster: it needs {what}: {hint}")
    fit = min(math.floor(totals.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)
    concurrency = max(1, fit)
    if max_concurrent:
        concurrency = min(concurrency, max_concurrent)
    return Plan(driver, worker, workers, concurrency)


def trial_table(trials: Sequence[TrialConfig]) -> list[dict[str, Any]]:
    """The settings that vary across trials, one dict per trial (for --dry-run and display)."""
    keys = varying_keys(trials)
    return [{k: getattr(c, k) for k in keys} for c in trials]


def varying_keys(trials: Sequence[TrialConfig]) -> list[str]:
    from .config import irrelevant_fields

    keys = []
    for name in TrialConfig.__dataclass_fields__:
        values = {getattr(c, name) for c in trials if name not in irrelevant_fields(c)}
        if len(values) > 1:
            keys.append(name)
    return keys


# -- the Tune trial ----------------------------------------------------------------------
def run_trial(config: dict[str, Any], store: str, experiment: str,
              grid: dict[str, dict[str, Any]] | None = None,
              base: dict[str, Any] | None = None) -> None:
    """One Tune trial: one TorchTrainer run, its reports forwarded to Tune.

    A grid trial finds its settings in ``grid`` under ``config["trial"]``; an Optuna trial
    merges its sampled values into ``base``.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TrialConfig.from_dict(trial_settings(config, grid, base))
    fit_trial(cfg, store, experiment, tune.get_context().get_trial_id(),
              callbacks=[TuneReportCallback()], record_failure=False)


def trial_settings(config: dict[str, Any], grid: dict[str, dict[str, Any]] | None,
                   base: dict[str, Any] | None) -> dict[str, Any]:
    """A Tune trial's full settings: its grid entry, or the base plus Optuna's samples."""
    if grid is not None:
        return grid[config["trial"]]
    return {**(base or {}), **{k: v for k, v in config.items()
                               if k in TrialConfig.__dataclass_fields__}}


class ProgressTable(tune.Callback):
    """A live table of the sweep with the project's key columns, every ``every`` seconds.

    Tune's own table can only show the sampled parameters; a grid of non-cartesian points
    would show an index. This one shows optimizer, batch, lr, lambda, epoch and accuracy.
    """

    COLUMNS = ("trial", "status", "opt", "bs", "lr", "lmbda", "epoch", "test_acc", "best",
               "img/s")

    def __init__(self, grid: dict[str, dict[str, Any]] | None, base: dict[str, Any] | None,
                 every: float = 15.0) -> None:
        self.grid, self.base, self.every = grid, base, every
        self.results: dict[str, dict[str, Any]] = {}
        self.best: dict[str, float] = {}
        self.last_print = 0.0

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info: Any) -> None:
        self.results[trial.trial_id] = result
        acc = result.get("test_acc")
        if isinstance(acc, float) and acc == acc:
            self.best[trial.trial_id] = max(acc, self.best.get(trial.trial_id, 0.0))
        self._maybe_print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._maybe_print(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._maybe_print(trials, force=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._maybe_print(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._maybe_print(trials, force=True)

    def _maybe_print(self, trials: list, force: bool = False) -> None:
        import time

        now = time.monotonic()
        if not force and now - self.last_print < self.every:
            return
        self.last_print = now
        print(self.render(trials), flush=True)

    def render(self, trials: list) -> str:
        counts: dict[str, int] = {}
        rows = []
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
            cfg = trial_settings(trial.config, self.grid, self.base)
            result = self.results.get(trial.trial_id, {})
            epochs = cfg.get("epochs", TrialConfig.epochs)
            epoch = f"{result['epoch'] + 1}/{epochs}" if "epoch" in result else f"-/{epochs}"
            acc = result.get("test_acc")
            rows.append([
                trial.trial_id, trial.status.lower(), cfg.get("opt", TrialConfig.opt),
                str(cfg.get("bs", TrialConfig.bs)), f"{float(cfg.get('lr', TrialConfig.lr)):g}",
                f"{float(cfg.get('lmbda', TrialConfig.lmbda)):g}"
                if cfg.get("opt") == "tvlars" else "-",
                epoch, _pct(acc), _pct(self.best.get(trial.trial_id)),
                f"{result['samples_per_s']:.0f}" if "samples_per_s" in result else "-",
            ])
        widths = [max(len(str(x)) for x in col) for col in zip(self.COLUMNS, *rows)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths))
                 for line in [self.COLUMNS, *rows]]
        head = "trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        return "\n".join(["", head, *lines])


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{100 * value:.1f}%"


class StoreCallback(tune.Callback):
    """Settle the store row of each trial Tune ends (a trial stopped by a scheduler, ASHA,
    or killed mid-run never writes its own final status), and export the sweep's counts."""

    def __init__(self, store: str, experiment: str) -> None:
        self.store, self.experiment = store, experiment
        self.metrics: SweepMetrics | None = None
        self.final: dict[str, str] = {}  # trial id -> stored status, once it has ended

    def setup(self, **info: Any) -> None:
        self.metrics = SweepMetrics(self.experiment)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._export(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        st = Store(self.store)
        row = st.trial_row(self.experiment, trial.trial_id)
        if row.get("status") == "running":
            cfg = st.row_config(row)
            status = final_status(cfg, st.trial_epochs(self.experiment, trial.trial_id))
            st.write_trial(self.experiment, trial.trial_id, cfg, status)
        self._export(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        error = None
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as fh:
                error = one_line(RuntimeError(fh.read()))
        st = Store(self.store)
        row = st.trial_row(self.experiment, trial.trial_id)
        if row:
            st.write_trial(self.experiment, trial.trial_id, st.row_config(row), "failed", error)
        self._export(trials)

    def _export(self, trials: list) -> None:
        """Pending and running from Tune, the final statuses from the store: each ended
        trial's row is read once, not the whole table at every event."""
        if self.metrics is None:
            return
        counts = {"pending": sum(t.status == "PENDING" for t in trials),
                  "running": sum(t.status == "RUNNING" for t in trials)}
        st = Store(self.store)
        for t in trials:
            if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self.final:
                status = st.trial_row(self.experiment, t.trial_id).get("status")
                if status:
                    self.final[t.trial_id] = status
        for status in self.final.values():
            counts[status] = counts.get(status, 0) + 1
        self.metrics.update(counts)


# -- sweeps --------------------------------------------------------------------------------
@dataclass
class Sweep:
    """Where a sweep's results go and how it runs."""

    store: str = "results"
    experiment: str = "default"
    resume: bool = False
    overwrite: bool = False
    max_concurrent: int | None = None
    address: str | None = None
    verbose: int = 1

    def check(self) -> Store:
        """Refuse a clash with what the store holds, before anything starts."""
        st = Store(self.store)
        if self.overwrite and self.resume:
            raise SweepError("--resume and --overwrite contradict each other: pick one")
        exists = st.exists(self.experiment)
        if exists and not (self.resume or self.overwrite):
            raise SweepError(
                f"experiment '{self.experiment}' already exists in {st.uri}: add --resume to "
                f"finish it, --overwrite to start it again, or pick another --experiment")
        if self.resume and not exists:
            raise SweepError(f"nothing to resume: no experiment '{self.experiment}' in {st.uri}")
        return st

    def prepare(self) -> Store:
        st = self.check()
        if self.overwrite:
            st.delete(self.experiment)
        return st

    def tune_path(self, st: Store) -> str:
        return st.uri_of(self.experiment, "tune")


def save_grid(st: Store, experiment: str, grid: dict[str, dict[str, Any]]) -> None:
    path = st.path(experiment, "grid.json")
    st.fs.create_dir(st.path(experiment), recursive=True)
    with st.fs.open_output_stream(path) as fh:
        fh.write(json.dumps(grid, indent=1, sort_keys=True).encode())


def load_grid(st: Store, experiment: str) -> dict[str, dict[str, Any]]:
    """The grid as it was started (a resume runs that, whatever the space file says now)."""
    try:
        with st.fs.open_input_stream(st.path(experiment, "grid.json")) as fh:
            return json.loads(fh.read().decode())
    except (FileNotFoundError, OSError):
        raise SweepError(f"experiment '{experiment}' in {st.uri} was not started by `grid` "
                         f"(no grid.json): resume it with the command that started it") from None


def _trainable(st: Store, sweep: Sweep, plan_: Plan, **params: Any):
    fn = tune.with_parameters(run_trial, store=st.uri_of(), experiment=sweep.experiment,
                              **params)
    fn = tune.with_resources(fn, plan_.driver)
    return fn


def _run_config(st: Store, sweep: Sweep, grid=None, base=None):
    callbacks: list[tune.Callback] = [StoreCallback(st.uri_of(), sweep.experiment)]
    if sweep.verbose:
        callbacks.append(ProgressTable(grid, base))
    return tune.RunConfig(
        name="tune", storage_path=st.uri_of(sweep.experiment), verbose=0,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=0),
    )


def run_grid(trials: Sequence[TrialConfig], sweep: Sweep) -> tune.ResultGrid:
    """Run (or resume) a grid: every trial once, each a TorchTrainer fit."""
    st = sweep.prepare()
    if sweep.resume:
        grid = load_grid(st, sweep.experiment)
    else:
        grid = {f"{i:04d}": cfg.to_dict() for i, cfg in enumerate(trials)}
    cfgs = [TrialConfig.from_dict(v) for v in grid.values()]
    connect(sweep.address)
    plan_ = plan(cfgs, cluster_nodes(), sweep.max_concurrent)
    check_shared_store(st)
    if not sweep.resume:
        save_grid(st, sweep.experiment, grid)
    trainable = _trainable(st, sweep, plan_, grid=grid)
    path = sweep.tune_path(st)
    if sweep.resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(sorted(grid))},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan_.concurrency),
            run_config=_run_config(st, sweep, grid=grid),
        )
    return tuner.fit()


def run_optuna(space, num_samples: int, sweep: Sweep, seed: int = 0,
               asha: bool = False, grace_period: int = 1) -> tune.ResultGrid:
    """An Optuna study through Tune's OptunaSearch (seeded), optionally with ASHA stopping."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    st = sweep.prepare()
    base = space.base_config()
    probe = TrialConfig.from_dict(base)
    connect(sweep.address)
    plan_ = plan([probe], cluster_nodes(), sweep.max_concurrent)
    check_shared_store(st)
    trainable = _trainable(st, sweep, plan_, base=base)
    path = sweep.tune_path(st)
    if sweep.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True).fit()
    param_space = {key: _domain(kind, args) for key, (kind, args) in space.search.items()}
    scheduler = None
    if asha:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=expected_epochs(probe),
                                  grace_period=grace_period, reduction_factor=2)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(seed=seed), scheduler=scheduler, num_samples=num_samples,
            metric=space.metric, mode=space.mode, max_concurrent_trials=plan_.concurrency),
        run_config=_run_config(st, sweep, base=base),
    )
    return tuner.fit()


def _domain(kind: str, args: list[Any]):
    if kind == "choice":
        return tune.choice(args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(args[0], args[1] + 1)


def check_shared_store(st: Store) -> None:
    """A multi-node cluster must write to storage every node sees."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    hosts = {n.get("NodeManagerAddress") for n in alive}
    if len(hosts) <= 1 or not st.is_local:  # one machine sees its own disk
        return
    if os.environ.get("TVLARS_SHARED_FS") == "1":
        return
    raise SweepError(
        f"the store {st.uri} is a local path but the cluster has {len(alive)} nodes: use "
        f"storage every node sees (s3://..., gs://..., or an NFS mount, then set "
        f"TVLARS_SHARED_FS=1)")


def trials_or_error(space) -> list[TrialConfig]:
    trials = space.trials()
    if not trials:
        raise ConfigError(f"{space.name}: the space expands to no trials")
    return trials
