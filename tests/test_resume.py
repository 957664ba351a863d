"""A grid whose driver is killed mid-way, then resumed: complete, with no duplicate rows."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import yaml

from tvlars_ray.store import Store

# One DDP worker a trial (what is killed here is the driver, not a rank), one trial at a time
# (--max-concurrent 1), so the kill lands with one trial finished and the other part-way.
SPACE = {"fixed": {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 256,
                   "test_subset": 64, "epochs": 3, "bs": 32, "num_workers": 1},
         "grid": {"opt": {"sgd": {"lr": 0.05}, "lars": {"lr": 4.0}}}}


def _grid(space, store, *extra):
    return [sys.executable, "-m", "tvlars_ray.run", "grid", "--space", space, "--store", store,
            "--no-report", "--quiet", "--max-concurrent", "1", *extra]


def test_killed_driver_then_resume_finishes_the_rest(tmp_path):
    space = tmp_path / "killme.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    store = str(tmp_path / "store")
    st = Store(store)
    driver = subprocess.Popen(_grid(str(space), store), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # wait until one trial is done and the next one is part-way
    while time.time() < deadline:
        trials = st.read_trials("killme")
        epochs = st.read_epochs("killme")
        done = set(trials.loc[trials.status == "completed", "trial_id"])
        if done and len(epochs[~epochs.trial_id.isin(done)]) >= 1:
            break
        time.sleep(0.3)
    assert done, "no trial finished before the deadline"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_at = pd.Timestamp.now(tz="UTC")
    time.sleep(2)
    first_done = st.read_epochs("killme")
    first_done = first_done[first_done.trial_id.isin(done)]

    assert subprocess.run(_grid(str(space), store), capture_output=True).returncode == 2
    resumed = subprocess.run(_grid(str(space), store, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    trials = st.read_trials("killme")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert (trials["epochs_done"] == 3).all()
    epochs = st.read_epochs("killme")
    assert len(epochs) == 6 and not epochs.duplicated(["trial_id", "stage", "epoch"]).any()
    # the trial finished before the kill was not run again
    again = epochs[epochs.trial_id.isin(done)]
    assert (again["recorded_at"] < killed_at).all()
    assert list(again["recorded_at"]) == list(first_done["recorded_at"])
