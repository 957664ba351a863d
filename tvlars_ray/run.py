"""The command line: ``tvlars {grid,optuna,trial,status,report,export,check}``, the same as
``python -m tvlars_ray.run ...``.

Every setting is checked before Ray starts; a bad one ends the command with a one-line
``error:`` naming it, and exit status 2. Ctrl-C or SIGTERM stops a run with every trial
recorded, prints the command that resumes it and exits with status 130.

Ray Tune, Ray Train and matplotlib take seconds to import, so the commands import the modules
built on them (sweep, trial, cluster, report) when they need them: ``--help``, ``status`` and
a refused input answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import (
    FIELD_NAMES,
    HELP,
    ConfigError,
    TrialConfig,
    field_type,
    irrelevant_fields,
    trial_table,
    varying_keys,
)
from .console import fmt, pct, quiet, render_table
from .data import check_trials, cost_estimate
from .errors import UserError
from .provenance import collect, trial_columns
from .spaces import load_space, parse_overrides
from .store import (
    STATUSES,
    DamagedFileWarning,
    Store,
    StoreError,
    StoreWriteError,
    check_name,
)
from .trackers import TRACKERS

DEFAULT_STORE = "results"
DEFAULT_SPACE = "quickstart"
# The reference main.py's flags whose names differ from the settings they set.
REFERENCE_ALIASES = {"loader_workers": ["--workers"]}


# -- shared options --------------------------------------------------------------------------
def _store_options(p: argparse.ArgumentParser, experiment_help: str) -> None:
    p.add_argument("--store", default=DEFAULT_STORE,
                   help="store root: a folder or a pyarrow URI such as s3://bucket/path "
                        f"(default: ./{DEFAULT_STORE})")
    p.add_argument("--experiment", help=experiment_help)


def _sweep_options(p: argparse.ArgumentParser) -> None:
    _store_options(p, "experiment name (default: the space's name)")
    p.add_argument("--space", default=None, help="a YAML path or a name from search_spaces/")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a setting in every trial, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted experiment")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the experiment's results and start it again")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trials and the resources they need; start nothing")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per DDP worker")
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per DDP worker (default: 1 when the cluster has GPUs, else CPU "
                        "workers with gloo)")
    p.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--quiet", action="store_true", help="no live trial table")
    _run_options(p)


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that trains: trackers and how much of Ray to show."""
    p.add_argument("--logger", action="append", choices=list(TRACKERS), default=None,
                   help="also track in TensorBoard, MLflow or W&B (repeatable; see the "
                        "README's 'Track with TensorBoard / MLflow / W&B')")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (its workers' logs, warnings, Tune's banners) "
                        "here instead of only in log files")


def build_parser(prog: str = "python -m tvlars_ray.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Large-batch training experiments with LARS, LAMB and TVLARS on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    grid = sub.add_parser("grid", help="run a grid of trials through Ray Tune")
    _sweep_options(grid)
    grid.add_argument("--seeds", type=int, metavar="N",
                      help="run every point with seeds 0..N-1 (overrides the space's seeds:)")
    grid.add_argument("--no-report", action="store_true",
                      help="skip the tables and plots written at the end")

    optuna = sub.add_parser("optuna", help="run an Optuna study through Ray Tune")
    _sweep_options(optuna)
    optuna.add_argument("--num-samples", type=int, default=8, help="trials to sample")
    optuna.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    optuna.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA)")
    optuna.add_argument("--grace-period", type=int, default=1,
                        help="epochs before ASHA may stop a trial")

    trial = sub.add_parser(
        "trial", help="run one trial (the reference main.py's flags)",
        description="One trial through Ray Train. Accepts the reference code's flags "
                    "(--bs --epochs --lr --seed --wd --ds --model --opt --sd --lmbda --dv "
                    "--workers --port --mode ...) and every other trial setting.")
    _store_options(trial, "experiment to file the trial under (default: trials)")
    for name in FIELD_NAMES:
        base, _ = field_type(name)
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += REFERENCE_ALIASES.get(name, [])
        trial.add_argument(*flags, dest=name, default=None, metavar=base.__name__.upper(),
                           help=f"{HELP[name]} (default: {getattr(TrialConfig, name)})")
    trial.add_argument("--dv", nargs="+", type=int, metavar="GPU",
                       help="GPU ids as in the reference: one GPU worker each")
    trial.add_argument("--port", type=int, help="accepted for the reference CLI; Ray picks ports")
    trial.add_argument("--local", action="store_true",
                       help="debug mode: the loop runs in this process (breakpoints work)")
    trial.add_argument("--resume", metavar="TRIAL_ID",
                       help="finish a stored trial of --experiment with its own settings")
    trial.add_argument("--address", default=None, help="Ray cluster to join")
    _run_options(trial)

    status = sub.add_parser("status", help="trials of an experiment, from the store")
    _store_options(status, "experiment (default: all)")

    report = sub.add_parser("report", help="the paper's tables and plots from the store")
    _store_options(report, "experiment (default: all)")
    report.add_argument("--out", help="folder for tables and PNGs (default: <store>/report)")

    export = sub.add_parser("export", help="write the store in another layout")
    _store_options(export, "experiment (default: all)")
    export.add_argument("--layout", choices=["reference"], default="reference",
                        help="reference: runs/{ds}_{model}/{opt}[_{lmbda}]/{bs}_{lr}_{sd}.parquet")
    export.add_argument("--out", default="runs", help="folder to write (default: ./runs)")

    check = sub.add_parser(
        "check", help="damaged files, lost epochs, trials whose driver is gone",
        description="List what is wrong with a store: files that are not readable parquet, "
                    "trials that lost epochs, trials marked running whose driver is gone. "
                    "Exit status 1 if anything is.")
    _store_options(check, "experiment (default: all)")
    check.add_argument("--repair", action="store_true",
                       help="move damaged files aside (never delete), rebuild lost rows, "
                            "settle dead trials, so --resume re-runs exactly what was lost")
    return parser


# -- commands --------------------------------------------------------------------------------
def _absolute_data_dir(values: dict[str, Any]) -> dict[str, Any]:
    """Tune runs trials in their own folders: make a local data_dir absolute first."""
    data_dir = values.get("data_dir")
    if data_dir and "://" not in str(data_dir):
        values["data_dir"] = str(Path(str(data_dir)).expanduser().resolve())
    return values


def _resource_overrides(args: argparse.Namespace, space_fixed: dict[str, Any],
                        cluster_gpus: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.workers_per_trial is not None:
        out["num_workers"] = args.workers_per_trial
    if args.cpus_per_worker is not None:
        out["cpus_per_worker"] = args.cpus_per_worker
    if args.gpus_per_worker is not None:
        out["use_gpu"] = args.gpus_per_worker > 0
        if args.gpus_per_worker > 0:
            out["gpus_per_worker"] = args.gpus_per_worker
    elif cluster_gpus > 0 and "use_gpu" not in space_fixed:
        out["use_gpu"] = True
    return out


def _load(args: argparse.Namespace, cluster_gpus: float = 0.0):
    space = load_space(args.space or DEFAULT_SPACE)
    if getattr(args, "seeds", None) is not None:
        space = space.with_seeds(args.seeds)
    overrides = parse_overrides(args.overrides)
    overrides.update(_resource_overrides(args, {**space.fixed, **overrides}, cluster_gpus))
    if "data_dir" in space.fixed:
        space.fixed = _absolute_data_dir(dict(space.fixed))
    return space.with_overrides(_absolute_data_dir(overrides))


def check_data(trials: list[TrialConfig]) -> None:
    """Every dataset the trials need is there and readable the way they read it, before Ray
    starts."""
    check_trials(trials)


def _sweep(args: argparse.Namespace, space) -> Any:
    from .sweep import Sweep

    sweep = Sweep(store=args.store, experiment=args.experiment or space.experiment,
                  resume=args.resume, overwrite=args.overwrite,
                  max_concurrent=args.max_concurrent, address=args.address,
                  table=not args.quiet, verbose=args.verbose, loggers=tuple(args.logger or ()),
                  provenance=collect(args.argv, args.prog), command=args.command)
    args.resume_hint = _resume_hint(args, sweep.experiment)
    return sweep


def _resume_hint(args: argparse.Namespace, experiment: str, trial_id: str | None = None) -> str:
    """The command that finishes what this one started."""
    words = [*args.prog.split(), args.command]
    if args.command == "optuna":  # the study's space and settings are not stored
        words += ["--space", args.space or DEFAULT_SPACE, "--num-samples", str(args.num_samples),
                  "--seed", str(args.seed)]
        words += [f"--set={item}" for item in args.overrides or []]
        words += ["--asha", "--grace-period", str(args.grace_period)] if args.asha else []
    words += ["--store", args.store, "--experiment", experiment]
    words += ["--address", args.address] if args.address else []
    words += ["--resume"] + ([trial_id] if trial_id else [])
    return " ".join(shlex.quote(w) for w in words)


def _check_loggers(args: argparse.Namespace, experiment: str) -> tuple[str, ...]:
    """The trackers to use, checked before anything starts. A resumed sweep keeps the
    trackers it started with: left out, they are used again; asking for others is refused."""
    from .trackers import check

    st = Store(args.store)
    check(args.logger or (), st)
    sweep = args.command != "trial"
    runs = st.provenance(experiment) if sweep and getattr(args, "resume", False) else []
    if runs:
        started = sorted(set(runs[0].get("loggers", [])))
        if args.logger is None:
            args.logger = started or None
        elif sorted(set(args.logger)) != started:
            raise ConfigError(f"experiment '{experiment}' was started with --logger "
                              f"{' '.join(started) or '(none)'}; a resume keeps its trackers: "
                              f"drop --logger or give the same ones")
    return tuple(args.logger or ())


def _quiet(args: argparse.Namespace, experiment: str) -> None:
    """Unless --verbose, Ray's own output in this process goes to a log file until the
    command ends (said where once Ray is up, see _connect); its workers' output stays in
    Ray's session logs (connect(log_to_driver=False))."""
    if args.verbose:
        return
    from .compat import ray_messages_to

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.log_file = Path(tempfile.gettempdir(), "tvlars-ray", f"{experiment}-{stamp}.log")
    args.cleanup.enter_context(quiet(args.log_file))
    args.cleanup.enter_context(ray_messages_to(logging.getLogger("ray")))


def _connect(args: argparse.Namespace) -> None:
    """Start or join Ray, and say where its dashboard and (unless --verbose) its output are."""
    from .cluster import connect
    from .compat import session_logs_dir

    dashboard = connect(args.address, log_to_driver=args.verbose)
    if dashboard:
        print(f"ray dashboard: {dashboard}")
    if not args.verbose and dashboard is not None:
        print(f"ray's own output: {args.log_file} and {session_logs_dir()} "
              f"(--verbose shows it here)")


def _cluster_gpus(args: argparse.Namespace) -> float:
    """GPUs in the cluster (starting or joining Ray): decides the default worker kind."""
    from .cluster import cluster_gpus

    _connect(args)
    return cluster_gpus()


def cmd_grid(args: argparse.Namespace) -> int:
    from .sweep import load_grid, run_grid, trials_or_error

    space = _load(args)  # validate everything before Ray starts
    trials = trials_or_error(space)
    if args.dry_run:
        _print_dry_run(space, trials)
        return 0
    sweep = _sweep(args, space)
    st = sweep.check()  # refuse a clash with the store before starting Ray
    sweep.loggers = _check_loggers(args, sweep.experiment)
    if args.resume:  # the grid as it was started, whatever the space says now
        trials = [TrialConfig.from_dict(v) for v in load_grid(st, sweep.experiment).values()]
    check_data(trials)
    _quiet(args, sweep.experiment)
    if args.resume:
        _connect(args)
    else:
        space = _load(args, _cluster_gpus(args))
        trials = trials_or_error(space)
    where = Path(args.store).resolve() if "://" not in args.store else args.store
    what = "resuming" if args.resume else f"grid '{space.name}':"
    print(f"{what} {len(trials)} trials -> experiment '{sweep.experiment}' in {where}")
    run_grid(trials, sweep)
    _finish(args, sweep.experiment, report=not args.no_report)
    return 0


def cmd_optuna(args: argparse.Namespace) -> int:
    from .cluster import plan
    from .sweep import run_optuna

    space = _load(args)
    if not space.is_optuna:
        raise ConfigError(f"{space.name} has no 'search' section: run it with `grid`, or add "
                          f"Optuna distributions under 'search'")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.dry_run:
        probe = TrialConfig.from_dict(space.base_config())
        print(f"optuna '{space.name}': {args.num_samples} samples of "
              + ", ".join(f"{k} ~ {kind}{v}" for k, (kind, v) in space.search.items()))
        print(f"metric: {space.metric} ({space.mode}); {probe.epochs} epochs each")
        print(plan([probe], None).describe())
        return 0
    sweep = _sweep(args, space)
    sweep.check()
    sweep.loggers = _check_loggers(args, sweep.experiment)
    check_data([TrialConfig.from_dict(space.base_config())])
    _quiet(args, sweep.experiment)
    space = _load(args, _cluster_gpus(args))
    print(f"optuna '{space.name}': {args.num_samples} trials -> experiment '{sweep.experiment}'")
    run_optuna(space, args.num_samples, sweep, seed=args.seed, asha=args.asha,
               grace_period=args.grace_period)
    _finish(args, sweep.experiment, report=True)
    return 0


def cmd_trial(args: argparse.Namespace) -> int:
    values = {name: getattr(args, name) for name in FIELD_NAMES
              if getattr(args, name, None) is not None}
    if args.dv:
        values.update(num_workers=len(args.dv), use_gpu=True)
    if args.local:
        values["num_workers"] = 0
    experiment = args.experiment or "trials"
    if args.resume:
        cfg, trial_id = _stored_trial(args, experiment, values), args.resume
    else:
        cfg = TrialConfig.from_dict(_absolute_data_dir(values))
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        trial_id = f"{cfg.opt}-bs{cfg.bs}-lr{cfg.lr:g}-{stamp}"
    check_data([cfg])
    args.resume_hint = _resume_hint(args, experiment, trial_id)
    loggers = args.logger or []
    _check_loggers(args, experiment)
    _quiet(args, experiment)
    if cfg.num_workers > 0 or "wandb" in loggers:  # W&B logs from a Ray actor
        _connect(args)
    elif not args.verbose:
        print(f"ray's own output: {args.log_file} (--verbose shows it here)")
    from .sweep import tune_settings
    from .trackers import TrialTrackers
    from .trial import run_single

    st = Store(args.store)
    record = collect(args.argv, args.prog)
    st.add_provenance(experiment, {**record, "trial_id": trial_id, "loggers": loggers})
    with contextlib.ExitStack() as stack:
        trackers = (stack.enter_context(TrialTrackers(loggers, st, experiment, trial_id,
                                                      tune_settings(cfg), record))
                    if loggers else None)
        status = run_single(cfg, args.store, experiment, trial_id, address=args.address,
                            resume=bool(args.resume), provenance=trial_columns(record))
        if trackers is not None:
            trackers.failed = status == "failed"
    _finish(args, experiment, report=False)
    return 0 if status in ("completed", "diverged") else 1


def _stored_trial(args: argparse.Namespace, experiment: str,
                  values: dict[str, Any]) -> TrialConfig:
    """The settings a stored trial ran with (``trial --resume``)."""
    if values:
        raise ConfigError(f"--resume runs the trial with its stored settings: drop "
                          f"{', '.join('--' + k for k in sorted(values))}")
    st = Store(args.store)
    st.require(experiment)
    row = st.trial_row(experiment, args.resume)
    if not row:
        raise StoreError(f"no trial '{args.resume}' in experiment '{experiment}' of {st.uri}: "
                         f"`status` lists them")
    return st.row_config(row)


def _finish(args: argparse.Namespace, experiment: str, report: bool) -> None:
    st = Store(args.store)
    print()
    print(summary_table(st, experiment))
    print(f"\nstore: {st.uri_of(experiment)}  (read with tvlars_ray.store.read_epochs / "
          f"read_trials)")
    if getattr(args, "logger", None):
        from .trackers import where

        for line in where(args.logger, st, experiment, tune=args.command != "trial"):
            print(line)
    if report:
        from .report import write_report

        try:
            out = write_report(st, experiment, None)
        except OSError as exc:  # a full disk: the results are stored, the report can wait
            print(f"report not written ({exc}): `report` writes it later", file=sys.stderr)
            return
        print(f"report: {out}")


def summary_table(st: Store, experiment: str | None) -> str:
    """One line per trial: its settings that vary, final and best accuracy, status."""
    trials = st.read_trials(experiment)
    if trials.empty:
        return "no trials recorded"
    for i in trials.index[trials["status"] == "running"]:  # their rows lag their epochs
        for key, value in st.summary(trials.at[i, "experiment"], trials.at[i, "trial_id"]).items():
            trials.at[i, key] = value
    cfgs = []
    for row in trials.to_dict("records"):
        values = {k: row[k] for k in FIELD_NAMES if row.get(k) is not None and row[k] == row[k]}
        cfgs.append(TrialConfig.from_dict(values))
    keys = list(dict.fromkeys(["opt", "lr", *varying_keys(cfgs)]))
    header = ["trial", *keys, "epochs", "final_acc", "best_acc", "status"]
    rows = [[row["trial_id"], *("-" if k in irrelevant_fields(cfg) else fmt(getattr(cfg, k))
                                for k in keys), row["epochs_done"],
             pct(row["final_test_acc"]), pct(row["best_test_acc"]), row["status"]]
            for row, cfg in zip(trials.to_dict("records"), cfgs)]
    return render_table(header, rows, rule=True)


def cmd_status(args: argparse.Namespace) -> int:
    st = Store(args.store)
    st.require(args.experiment)
    names = [args.experiment] if args.experiment else st.experiments()
    if not names:
        print(f"no experiments in {st.uri}")
        return 0
    for name in names:
        trials = st.read_trials(name)
        st.read_epochs(name)  # finds (and names) damaged epoch files
        counts = trials["status"].value_counts().to_dict() if len(trials) else {}
        planned = _planned(st, name)
        pending = max(planned - len(trials), 0) if planned else 0
        parts = [f"{counts.get(s, 0)} {s}" for s in STATUSES]
        if pending:
            parts.append(f"{pending} not started")
        print(f"experiment {name}: {len(trials)} trials ({', '.join(parts)})")
        print(summary_table(st, name))
        for line in _status_notes(st, name, counts.get("running", 0)):
            print(line)
        print()
    return 0


def _status_notes(st: Store, name: str, running: int) -> list[str]:
    """Who runs the experiment, trials whose driver is gone, damaged files skipped."""
    notes = []
    owner = st.holder(name)
    if owner:
        notes.append(f"run by `{owner.get('command')}` (pid {owner.get('pid')} on "
                     f"{owner.get('host')}, since {owner.get('started_at')})")
    elif running and owner is None:
        notes.append(f"{running} trials marked running, but nothing runs '{name}': their "
                     f"driver is gone; --resume finishes them (`check` lists them)")
    damaged = [p for p in st.damaged if p.startswith(st.path(name) + "/")]
    if damaged:
        notes.append(f"{len(damaged)} damaged files skipped (`check --repair` moves them "
                     f"aside, then --resume runs their epochs again)")
    return notes


def _planned(st: Store, experiment: str) -> int:
    """Trials the experiment's grid holds (0 for an Optuna study or single trials)."""
    return len(st.read_grid(experiment) or {})


def cmd_report(args: argparse.Namespace) -> int:
    st = Store(args.store)
    st.require(args.experiment)  # a reader: it creates only its report folder
    from .report import write_report

    out = write_report(st, args.experiment, args.out)
    print(f"report written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    st = Store(args.store)
    st.require(args.experiment)
    from .report import export_reference

    written = export_reference(st, args.experiment, Path(args.out))
    print(f"wrote {len(written)} files under {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    st = Store(args.store)
    st.require(args.experiment)
    problems = 0
    for name in [args.experiment] if args.experiment else st.experiments():
        health, moved = st.health(name), []
        if args.repair and health.owner is not None:
            print(f"{name}: not repaired while it runs")
        elif args.repair:
            health, moved = st.repair(name)
            for path in moved:
                print(f"{name}: moved aside {path}")
        problems += not health.ok
        print(_describe(health))
        if args.repair and (health.lost or moved):
            print(f"  to run the lost epochs again: {_resume_for(args.prog, st, name)}")
    return 1 if problems and not args.repair else 0


def _describe(health) -> str:
    """check's report on one experiment."""
    name = health.experiment
    lines = [f"experiment {name}: " + ("ok" if health.ok else "needs attention")]
    if health.owner is not None:
        lines.append(f"  running now: `{health.owner.get('command', 'trial')}` (pid "
                     f"{health.owner.get('pid', '?')} on {health.owner.get('host', '?')})")
    lines += [f"  damaged: {path}: {why}" for path, why in health.damaged.items()]
    lines += [f"  leftover of a killed write: {path}" for path in health.leftovers]
    for trial_id, lost in health.lost.items():
        shown = ", ".join(f"{stage} {epoch}" for stage, epoch in lost[:8])
        more = f" and {len(lost) - 8} more" if len(lost) > 8 else ""
        lines.append(f"  trial {trial_id} lacks epochs it ran: {shown}{more}")
    lines += [f"  trial {t} is marked running but its driver is gone" for t in health.running]
    lines += [f"  trial {t} has epochs but no readable row" for t in health.rowless]
    if not health.ok:
        lines.append("  `check --repair` moves damaged files aside and settles the rest; "
                     "--resume then runs exactly what was lost")
    return "\n".join(lines)


def _resume_for(prog: str, st: Store, name: str) -> str:
    where = f"--store {shlex.quote(st.uri)} --experiment {name} --resume"
    if st.read_grid(name) is not None:
        return f"{prog} grid {where}"
    return (f"{prog} optuna --space SPACE {where} (the --space and --set it ran with), or for "
            f"single trials: {prog} trial {where} TRIAL_ID")


def _print_dry_run(space, trials: list[TrialConfig]) -> None:
    from .cluster import plan

    merged = space.raw_points() - len(trials)
    print(f"space '{space.name}'" + (f": {space.description}" if space.description else ""))
    print(f"{len(trials)} trials" + (f" ({merged} duplicate points merged)" if merged else ""))
    table = trial_table(trials)
    keys = list(table[0]) if table and table[0] else []
    if keys:
        print(render_table(keys, [[fmt(row[k]) for k in keys] for row in table]))
    epochs = sum(c.epochs + (c.cl_epochs if c.mode == "bt" else 0) for c in trials)
    print(f"total: {epochs} trial-epochs")
    print(cost_estimate(trials))
    print(plan(trials, None).describe().replace("; 1 trial(s) at a time", ""))


COMMANDS = {"grid": cmd_grid, "optuna": cmd_optuna, "trial": cmd_trial, "status": cmd_status,
            "report": cmd_report, "export": cmd_export, "check": cmd_check}


def main(argv: list[str] | None = None, prog: str = "python -m tvlars_ray.run") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.argv, args.prog = argv, prog  # the command line, as provenance records it
    args.resume_hint = None
    with contextlib.ExitStack() as args.cleanup, warnings.catch_warnings(), \
            _sigterm_as_sigint():  # the exit stack undoes _quiet when the command ends
        warnings.filterwarnings("always", category=DamagedFileWarning)
        warnings.showwarning = _show_warning
        try:
            if args.experiment is not None:
                check_name(args.experiment)
            return COMMANDS[args.command](args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except StoreWriteError as exc:  # a full disk, a store gone read-only
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            _stop_ray()
            hint = f": finish it with\n  {args.resume_hint}" if args.resume_hint else ""
            print(f"interrupted; every trial is recorded{hint}", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler ending a job) is handled as Ctrl-C: a graceful stop.
    It goes to whatever handles SIGINT at the time (Tune's, Ray Train's or Python's)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    previous = signal.signal(signal.SIGTERM, _forward_to_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forward_to_sigint(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _stop_ray() -> None:
    """After an interrupt: a local Ray started here goes (a joined cluster stays up)."""
    if "ray" in sys.modules:
        import ray  # already imported by the run that was interrupted

        ray.shutdown()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Store warnings as one line each, like errors; others as Python shows them."""
    if issubclass(category, DamagedFileWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def cli(prog: str = "tvlars") -> None:
    """The console command ``tvlars`` (pyproject.toml's [project.scripts]) and
    ``python -m tvlars_ray.run``: one command line under two names."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(prog=prog))


if __name__ == "__main__":
    cli("python -m tvlars_ray.run")
