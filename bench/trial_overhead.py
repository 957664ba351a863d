"""What a trial costs beyond its epochs, through the real ``grid`` path.

Runs ``python -m tvlars_ray.run grid`` (a local Ray started by the command, as a user runs it)
on N tiny trials (1 epoch of a few hundred synthetic images, the small CNN, 2 DDP workers on
gloo), then reads the store, where every epoch row says when its worker process started,
when Ray Train handed it the trial, when its data and its loop were ready, and how long the
first step took; the trial rows say when the trial's driver started and ended. From these:

- per-trial overhead: the trial's wall time (driver start to end) minus its epoch times;
- amortised overhead: (the grid's wall time - all epoch times) / trials, what each extra
  trial costs a user, Ray's start and Tune's bookkeeping included;
- its parts, median over trials: Tune between trials, launch (Train controller, placement
  group, worker processes), worker start (imports, Train context, process group), data load,
  model (build, DDP, optimizer), first step, the rest of the epochs, teardown;
- grid efficiency: epoch time / (wall time x trials at a time).

Target: per-trial overhead <= 8 s on 2 cores (goal 5 s). The figures depend on the machine's
load: run it on a quiet machine, and read ``--repeat`` rounds.

    python bench/trial_overhead.py [--trials 6] [--repeat 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _figures import emit  # noqa: E402

from tvlars_ray.store import Store  # noqa: E402

EXPERIMENT = "overhead"
TARGET_S, GOAL_S = 8.0, 5.0


def space(trials: int, workers: int) -> dict:
    """N one-epoch trials of the small CNN on 256 synthetic images (SGD at N learning rates)."""
    return {
        "description": "trial overhead bench",
        "experiment": EXPERIMENT,
        "fixed": {"ds": "synthetic", "train_subset": 256, "test_subset": 128, "model": "cnn",
                  "stem": "cifar", "epochs": 1, "bs": 32, "num_workers": workers,
                  "cpus_per_worker": 2 / workers, "opt": "sgd", "sd": "none"},
        "grid": {"lr": [round(0.01 * (i + 1), 4) for i in range(trials)]},
    }


def run_grid(folder: Path, trials: int, workers: int) -> float:
    path = folder / "overhead.yaml"
    path.write_text(yaml.safe_dump(space(trials, workers)))
    cmd = [sys.executable, "-m", "tvlars_ray.run", "grid", "--space", str(path), "--store",
           str(folder / "store"), "--no-report", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"grid failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def seconds(later: pd.Series, earlier: pd.Series) -> pd.Series:
    return (later - earlier).dt.total_seconds()


def parts(store: Path) -> pd.DataFrame:
    """One row per trial: its parts in seconds, in the order the time passes."""
    st = Store(str(store))
    trials = st.read_trials(EXPERIMENT).sort_values("started_at").reset_index(drop=True)
    epochs = st.read_epochs(EXPERIMENT)
    first = epochs.sort_values("epoch").groupby("trial_id").first()
    last = epochs.sort_values("epoch").groupby("trial_id").last()
    total = epochs.groupby("trial_id")["epoch_time_s"].sum()
    t = trials.set_index("trial_id")
    ids = list(trials["trial_id"])
    out = pd.DataFrame(index=ids)
    previous_end = t["updated_at"].shift(1).reindex(ids)
    out["tune between trials"] = seconds(t["started_at"], previous_end.set_axis(ids))
    out["launch (controller, placement, processes)"] = seconds(first["worker_started_at"],
                                                               t["started_at"])
    out["worker start (imports, Train context, DDP group)"] = seconds(
        first["worker_ready_at"], first["worker_started_at"])
    out["data load"] = seconds(first["data_ready_at"], first["worker_ready_at"])
    out["model (build, DDP, optimizer)"] = seconds(first["loop_started_at"],
                                                   first["data_ready_at"])
    out["first step"] = first["first_step_s"]
    out["epochs after the first step"] = total - first["first_step_s"]
    out["teardown"] = seconds(t["updated_at"], last["recorded_at"])
    out["epoch time"] = total
    out["trial wall time"] = seconds(t["updated_at"], t["started_at"])
    out["per-trial overhead"] = out["trial wall time"] - total
    return out


def at_once(store: Path) -> int:
    """The most trials whose driver ran at the same time."""
    trials = Store(str(store)).read_trials(EXPERIMENT)
    events = sorted([(s, 1) for s in trials["started_at"]]
                    + [(e, -1) for e in trials["updated_at"]])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1, help="rounds (each a new grid)")
    parser.add_argument("--workers", type=int, default=2, help="DDP workers per trial")
    args = parser.parse_args()
    print(f"settings: {args.trials} trials x 1 epoch, cnn on 256 synthetic images, batch 32, "
          f"{args.workers} DDP workers (gloo) sharing {os.cpu_count()} CPUs, a local Ray started "
          f"by `grid`; {args.repeat} round(s)", flush=True)
    rounds = []
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            wall = run_grid(folder, args.trials, args.workers)
            table = parts(folder / "store")
            slots = at_once(folder / "store")
        epoch_total = table["epoch time"].sum()
        amortised = (wall - epoch_total) / len(table)
        efficiency = epoch_total / (wall * slots)
        rounds.append((table, wall, amortised, efficiency))
        print(f"\nround {r + 1}: grid wall time {wall:.1f} s for {len(table)} trials "
              f"({slots} at a time), epochs {epoch_total:.1f} s", flush=True)
        print(table.round(2).T.to_string())
    tables = pd.concat([t for t, *_ in rounds])
    per_trial = tables["per-trial overhead"]
    print("\nparts of a trial, median over all trials (s):")
    for name in tables.columns:
        print(f"  {name:52s} {tables[name].median():7.2f}")
    amortised = statistics.median(a for _, _, a, _ in rounds)
    efficiency = statistics.median(e for *_, e in rounds)
    print(f"\nper-trial overhead: median {per_trial.median():.2f} s, max {per_trial.max():.2f} s "
          f"(target <= {TARGET_S:g} s, goal {GOAL_S:g} s)")
    print(f"amortised overhead per trial (grid wall - epochs) / trials: {amortised:.2f} s")
    print(f"grid efficiency: {100 * efficiency:.1f}% of wall time x slots spent in epochs")
    emit("trial_overhead.per_trial_median", per_trial.median(), "s", at_most=TARGET_S)
    emit("trial_overhead.per_trial_max", per_trial.max(), "s")
    emit("trial_overhead.amortised_per_trial", amortised, "s")
    emit("trial_overhead.grid_efficiency", 100 * efficiency, "%")


if __name__ == "__main__":
    main()
