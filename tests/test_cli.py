"""The command line refuses bad input before anything starts, in one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tvlars_ray.run import main

BAD = [
    (["grid", "--set", "opt=nadam"], "unknown optimizer (opt) 'nadam'"),
    (["grid", "--set", "bs=33"], "bs 33 is not divisible by num_workers 2"),
    (["grid", "--set", "epochs=0"], "epochs must be at least 1"),
    (["grid", "--set", "lrr=1"], "unknown setting 'lrr'"),
    (["grid", "--set", "wd=inf"], "wd must be finite and non-negative, got inf"),
    (["grid", "--set", "lr=inf"], "lr must be finite and positive, got inf"),
    (["grid", "--set", "lr=.nan"], "lr must be finite and positive, got nan"),
    (["grid", "--set", "cpus_per_worker=0"], "cpus_per_worker must be positive"),
    (["grid", "--cpus-per-worker", "0"], "cpus_per_worker must be positive"),
    (["grid", "--set", "gpus_per_worker=inf"], "gpus_per_worker must be a finite number"),
    (["trial", "--wd", "inf", "--local"], "wd must be finite and non-negative"),
    (["grid", "--experiment", ".."], "experiment name '..' is not allowed"),
    (["report"], "no store at"),
    (["export"], "no store at"),
    (["check"], "no store at"),
    (["grid", "--set", "ds=imagefolder"], "imagefolder needs --data-dir"),
    (["grid", "--set", "ds=imagefolder", "--set", "data_dir=/nowhere/x.zip"],
     "not found in /nowhere"),
    (["grid", "--space", "no-such-space"], "no search space 'no-such-space'"),
    (["grid", "--space", "optuna-tvlars"], "is an Optuna space"),
    (["optuna", "--space", "quickstart"], "has no 'search' section"),
    (["grid", "--resume", "--experiment", "never-ran"], "nothing to resume"),
    (["trial", "--opt", "khlars", "--local"], "unknown optimizer (opt) 'khlars'"),
    (["trial", "--bs", "33", "--dv", "0", "1"], "bs 33 is not divisible by num_workers 2"),
    (["status", "--experiment", "ghost"], "no store at"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_starts_nothing(argv, words, tmp_path, capsys, no_ray):
    import ray

    store = tmp_path / "store"
    assert main([*argv, "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not ray.is_initialized(), "Ray must not start for a bad command"
    assert not store.exists() or not any(store.iterdir())


def test_resuming_what_grid_did_not_start_is_refused(tmp_path, capsys, no_ray):
    import ray

    from tvlars_ray.config import TrialConfig
    from tvlars_ray.store import Store

    Store(str(tmp_path)).write_trial("single", "t1", TrialConfig(ds="synthetic"), "running")
    assert main(["grid", "--resume", "--experiment", "single", "--store", str(tmp_path)]) == 2
    assert "was not started by `grid`" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_trial_asking_for_missing_gpus_is_an_error_not_a_hang(tmp_path, capsys):
    import ray

    try:
        code = main(["trial", "--ds", "synthetic", "--model", "cnn", "--dv", "0", "1",
                     "--store", str(tmp_path)])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and "cannot fit" in err and "GPU" in err


def test_dry_run_prints_trials_and_resources(capsys):
    assert main(["grid", "--space", "paper-nowarmup", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "246 trials" in out and "TUNE_DRIVER" in out and "24600 trial-epochs" in out
    assert main(["grid", "--space", "quickstart", "--set", "epochs=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 trials" in out and "12 trial-epochs" in out


def test_module_entry_point_exits_non_zero():
    done = subprocess.run([sys.executable, "-m", "tvlars_ray.run", "grid", "--set", "lr=-1",
                           "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "lr" in done.stderr


def test_a_grid_shows_its_own_lines_and_every_error_but_not_rays(tmp_path):
    """A real grid in a subprocess, one of its trials killed mid-way: the terminal has the
    project's lines and the failure in one line; Ray's banners and warnings are in log files.
    (One DDP worker a trial: the two trials run side by side, and killing the worker of one
    fails it.)"""
    import yaml

    from tvlars_ray.store import Store

    space = tmp_path / "quiet.yaml"
    space.write_text(yaml.safe_dump({
        "fixed": {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 256,
                  "test_subset": 64, "epochs": 3, "bs": 32, "num_workers": 1,
                  "max_failures": 0},
        "grid": {"opt": "sgd", "lr": [0.05, 0.1]}}))
    store = tmp_path / "store"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        grid = subprocess.Popen([sys.executable, "-m", "tvlars_ray.run", "grid", "--space",
                                 str(space), "--store", str(store), "--no-report"],
                                stdout=stdout, stderr=stderr)
        st, killed, deadline = Store(str(store)), False, time.time() + 300
        while grid.poll() is None and time.time() < deadline:
            if not killed and not st.read_epochs("quiet").empty:  # a trial is under way
                workers = [p for p in _descendants(grid.pid)
                           if "RayTrainWorker" in _cmdline(p)]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = True
            time.sleep(0.2)
        assert grid.wait(timeout=max(deadline - time.time(), 1)) == 0
    assert killed, "no DDP worker was found to kill"
    shown, errors = out.read_text(), err.read_text()
    # the failure: one line on stderr, and nothing else there
    failed = st.read_trials("quiet").query("status == 'failed'")
    assert len(failed) == 1
    lines = errors.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trial {failed.trial_id.item()} (sgd-lr"), \
        errors
    assert " failed: " in lines[0]
    # the project's lines
    assert "grid 'quiet': 2 trials -> experiment 'quiet'" in shown
    assert "ray dashboard: http" in shown and "ray's own output: " in shown
    assert "completed" in shown and "failed" in shown and f"store: {store}/quiet" in shown
    # none of Ray's
    for noise in ("PreemptionWatcher", "Configuration for experiment", "View detailed results",
                  "(raylet)", "(TrainController", "(RayTrainWorker", "core_worker.cc",
                  " INFO ", " WARNING ", "Started a local Ray instance"):
        assert noise not in shown + errors, noise
    # ... which went to the log file named there
    log = Path(shown.split("ray's own output: ", 1)[1].split(" and ", 1)[0])
    assert "Started a local Ray instance" in log.read_text()


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (its Ray: raylet, workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
def test_seeds_flag_overrides_the_space(capsys, tmp_path):
    assert main(["grid", "--space", "quickstart", "--seeds", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "18 trials" in out and "seed" in out.splitlines()[2]
    space = tmp_path / "s.yaml"
    space.write_text("fixed: {ds: synthetic}\ngrid: {lr: [0.1, 0.2]}\nseeds: 4\n")
    assert main(["grid", "--space", str(space), "--dry-run"]) == 0
    assert "8 trials" in capsys.readouterr().out
    assert main(["grid", "--space", str(space), "--seeds", "2", "--dry-run"]) == 0
    assert "4 trials" in capsys.readouterr().out
    assert main(["grid", "--space", str(space), "--seeds", "0", "--dry-run"]) == 2
    assert capsys.readouterr().err == "error: --seeds must be a positive count, got 0\n"
