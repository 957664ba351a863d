"""Ray Tune over trials: each Tune trial is a driver function that builds and fits one
TorchTrainer.

This is the only module that knows Tune. It never touches tensors: it hands each trial's
settings to Ray Train (through :mod:`tvlars_ray.trial`), on resources planned by
:mod:`tvlars_ray.cluster`, and keeps the store's per-trial rows right when Tune itself ends a
trial (an early stop, a crash).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from .cluster import Plan, check_shared_store, cluster_nodes, connect, plan
from .config import ConfigError, TrialConfig
from .console import pct, render_table
from .errors import UserError
from .monitor import SweepMetrics
from .store import Store
from .trial import expected_epochs, final_status, fit_trial, one_line


class SweepError(UserError, RuntimeError):
    """The sweep cannot start as asked; the message says why and what to change."""


# -- the Tune trial ----------------------------------------------------------------------
def train_driver_fn(config: dict[str, Any], store: str, experiment: str,
                    grid: dict[str, dict[str, Any]] | None = None,
                    base: dict[str, Any] | None = None) -> None:
    """One Tune trial, run in its driver process: one TorchTrainer run, its reports forwarded
    to Tune.

    A grid trial finds its settings in ``grid`` under ``config["trial"]``; an Optuna trial
    merges its sampled values into ``base``.
    """
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
                epoch, pct(acc), pct(self.best.get(trial.trial_id)),
                f"{result['samples_per_s']:.0f}" if "samples_per_s" in result else "-",
            ])
        head = "trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        return "\n".join(["", head, render_table(self.COLUMNS, rows)])


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


def load_grid(st: Store, experiment: str) -> dict[str, dict[str, Any]]:
    """The grid as it was started (a resume runs that, whatever the space file says now)."""
    grid = st.read_grid(experiment)
    if grid is None:
        raise SweepError(f"experiment '{experiment}' in {st.uri} was not started by `grid` "
                         f"(no grid.json): resume it with the command that started it")
    return grid


def _trainable(st: Store, sweep: Sweep, plan_: Plan, **params: Any):
    fn = tune.with_parameters(train_driver_fn, store=st.uri_of(), experiment=sweep.experiment,
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
        st.write_grid(sweep.experiment, grid)
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


def trials_or_error(space) -> list[TrialConfig]:
    trials = space.trials()
    if not trials:
        raise ConfigError(f"{space.name}: the space expands to no trials")
    return trials
