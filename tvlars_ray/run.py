"""The command line: ``python -m tvlars_ray.run {grid,optuna,trial,status,report,export}``.

Every setting is checked before Ray starts; a bad one ends the command with a one-line
``error:`` naming it, and exit status 2.

Ray Tune, Ray Train and matplotlib take seconds to import, so the commands import the modules
built on them (sweep, trial, cluster, report) when they need them: ``--help``, ``status`` and
a refused input answer at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from .config import (
    FIELD_NAMES,
    HELP,
    ConfigError,
    TrialConfig,
    field_type,
    trial_table,
    varying_keys,
)
from .console import fmt, pct, render_table
from .data import check_trials, cost_estimate
from .errors import UserError
from .spaces import load_space, parse_overrides
from .store import STATUSES, Store

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tvlars_ray.run",
        description="Large-batch training experiments with LARS, LAMB and TVLARS on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    grid = sub.add_parser("grid", help="run a grid of trials through Ray Tune")
    _sweep_options(grid)
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
    trial.add_argument("--address", default=None, help="Ray cluster to join")

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

    return Sweep(store=args.store, experiment=args.experiment or space.experiment,
                 resume=args.resume, overwrite=args.overwrite,
                 max_concurrent=args.max_concurrent, address=args.address,
                 verbose=0 if args.quiet else 1)


def _cluster_gpus(args: argparse.Namespace) -> float:
    """GPUs in the cluster (starting or joining Ray): decides the default worker kind."""
    from .cluster import cluster_gpus, connect

    connect(args.address)
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
    if args.resume:  # the grid as it was started, whatever the space says now
        trials = [TrialConfig.from_dict(v) for v in load_grid(st, sweep.experiment).values()]
    check_data(trials)
    if not args.resume:
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
    check_data([TrialConfig.from_dict(space.base_config())])
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
    cfg = TrialConfig.from_dict(_absolute_data_dir(values))
    check_data([cfg])
    experiment = args.experiment or "trials"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    trial_id = f"{cfg.opt}-bs{cfg.bs}-lr{cfg.lr:g}-{stamp}"
    from .trial import run_single

    status = run_single(cfg, args.store, experiment, trial_id, address=args.address)
    _finish(args, experiment, report=False)
    return 0 if status in ("completed", "diverged") else 1


def _finish(args: argparse.Namespace, experiment: str, report: bool) -> None:
    st = Store(args.store)
    print()
    print(summary_table(st, experiment))
    print(f"\nstore: {st.uri_of(experiment)}  (read with tvlars_ray.store.read_epochs / "
          f"read_trials)")
    if report:
        from .report import write_report

        out = write_report(st, experiment, None)
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
    rows = [[row["trial_id"], *(fmt(getattr(cfg, k)) for k in keys), row["epochs_done"],
             pct(row["final_test_acc"]), pct(row["best_test_acc"]), row["status"]]
            for row, cfg in zip(trials.to_dict("records"), cfgs)]
    return render_table(header, rows, rule=True)


def cmd_status(args: argparse.Namespace) -> int:
    st = Store(args.store)
    names = [args.experiment] if args.experiment else st.experiments()
    if not names:
        print(f"no experiments in {st.uri}")
        return 0
    for name in names:
        if not st.exists(name):
            raise ConfigError(f"no experiment '{name}' in {st.uri}: "
                              f"found {', '.join(st.experiments()) or 'none'}")
        trials = st.read_trials(name)
        counts = trials["status"].value_counts().to_dict() if len(trials) else {}
        planned = _planned(st, name)
        pending = max(planned - len(trials), 0) if planned else 0
        parts = [f"{counts.get(s, 0)} {s}" for s in STATUSES]
        if pending:
            parts.append(f"{pending} not started")
        print(f"experiment {name}: {len(trials)} trials ({', '.join(parts)})")
        print(summary_table(st, name))
        print()
    return 0


def _planned(st: Store, experiment: str) -> int:
    """Trials the experiment's grid holds (0 for an Optuna study or single trials)."""
    return len(st.read_grid(experiment) or {})


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(Store(args.store), args.experiment, args.out)
    print(f"report written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .report import export_reference

    written = export_reference(Store(args.store), args.experiment, Path(args.out))
    print(f"wrote {len(written)} files under {args.out}")
    return 0


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
            "report": cmd_report, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finish it later with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
