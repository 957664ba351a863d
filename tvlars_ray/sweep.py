"""Ray Tune over trials: each Tune trial is a driver function that builds and fits one
TorchTrainer.

This is the only module that runs Tune (:mod:`tvlars_ray.trackers` hands it Ray's logger
callbacks). It never touches tensors: it hands each trial's settings to Ray Train (through
:mod:`tvlars_ray.trial`), on resources planned by :mod:`tvlars_ray.cluster`, and keeps the
store's per-trial rows right when Tune itself ends a trial (an early stop, a crash).

Tune is given each trial's full settings as its config (a grid: a grid_search over the
deduplicated points of grid.json, every setting drawn from the point; a study: Optuna's
samples plus the rest), so Tune's results, dataframe and trackers show the real
hyperparameters, and trials are named by what varies (``tvlars-bs512-lr2-lmbda0.001-s0``).

A sweep holds its experiment's lock while it runs. Ctrl-C or SIGTERM stops it the way Tune's
own Ctrl-C does (Tune saves its state and stops the trials within seconds), then no trial is
left ``running`` in the store and ``KeyboardInterrupt`` tells the command line to print the
``--resume`` command. A grid resumes from the store, not from Tune's state: every grid point
whose epochs are not all stored runs (from its checkpoint, or, if it lost epochs, again from
its start writing only those), and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from .cluster import Plan, check_shared_store, cluster_nodes, connect, plan
from .compat import wait_until_tune_took_the_reports
from .config import FIELD_NAMES, ConfigError, TrialConfig, field_type, varying_keys
from .console import pct, render_table
from .errors import UserError
from .monitor import SweepMetrics
from .provenance import trial_columns
from .store import (
    Lock,
    Store,
    StoreError,
    StoreWriteError,
    check_name,
    config_columns,
    expected_epochs,
)
from .trackers import tune_callbacks
from .train_controller import TrainToTune
from .trial import fit_trial, one_line, rerun

# A trial's driver is a process that imports Tune, Ray Train and torch (seconds on a laptop);
# Tune hands it the next trial instead of starting a new one. Each trial still builds its own
# TorchTrainer (controller, workers, DDP group): only the driver's process is reused. Not under
# a scheduler that stops trials early (ASHA): Tune then gives the stopped trial's thread 2 s to
# end before handing its process on, a TorchTrainer takes longer to wind down, and Tune fails
# the next trial ("Could not re-use actor") instead of starting a new process for it.
REUSE_DRIVERS = True


class SweepError(UserError, RuntimeError):
    """The sweep cannot start as asked; the message says why and what to change."""


# -- what Tune sees of a trial ------------------------------------------------------------
POINT = "point"  # a grid trial's key in grid.json: Tune's grid_search runs over these


def tune_settings(cfg: TrialConfig) -> dict[str, Any]:
    """The trial's settings as Tune (its config, dataframe, trial names) and the trackers see
    them: the store's setting columns, null where a setting does not apply (lmbda for LARS)."""
    return config_columns(cfg)


def settings_from_tune(config: dict[str, Any]) -> TrialConfig:
    """The TrialConfig behind a Tune config: a null that only marks a setting that does not
    apply leaves it at its default (a setting that may be None keeps its None)."""
    return TrialConfig.from_dict({k: v for k, v in config.items() if k in FIELD_NAMES
                                  and (v is not None or field_type(k)[1])})


class _FromPoint:
    """One setting of a grid trial, read from its grid point: the ``tune.sample_from`` beside
    the grid_search over points, so each Tune trial is given every setting, not an index."""

    def __init__(self, points: dict[str, dict[str, Any]], name: str) -> None:
        self.points, self.name = points, name

    def __call__(self, config: dict[str, Any]) -> Any:
        if POINT not in config:  # Tune's variant generator alone passes the whole spec
            config = config["config"]
        return self.points[config[POINT]][self.name]

    def __deepcopy__(self, memo: dict) -> _FromPoint:
        return self  # Tune copies the space for every trial; the points are never changed


def grid_space(grid: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's param_space for a grid: a grid_search over the points (the deduplicated trials,
    not a cartesian product), each setting drawn from the trial's point."""
    points = {key: tune_settings(TrialConfig.from_dict(v)) for key, v in grid.items()}
    return {POINT: tune.grid_search(sorted(points)),
            **{name: tune.sample_from(_FromPoint(points, name)) for name in FIELD_NAMES}}


class Hyperparameters(tune.Callback):
    """A trial's hyperparameters as Tune's loggers record them (TensorBoard's hparams) are
    ``trial.evaluated_params``: what the variant generator drew. Of a grid trial that is the
    point alone: Tune turns each ``tune.sample_from`` into a placeholder before it draws, and
    fills the settings into the config only after. This adds every setting of the config."""

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        settings = {k: trial.config[k] for k in FIELD_NAMES if k in trial.config}
        trial.evaluated_params = {**settings, **trial.evaluated_params}


class _OptunaWithSettings(OptunaSearch):
    """Tune's OptunaSearch whose suggestions carry every setting of the trial, not only the
    sampled ones, so Tune's config and the trackers' hyperparameters hold them all."""

    def __init__(self, base: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        sampled = super().suggest(trial_id)
        if not isinstance(sampled, dict):  # None (wait) or FINISHED
            return sampled
        try:
            full = tune_settings(TrialConfig.from_dict({**self.base, **sampled}))
        except ConfigError:  # a combination out of bounds: the trial itself says so
            full = TrialConfig.from_dict(self.base).to_dict()
        return {**full, **sampled}


def _short(key: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{key}{value:.4g}" if isinstance(value, float) else f"{key}{value}"
    return f"{key}={value}"


def trial_name(config: dict[str, Any], keys: Sequence[str]) -> str:
    """``tvlars-bs512-lr2-lmbda0.001-s0``: the optimizer, the given settings where they
    apply, and the seed; safe as a folder name."""
    parts = [str(config.get("opt", TrialConfig.opt))]
    parts += [_short(k, config[k]) for k in keys
              if k not in ("opt", "seed") and config.get(k) is not None]
    parts.append(f"s{config.get('seed', TrialConfig.seed)}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))[:150]


class TrialNames:
    """Tune's trial_name_creator and trial_dirname_creator: trials named by what varies.

    A grid's names come from the settings that vary across it (made unique with the point's
    key where two would clash); an Optuna trial's from its sampled settings and its number.
    """

    def __init__(self, grid: dict[str, dict[str, Any]] | None = None,
                 sampled: Sequence[str] = ()) -> None:
        self.sampled = list(sampled)
        self.names: dict[str, str] = {}
        if grid:
            cfgs = {key: TrialConfig.from_dict(v) for key, v in grid.items()}
            keys = varying_keys(list(cfgs.values()))
            names = {key: trial_name(tune_settings(c), keys) for key, c in cfgs.items()}
            clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
            self.names = {key: f"{n}-p{key}" if n in clashes else n for key, n in names.items()}

    def __call__(self, trial) -> str:
        config = trial.config
        if POINT in config and config[POINT] in self.names:
            return self.names[config[POINT]]
        return f"{trial_name(config, self.sampled)}-{trial.trial_id.rsplit('_', 1)[-1]}"


# -- the Tune trial ----------------------------------------------------------------------
def train_driver_fn(config: dict[str, Any], store: str, experiment: str,
                    ids: dict[str, str] | None = None,
                    fills: dict[str, list] | None = None,
                    provenance: dict[str, Any] | None = None) -> None:
    """One Tune trial, run in its driver process: one TorchTrainer run, its reports forwarded
    to Tune. ``config`` holds the trial's settings (see :func:`tune_settings`).

    A resumed grid point keeps its store id (``ids``, by the point's key), and one that lost
    epochs refills them (``fills``).
    """
    key = config.get(POINT)
    trial_id = (ids or {}).get(key) or tune.get_context().get_trial_id()
    to_tune = TrainToTune()
    try:
        fit_trial(settings_from_tune(config), store, experiment, trial_id,
                  callbacks=[to_tune], record_failure=False, fill=(fills or {}).get(key),
                  provenance=provenance)
        wait_until_tune_took_the_reports()  # else Ray 2.60 may hang: see there
    finally:
        to_tune.close()


class ProgressTable(tune.Callback):
    """A live table of the sweep with the project's key columns, every ``every`` seconds.

    Tune's own table can only show the sampled parameters; a grid of non-cartesian points
    would show an index. This one shows optimizer, batch, lr, lambda, epoch and accuracy.
    """

    COLUMNS = ("trial", "status", "opt", "bs", "lr", "lmbda", "epoch", "test_acc", "best",
               "img/s")

    def __init__(self, every: float = 15.0) -> None:
        self.every = every
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
            cfg = trial.config
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

    def __init__(self, store: str, experiment: str, ids: dict[str, str] | None = None) -> None:
        self.store, self.experiment, self.ids = store, experiment, ids or {}
        self.metrics: SweepMetrics | None = None
        self.final: dict[str, str] = {}  # trial id -> stored status, once it has ended

    def store_id(self, trial) -> str:
        """The trial's id in the store (a resumed grid point keeps the one it had)."""
        return self.ids.get(trial.config.get(POINT)) or trial.trial_id

    def setup(self, **info: Any) -> None:
        self.metrics = SweepMetrics(self.experiment)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._export(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        try:
            Store(self.store).settle(self.experiment, self.store_id(trial))
        except StoreWriteError as exc:
            print(f"could not record the end of trial {self.store_id(trial)}: {exc}")
        self._export(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        error = None
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as fh:
                error = one_line(RuntimeError(fh.read()))
        trial_id = self.store_id(trial)
        st = Store(self.store)
        try:
            row = st.trial_row(self.experiment, trial_id)
            if row:
                st.write_trial(self.experiment, trial_id, st.row_config(row), "failed", error)
        except StoreWriteError as exc:  # the store itself may be what failed
            print(f"could not record trial {trial_id} as failed: {exc}", file=sys.stderr,
                  flush=True)
        # the one line of a failure the terminal always shows (the traceback: Tune's error.txt)
        print(f"trial {trial_id} ({trial}) failed: {error or 'see ' + str(trial.path)}",
              file=sys.stderr, flush=True)
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
                status = st.trial_row(self.experiment, self.store_id(t)).get("status")
                if status:
                    self.final[t.trial_id] = status
        for status in self.final.values():
            counts[status] = counts.get(status, 0) + 1
        self.metrics.update(counts)


# -- sweeps --------------------------------------------------------------------------------
@dataclass
class Sweep:
    """Where a sweep's results go and how it runs.

    ``table``: print the live table; ``verbose``: let Ray's own output (workers, Tune's
    banners) through to the terminal; ``loggers``: trackers (see :mod:`tvlars_ray.trackers`);
    ``provenance``: this command's record (see :mod:`tvlars_ray.provenance`).
    """

    store: str = "results"
    experiment: str = "default"
    resume: bool = False
    overwrite: bool = False
    max_concurrent: int | None = None
    address: str | None = None
    table: bool = True
    verbose: bool = True
    loggers: tuple[str, ...] = ()
    provenance: dict[str, Any] | None = None
    command: str = "grid"
    lock: Lock | None = field(default=None, repr=False)

    def check(self) -> Store:
        """Refuse a clash with what the store holds, before anything starts."""
        st = Store(self.store)
        check_name(self.experiment)
        if self.overwrite and self.resume:
            raise SweepError("--resume and --overwrite contradict each other: pick one")
        exists = st.exists(self.experiment)
        if exists and not st.is_experiment(self.experiment):
            raise SweepError(f"{st.path(self.experiment)} is not an experiment of this tool: "
                             f"pick another --experiment")
        if exists and not (self.resume or self.overwrite):
            raise SweepError(
                f"experiment '{self.experiment}' already exists in {st.uri}: add --resume to "
                f"finish it, --overwrite to start it again, or pick another --experiment")
        if self.resume and not exists:
            raise SweepError(f"nothing to resume: no experiment '{self.experiment}' in {st.uri}")
        if exists:
            owner = st.holder(self.experiment)
            if owner is not None:
                raise StoreError(Lock(st, self.experiment, self.command).busy(owner))
            if self.overwrite:
                st.check_deletable(self.experiment)
        st.check_writable()
        return st

    def prepare(self) -> Store:
        """Check again and take the experiment's lock (emptying it first on --overwrite)."""
        st = self.check()
        self.lock = Lock(st, self.experiment, self.command).acquire()
        gone = self.lock.taken_over
        if gone:
            print(f"note: took over the lock of `{gone.get('command')}` (pid {gone.get('pid')} "
                  f"on {gone.get('host')}, since {gone.get('started_at')}), which is gone")
        if self.overwrite:
            st.delete(self.experiment)
        return st

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
    provenance = trial_columns(sweep.provenance) if sweep.provenance else None
    fn = tune.with_parameters(train_driver_fn, store=st.uri_of(), experiment=sweep.experiment,
                              provenance=provenance, **params)
    return tune.with_resources(fn, plan_.driver)


def _start(st: Store, sweep: Sweep) -> None:
    """Record this command in provenance.json and set how much of Ray the terminal shows."""
    if sweep.provenance:
        st.add_provenance(sweep.experiment, {**sweep.provenance, "loggers": list(sweep.loggers)})
    # Tune's new output engine prints its configuration box whatever the verbosity; the
    # classic one at verbosity 0 prints nothing
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if sweep.verbose else "0"
    # Tune adds its CSV, JSON and TensorBoard loggers unless told not to: TensorBoard files
    # are written when --logger asks for them (_run_config adds CSV and JSON, which Tune's
    # own result reading needs)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"


def _run_config(st: Store, sweep: Sweep, ids: dict[str, str] | None = None,
                name: str = "tune") -> tune.RunConfig:
    callbacks: list[tune.Callback] = [StoreCallback(st.uri_of(), sweep.experiment, ids),
                                      Hyperparameters()]
    if sweep.table:
        callbacks.append(ProgressTable())
    callbacks += tune_callbacks(sweep.loggers, st, sweep.experiment, sweep.provenance)
    callbacks += [CSVLoggerCallback(), JsonLoggerCallback()]
    return tune.RunConfig(
        name=name, storage_path=st.uri_of(sweep.experiment), verbose=0,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=0),
    )


@contextlib.contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """SIGINT or SIGTERM during a Tune run stops it as Tune's own Ctrl-C does (its state
    saved, its trials stopped within seconds); a second signal, or one outside the run,
    raises KeyboardInterrupt at once. The event says whether a signal came."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped  # signals reach the main thread only
        return

    def handler(signum: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop, while it runs
        if stopped.is_set() or not callable(tune_stop) or tune_stop is handler:
            raise KeyboardInterrupt
        stopped.set()
        print("stopping: the running trials are stopped and recorded (again to stop at once)",
              flush=True)
        tune_stop(signal.SIGUSR1, frame)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune must not replace this handler
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield stopped
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


def _fit(tuner: tune.Tuner, st: Store, sweep: Sweep) -> tune.ResultGrid:
    """Run the tuner; whichever way it ends, no trial stays ``running`` in the store. A
    signal shuts Ray down (a local Ray with it) and raises KeyboardInterrupt."""
    interrupted = False
    try:
        with graceful_stop() as stopped:
            result = tuner.fit()
        interrupted = stopped.is_set()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if interrupted:
            ray.shutdown()  # the trials' processes end with it: nothing writes after this
        for trial_id, exc in st.settle_running(sweep.experiment).items():
            print(f"could not record the end of trial {trial_id}: {exc}")
    if interrupted:
        raise KeyboardInterrupt
    return result


def _grid_tuner(st: Store, sweep: Sweep, plan_: Plan, grid: dict[str, dict[str, Any]],
                keys: list[str], ids: dict[str, str] | None = None,
                fills: dict[str, list] | None = None, name: str = "tune") -> tune.Tuner:
    """A Tuner over some of a grid's points (all of them, or those a resume still needs),
    each trial named from what varies over the whole grid."""
    names = TrialNames(grid=grid)
    return tune.Tuner(
        _trainable(st, sweep, plan_, ids=ids, fills=fills),
        param_space=grid_space({key: grid[key] for key in keys}),
        tune_config=tune.TuneConfig(max_concurrent_trials=plan_.concurrency,
                                    reuse_actors=REUSE_DRIVERS, trial_name_creator=names,
                                    trial_dirname_creator=names),
        run_config=_run_config(st, sweep, ids=ids, name=name),
    )


def still_to_run(st: Store, experiment: str, grid: dict[str, dict[str, Any]]):
    """For a resumed grid: the points to run, the store ids they already have, and the lost
    epochs each must refill. Points whose epochs are all stored are settled, not run."""
    by_science = {TrialConfig.from_dict(v).science_key: k for k, v in grid.items()}
    ids: dict[str, str] = {}
    for row in st.read_trials(experiment).to_dict("records"):
        key = by_science.get(st.row_config(row).science_key)
        if key is not None:
            ids.setdefault(key, row["trial_id"])
    todo, fills = [], {}
    for key, values in grid.items():
        trial_id = ids.get(key)
        if trial_id is None:
            todo.append(key)
            continue
        plan_ = rerun(st, experiment, trial_id, TrialConfig.from_dict(values))
        if plan_.done:
            st.settle(experiment, trial_id, only_running=False)
            continue
        todo.append(key)
        if plan_.fill:
            fills[key] = plan_.fill
    return todo, ids, fills


def run_grid(trials: Sequence[TrialConfig], sweep: Sweep) -> tune.ResultGrid | None:
    """Run (or resume) a grid: every trial once, each a TorchTrainer fit."""
    st = sweep.prepare()
    try:
        if sweep.resume:
            grid = load_grid(st, sweep.experiment)
            keys, ids, fills = still_to_run(st, sweep.experiment, grid)
            if not keys:
                _start(st, sweep)  # the resume is recorded, though it finds nothing to do
                print("nothing left to run: every trial of the grid is stored")
                return None
        else:
            grid = {f"{i:04d}": cfg.to_dict() for i, cfg in enumerate(trials)}
            keys, ids, fills = list(grid), {}, {}
        cfgs = [TrialConfig.from_dict(v) for v in grid.values()]
        connect(sweep.address, log_to_driver=sweep.verbose)
        plan_ = plan(cfgs, cluster_nodes(), sweep.max_concurrent)
        check_shared_store(st)
        if not sweep.resume:
            st.write_grid(sweep.experiment, grid)
        _start(st, sweep)
        return _fit(_grid_tuner(st, sweep, plan_, grid, keys, ids, fills), st, sweep)
    finally:
        sweep.release()


def run_optuna(space, num_samples: int, sweep: Sweep, seed: int = 0,
               asha: bool = False, grace_period: int = 1) -> tune.ResultGrid:
    """An Optuna study through Tune's OptunaSearch (seeded), optionally with ASHA stopping.

    A resume continues the study from Tune's state (the sampler's too), then refills the
    epochs trials lost from the store."""
    st = sweep.prepare()
    try:
        base = space.base_config()
        probe = TrialConfig.from_dict(base)
        connect(sweep.address, log_to_driver=sweep.verbose)
        plan_ = plan([probe], cluster_nodes(), sweep.max_concurrent)
        check_shared_store(st)
        _start(st, sweep)
        trainable = _trainable(st, sweep, plan_)
        path = sweep.tune_path(st)
        if sweep.resume and tune.Tuner.can_restore(path):
            result = _fit(tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                             resume_errored=True), st, sweep)
            _refill(st, sweep, plan_)
            return result
        param_space = {key: _domain(kind, args) for key, (kind, args) in space.search.items()}
        scheduler = None
        if asha:
            scheduler = ASHAScheduler(time_attr="training_iteration",
                                      max_t=expected_epochs(probe), grace_period=grace_period,
                                      reduction_factor=2)
        names = TrialNames(sampled=list(space.search))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=_OptunaWithSettings(base, seed=seed), scheduler=scheduler,
                num_samples=num_samples, metric=space.metric, mode=space.mode,
                max_concurrent_trials=plan_.concurrency,
                reuse_actors=REUSE_DRIVERS and scheduler is None, trial_name_creator=names,
                trial_dirname_creator=names),
            run_config=_run_config(st, sweep),
        )
        return _fit(tuner, st, sweep)
    finally:
        sweep.release()


def _refill(st: Store, sweep: Sweep, plan_: Plan) -> None:
    """Re-run the study's trials that lost epochs (their own Tune run: the study's state,
    which a later resume restores, stays as it was)."""
    grid, fills = {}, {}
    for row in st.read_trials(sweep.experiment).to_dict("records"):
        cfg = st.row_config(row)
        plan_trial = rerun(st, sweep.experiment, row["trial_id"], cfg, finish=False)
        if plan_trial.fill:
            grid[row["trial_id"]], fills[row["trial_id"]] = cfg.to_dict(), plan_trial.fill
    if grid:
        ids = {key: key for key in grid}
        _fit(_grid_tuner(st, sweep, plan_, grid, list(grid), ids, fills, name="tune-refill"),
             st, sweep)


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
