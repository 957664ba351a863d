"""Grids and Optuna studies through real Ray Tune, each trial a TorchTrainer with DDP workers."""

import pandas as pd
import pytest
import yaml

from tvlars_ray.cluster import DRIVER_RESOURCE, ClusterError, plan
from tvlars_ray.config import TrialConfig
from tvlars_ray.run import main
from tvlars_ray.store import read_epochs, read_trials

TINY = {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 256,
        "test_subset": 128, "epochs": 2, "bs": 32, "num_workers": 2, "cpus_per_worker": 1}


def _space(tmp_path, name, body):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_grid_of_two_trials_fills_the_store(ray_session, tmp_path, capsys):
    space = _space(tmp_path, "two", {"fixed": TINY, "grid": {
        "opt": {"sgd": {"lr": 0.05}, "tvlars": {"lr": 2.0, "lmbda": 1e-3}}}})
    store = str(tmp_path / "store")
    assert main(["grid", "--space", space, "--store", store]) == 0
    out = capsys.readouterr().out
    assert "final_acc" in out and "completed" in out and "report:" in out
    trials = read_trials(store, "two")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert set(trials["opt"]) == {"sgd", "tvlars"} and (trials["epochs_done"] == 2).all()
    epochs = read_epochs(store)
    assert len(epochs) == 4 and not epochs.duplicated(["trial_id", "epoch"]).any()
    assert (epochs["world_size"] == 2).all() and (epochs["test_samples"] == 128).all()
    assert len(pd.read_parquet(tmp_path / "store" / "two" / "epochs")) == 4
    report = tmp_path / "store" / "two" / "report"
    assert (report / "report.md").exists() and list(report.glob("*.png"))
    # the same experiment again is refused; --resume finds nothing left to do
    assert main(["grid", "--space", space, "--store", store]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["grid", "--space", space, "--store", store, "--resume", "--no-report"]) == 0
    assert len(read_epochs(store)) == 4 and len(read_trials(store)) == 2
    assert main(["status", "--store", store]) == 0
    assert "2 completed" in capsys.readouterr().out


def test_optuna_study_lands_in_the_store(ray_session, tmp_path):
    space = _space(tmp_path, "study", {
        "fixed": {**TINY, "opt": "tvlars", "epochs": 3, "cpus_per_worker": 0.5},
        "search": {"lr": {"loguniform": [0.5, 5.0]}, "lmbda": {"loguniform": [1e-5, 1e-2]},
                   "alpha": {"uniform": [0.1, 1.0]}}})
    store = str(tmp_path / "store")
    assert main(["optuna", "--space", space, "--store", store, "--num-samples", "4",
                 "--asha", "--quiet"]) == 0
    trials = read_trials(store, "study")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "stopped"}
    assert trials["lr"].nunique() == 4 and trials["lr"].between(0.5, 5.0).all()
    # stopped trials are those ASHA cut short; completed ones ran every epoch
    assert (trials.loc[trials.status == "completed", "epochs_done"] == 3).all()
    assert (trials.loc[trials.status == "stopped", "epochs_done"] < 3).all()
    epochs = read_epochs(store, "study")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()


def test_plan_refuses_trials_that_cannot_fit():
    cfg = TrialConfig(ds="synthetic", num_workers=4, cpus_per_worker=1)
    nodes = [{"CPU": 2.0, DRIVER_RESOURCE: 100.0}]
    with pytest.raises(ClusterError, match="cannot fit"):
        plan([cfg], nodes)
    gpu = TrialConfig(ds="synthetic", num_workers=2, use_gpu=True)
    with pytest.raises(ClusterError, match="GPU"):
        plan([gpu], [{"CPU": 16.0, "GPU": 1.0}])
    # 8 GPUs, 2 per trial: 4 at a time, never more GPUs than there are
    four = plan([gpu], [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}])
    assert four.concurrency == 4 and four.driver == {"CPU": 0.01}
    # the driver takes the custom resource where the cluster declares it
    two = plan([TrialConfig(ds="synthetic", num_workers=2)], nodes)
    assert two.driver == {DRIVER_RESOURCE: 0.01} and two.concurrency == 1
