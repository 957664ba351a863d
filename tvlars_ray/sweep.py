"""Ray Tune over trials: each Tune trial is a driver function that builds and fits one
TorchTrainer.

This is the only module that knows Tune. It never touches tensors: it hands each trial's
settings to Ray Train (through :mod:`tvlars_ray.trial`), on resources planned by
:mod:`tvlars_ray.cluster`, and keeps the store's per-trial rows right when Tune itself ends a
trial (an early stop, a crash).

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
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from .cluster import Plan, check_shared_store, cluster_nodes, connect, plan
from .compat import TrainToTune
from .config import ConfigError, TrialConfig
from .console import pct, render_table
from .errors import UserError
from .monitor import SweepMetrics
from .store import Lock, Store, StoreError, StoreWriteError, check_name, expected_epochs
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


# -- the Tune trial ----------------------------------------------------------------------
def train_driver_fn(config: dict[str, Any], store: str, experiment: str,
                    grid: dict[str, dict[str, Any]] | None = None,
                    base: dict[str, Any] | None = None,
                    ids: dict[str, str] | None = None,
                    fills: dict[str, list] | None = None) -> None:
    """One Tune trial, run in its driver process: one TorchTrainer run, its reports forwarded
    to Tune.

    A grid trial finds its settings in ``grid`` under ``config["trial"]``; an Optuna trial
    merges its sampled values into ``base``. A resumed trial keeps its store id (``ids``),
    and one that lost epochs refills them (``fills``).
    """
    cfg = TrialConfig.from_dict(trial_settings(config, grid, base))
    key = config.get("trial")
    trial_id = (ids or {}).get(key) or tune.get_context().get_trial_id()
    fit_trial(cfg, store, experiment, trial_id, callbacks=[TrainToTune()],
              record_failure=False, fill=(fills or {}).get(key))


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

    def __init__(self, store: str, experiment: str, ids: dict[str, str] | None = None) -> None:
        self.store, self.experiment, self.ids = store, experiment, ids or {}
        self.metrics: SweepMetrics | None = None
        self.final: dict[str, str] = {}  # trial id -> stored status, once it has ended

    def store_id(self, trial) -> str:
        """The trial's id in the store (a resumed grid point keeps the one it had)."""
        return self.ids.get(trial.config.get("trial")) or trial.trial_id

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
        print(f"trial {trial_id} failed: {error or 'see the Ray logs'}", flush=True)
        st = Store(self.store)
        try:
            row = st.trial_row(self.experiment, trial_id)
            if row:
                st.write_trial(self.experiment, trial_id, st.row_config(row), "failed", error)
        except StoreWriteError as exc:  # the store itself may be what failed
            print(f"could not record trial {trial_id} as failed: {exc}", flush=True)
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
    """Where a sweep's results go and how it runs."""

    store: str = "results"
    experiment: str = "default"
    resume: bool = False
    overwrite: bool = False
    max_concurrent: int | None = None
    address: str | None = None
    verbose: int = 1
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
    fn = tune.with_parameters(train_driver_fn, store=st.uri_of(), experiment=sweep.experiment,
                              **params)
    fn = tune.with_resources(fn, plan_.driver)
    return fn


def _run_config(st: Store, sweep: Sweep, grid=None, base=None, ids=None, name: str = "tune"):
    callbacks: list[tune.Callback] = [StoreCallback(st.uri_of(), sweep.experiment, ids)]
    if sweep.verbose:
        callbacks.append(ProgressTable(grid, base))
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
    """A Tuner over some of a grid's points (all of them, or those a resume still needs)."""
    trainable = _trainable(st, sweep, plan_, grid=grid, ids=ids, fills=fills)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(sorted(keys))},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan_.concurrency,
                                    reuse_actors=REUSE_DRIVERS),
        run_config=_run_config(st, sweep, grid=grid, ids=ids, name=name),
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
                print("nothing left to run: every trial of the grid is stored")
                return None
        else:
            grid = {f"{i:04d}": cfg.to_dict() for i, cfg in enumerate(trials)}
            keys, ids, fills = list(grid), {}, {}
        cfgs = [TrialConfig.from_dict(v) for v in grid.values()]
        connect(sweep.address)
        plan_ = plan(cfgs, cluster_nodes(), sweep.max_concurrent)
        check_shared_store(st)
        if not sweep.resume:
            st.write_grid(sweep.experiment, grid)
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
        connect(sweep.address)
        plan_ = plan([probe], cluster_nodes(), sweep.max_concurrent)
        check_shared_store(st)
        trainable = _trainable(st, sweep, plan_, base=base)
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
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(seed=seed), scheduler=scheduler,
                num_samples=num_samples, metric=space.metric, mode=space.mode,
                max_concurrent_trials=plan_.concurrency,
                reuse_actors=REUSE_DRIVERS and scheduler is None),
            run_config=_run_config(st, sweep, base=base),
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
